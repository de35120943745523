"""The order-accuracy example's event sinks at its start: a Redis that refuses the broker
URL's credentials fails :meth:`OrderAccuracy.start` with a ``ConfigError`` naming the sink and
the URL (password masked), before any station starts, on a redis-server of the test's own that
takes only its own password."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from conftest import need_modules
from framepipe import LocalObjectStore, Settings
from framepipe.errors import ConfigError
from redis_servers import PrivateRedis, running

pytestmark = pytest.mark.slow

need_modules("zxingcpp", "segno", install="pip install 'framepipe[qr]' segno")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_accuracy"
sys.path.insert(0, str(EXAMPLE))
from orders import OrderAccuracy  # noqa: E402

RIGHT, WRONG = "right-secret-5e1", "wrong-secret-3b7"


def test_a_broker_url_whose_password_redis_refuses_fails_the_start(tmp_path: Path) -> None:
    with running(PrivateRedis(tmp_path, password=RIGHT)) as server:
        wrong = server.url.replace(RIGHT, WRONG)
        settings = Settings(broker_url=wrong, broker_namespace="fp-oa-sinks")

        async def main() -> OrderAccuracy:
            site = OrderAccuracy(
                settings, frames=LocalObjectStore(tmp_path / "frames"), store_events=False
            )
            with pytest.raises(ConfigError) as refused:
                await site.start()
            text = str(refused.value)
            assert text.startswith("event sink redis (redis://:***@127.0.0.1:"), text
            assert "refuses the credentials" in text and WRONG not in text, text
            return site

        site = asyncio.run(asyncio.wait_for(main(), 30))
        assert site.app.started_at is None  # the app (its stations) never started

"""How the state store shows its database URL: by :func:`framepipe.urls.safe_url`, the project's
one rule (a password in the URL and every secret-named query value masked), and never at all
when the URL does not parse; on the real PostgreSQL (which trusts local connections, so a URL
carrying a password still connects) and in the log of a real ``framepipe worker``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REDIS_URL, redis_namespace
from framepipe.backends.state import StateStore
from framepipe.errors import StateStoreError
from waiting import wait_until

SECRET = "S3cretPW"


@pytest.mark.postgres
def test_a_password_in_the_query_is_masked_where_the_store_shows_its_url(pg_url: str) -> None:
    with StateStore(f"{pg_url}&password={SECRET}&sslpassword={SECRET}") as store:
        assert store.current_revision() is not None  # it connected
        shown = store.safe_url
        assert "password=***" in shown and "sslpassword=***" in shown
        assert SECRET not in shown
        assert "options=-csearch_path" in shown  # the rest says where it points
    with pytest.raises(StateStoreError, match="is closed") as closed, store.read():
        pass
    assert SECRET not in str(closed.value)


def test_a_password_in_the_userinfo_is_masked_too(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/test?connect_timeout=2"
    with pytest.raises(StateStoreError) as caught:
        StateStore(url)
    assert "alice:***@127.0.0.1:1" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (f"alice:{SECRET}@127.0.0.1/test", "does not parse"),
        ("garbage", "does not parse"),
        (f"postgresql+psycopg://alice@127.0.0.1:{SECRET}/test", "port is not a number"),
        (f"mysql://alice:{SECRET}@127.0.0.1/x", "SQLite or PostgreSQL"),
    ],
)
def test_a_url_that_does_not_parse_is_not_shown(url: str, needle: str) -> None:
    with pytest.raises(StateStoreError) as caught:
        StateStore(url)
    assert needle in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "garbage" not in str(caught.value)
    assert caught.value.__cause__ is None  # no chained parser error repeating it


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_the_worker_logs_its_database_url_without_the_password(tmp_path: Path, pg_url: str) -> None:
    with redis_namespace("fpstoreurl") as namespace:
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "framepipe", "worker", "-c", "1"],
                env={
                    **os.environ,
                    "FRAMEPIPE_HOME": str(tmp_path / "home"),
                    "FRAMEPIPE_DATABASE_URL": f"{pg_url}&password={SECRET}",
                    "FRAMEPIPE_BROKER_URL": REDIS_URL,
                    "FRAMEPIPE_BROKER_NAMESPACE": namespace,
                    "FRAMEPIPE_LOG_LEVEL": "INFO",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            started = wait_until(
                "the worker's start line",
                lambda: next(
                    (line for line in log.read_text().splitlines() if " started: " in line), None
                ),
                60,
                explain=log.read_text,
            )
        finally:
            proc.terminate()
            proc.wait(30)
    assert "password=***" in started
    assert SECRET not in log.read_text()

"""Event sinks (state store, Redis Stream) and processor events, against the real backends.

The store sink runs on SQLite and PostgreSQL (the ``store`` fixture), the Redis sink on the real
Redis at ``REDIS_URL`` and on a port where nothing listens. Processor events go through a real
``App`` and ``StreamPipeline`` with worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import REDIS_URL, redis_namespace
from framepipe import (
    App,
    Frame,
    PatternSource,
    Processor,
    RedisEventSink,
    Settings,
    Stage,
    StateStore,
    StoreEventSink,
    StreamPipeline,
)
from framepipe.backends.state.retention import parse_duration, prune_events
from framepipe.backends.state.schema import events
from framepipe.backoff import Backoff
from media import free_port
from waiting import wait_until_async


def stored(store: StateStore) -> list[tuple[str, dict[str, Any]]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(events.c.type, events.c.data).order_by(events.c.id))
        return [(r.type, r.data if isinstance(r.data, dict) else json.loads(r.data)) for r in rows]


def test_the_store_sink_commits_every_event_in_order(store: StateStore) -> None:
    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site", batch=64)
        for i in range(500):
            sink("order.completed" if i % 2 else "order.started", {"n": i, "path": Path("/x")})
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the writer take batches while events arrive
        await sink.aclose()
        return sink

    sink = asyncio.run(main())
    rows = stored(store)
    assert [d["n"] for _, d in rows] == list(range(500))
    assert rows[1] == ("order.completed", {"app": "site", "n": 1, "path": "/x"})
    assert sink.written == 500 and sink.dropped == 0


def test_the_redis_sink_appends_in_order_with_a_type_filter() -> None:
    import redis

    with redis_namespace("fp-sink-") as namespace:
        stream = f"{namespace}events"

        async def main() -> None:
            sink = RedisEventSink(REDIS_URL, stream, types={"order.completed"}, maxlen=1000)
            for i in range(300):
                sink("order.completed", {"n": i})
                sink("tag.unreadable", {"n": i})
            await sink.aclose()
            assert sink.written == 300

        asyncio.run(main())
        client = redis.Redis.from_url(REDIS_URL)
        entries = client.xrange(stream)
        client.close()
    assert [json.loads(f[b"data"])["n"] for _, f in entries] == list(range(300))
    assert {f[b"type"] for _, f in entries} == {b"order.completed"}


# A type made from a file name that is not UTF-8 (os.fsdecode: a lone surrogate) and one
# made from binary data (a NUL): no backend can store either as written.
_ODD_TYPES = [("zone.caf\udce9.entered", "zone.caf\\udce9.entered"), ("tag.a\x00b", "tag.a\\x00b")]


def test_an_odd_event_type_never_fails_the_store_sink_s_batch(store: StateStore) -> None:
    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site", retries=1)
        sink("order.started", {"n": 0})
        for n, (kind, _) in enumerate(_ODD_TYPES, 1):
            sink(kind, {"n": n, "name": "caf\udce9"})
        sink("order.completed", {"n": 3})
        await sink.aclose()
        return sink

    sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (4, 0)
    rows = stored(store)
    assert [t for t, _ in rows] == ["order.started", *(s for _, s in _ODD_TYPES), "order.completed"]
    assert [d["n"] for _, d in rows] == [0, 1, 2, 3]


def test_an_odd_event_type_never_fails_the_redis_sink_s_batch() -> None:
    import redis

    with redis_namespace("fp-sink-") as namespace:
        stream = f"{namespace}events"

        async def main() -> RedisEventSink:
            sink = RedisEventSink(REDIS_URL, stream, retries=1)
            sink("order.started", {"n": 0})
            for n, (kind, _) in enumerate(_ODD_TYPES, 1):
                sink(kind, {"n": n, "name": "caf\udce9"})
            sink("order.completed", {"n": 3})
            await sink.aclose()
            return sink

        sink = asyncio.run(main())
        client = redis.Redis.from_url(REDIS_URL)
        entries = client.xrange(stream)
        client.close()
    assert (sink.written, sink.dropped) == (4, 0)
    assert [f[b"type"].decode() for _, f in entries] == [
        "order.started",
        *(s for _, s in _ODD_TYPES),
        "order.completed",
    ]
    assert [json.loads(f[b"data"])["n"] for _, f in entries] == [0, 1, 2, 3]


def test_a_redis_that_is_away_never_blocks_or_raises_and_drops_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> RedisEventSink:
        sink = RedisEventSink(
            url, "events", retries=2, backoff=Backoff(0.01, 2, 0.05, 0), max_pending=50
        )
        for i in range(120):
            sink("order.completed", {"n": i})  # returns at once
        assert sink.dropped == 70  # the oldest, beyond max_pending
        await sink.aclose(timeout=10)
        return sink

    with caplog.at_level(logging.WARNING, logger="framepipe"):
        sink = asyncio.run(main())
    assert sink.written == 0 and sink.dropped == 120
    assert any("not written after 2 attempt(s)" in r.getMessage() for r in caplog.records)


class Tagger(Processor):
    """Emits an event for every frame from its worker threads."""

    name = "tagger"

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def process(self, item: Any) -> Any:
        frame: Frame = item
        self.threads.add(threading.current_thread().name)
        self.emit("tag.seen", seq=frame.seq)
        return frame


def test_processor_events_reach_the_app_in_order_from_worker_threads(tmp_path: Path) -> None:
    tagger = Tagger()
    app = App("site", settings=Settings(home=tmp_path))
    seen: list[dict[str, Any]] = []
    app.on("tag.seen", lambda _e, data: seen.append(data))
    app.add_pipeline(
        StreamPipeline(
            "cam", PatternSource("cam", count=60, realtime=False), stages=[Stage(tagger, workers=1)]
        )
    )

    async def main() -> None:
        await app.start()
        await app.wait()
        await app.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert [d["seq"] for d in seen] == sorted(d["seq"] for d in seen)
    assert len(seen) == 60
    assert all(d["pipeline"] == "cam" and d["source_id"] == "cam" for d in seen)
    assert all(name.startswith("fp-tagger") for name in tagger.threads)


def test_a_processor_outside_a_pipeline_may_emit(caplog: pytest.LogCaptureFixture) -> None:
    tagger = Tagger()
    with caplog.at_level(logging.DEBUG, logger="framepipe"):
        tagger.process(
            Frame(image=__import__("numpy").zeros((2, 2, 3), "uint8"), source_id="s", seq=1)
        )
    assert any("tag.seen" in r.getMessage() for r in caplog.records)


def _events_at(store: StateStore, rows: list[tuple[float, str | None]]) -> None:
    with store.write() as conn:
        conn.execute(
            events.insert(),
            [
                {
                    "ts": ts,
                    "type": "x",
                    "execution_id": execution_id,
                    "step_key": None,
                    "data": {"ts": ts},
                }
                for ts, execution_id in rows
            ],
        )


def test_prune_events_deletes_old_app_events_only(store: StateStore) -> None:
    now = 1_000_000.0
    day = 86400.0
    _events_at(
        store,
        [(now - 10 * day, None)] * 7
        + [(now - 10 * day, "exec1"), (now - 2 * day, None), (now, None)],
    )
    assert prune_events(store, 7 * day, batch=3, now=now) == 7  # in batches of 3
    left = stored(store)
    assert sorted(d["ts"] for _, d in left) == [now - 10 * day, now - 2 * day, now]
    assert prune_events(store, 7 * day, now=now) == 0


def test_the_store_sink_prunes_by_the_retention_setting(store: StateStore) -> None:
    old = time.time() - 3 * 86400
    _events_at(store, [(old, None), (old, "exec1")])

    async def main() -> None:
        sink = StoreEventSink(store, "site", retention_days=1)
        sink("order.completed", {"n": 1})
        await sink.aclose()

    asyncio.run(main())
    assert sorted(t for t, _ in stored(store)) == ["order.completed", "x"]  # exec1's stays


def test_the_prune_command(tmp_path: Path) -> None:
    from test_cli import cli

    with StateStore(f"sqlite:///{tmp_path / 'home' / 'state.db'}") as st:
        _events_at(st, [(time.time() - 8 * 86400, None), (time.time(), None)])
    result = cli(tmp_path / "home", "db", "prune-events", "--older-than", "7d")
    assert result.exit_code == 0, result.output
    assert "deleted 1 event(s) older than 7d" in result.stdout
    bad = cli(tmp_path / "home", "db", "prune-events", "--older-than", "a week")
    assert bad.exit_code == 2 and "is not a duration" in bad.output
    assert parse_duration("90") == 90 and parse_duration("12h") == 43200


def test_an_overflow_while_a_batch_is_written_drops_queued_events_not_the_batch() -> None:
    from framepipe.event_sinks import _QueuedSink

    class Slow(_QueuedSink):
        kind = "slow"

        def __init__(self) -> None:
            super().__init__(max_pending=3, batch=2)
            self.release = asyncio.Event()
            self.wrote: list[int] = []

        async def _write(self, batch: list[Any]) -> None:
            await self.release.wait()
            self.wrote += [event.data["n"] for event in batch]

    async def main() -> Slow:
        sink = Slow()
        sink("tick", {"n": 1})
        sink("tick", {"n": 2})
        await asyncio.sleep(0)  # the writer takes 1 and 2 and waits in _write
        for n in range(3, 8):  # 3 queued at most: 3 and 4 are dropped
            sink("tick", {"n": n})
        sink.release.set()
        await sink.aclose()
        return sink

    sink = asyncio.run(main())
    assert sink.wrote == [1, 2, 5, 6, 7]
    assert (sink.written, sink.dropped) == (5, 2)


# -- closing with a batch in flight, a hung Redis, a call outside the loop ---------------------


def test_a_batch_in_flight_when_close_gives_up_is_counted_as_dropped() -> None:
    """Redis away: the writer took the 3 events as one batch and is waiting to retry it when
    aclose's timeout ends; a 4th event queued behind it. All 4 are counted."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> RedisEventSink:
        sink = RedisEventSink(url, "events", retries=5, backoff=Backoff(30, 2, 30, 0))
        for i in range(3):
            sink("order.completed", {"n": i})
        await wait_until_async("the batch in flight", lambda: not sink._pending, 30)
        sink("order.completed", {"n": 3})  # queued behind the batch
        await sink.aclose(timeout=0.5)
        return sink

    sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (0, 4)
    assert not sink._pending and not sink._inflight


def test_a_redis_that_accepts_and_never_answers_costs_a_warning_and_a_retry_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung Redis (a half-open connection after a network cut): each attempt ends at the
    socket timeout with a warning; the batch is dropped (counted) after its retries."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel accepts the connections; nothing ever answers
    url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
    default = RedisEventSink(url, "events")
    kwargs = default._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 10.0 and kwargs["socket_connect_timeout"] == 5.0

    async def main() -> RedisEventSink:
        await default.aclose(timeout=0.1)
        sink = RedisEventSink(
            url, "events", retries=2, backoff=Backoff(0.05, 2, 0.1, 0), socket_timeout=0.5
        )
        for i in range(3):
            sink("order.completed", {"n": i})
        await wait_until_async(
            "the batch dropped after 2 attempts",
            lambda: sink.dropped == 3,
            60,
            explain=lambda: (sink.written, sink.dropped, caplog.text[-2000:]),
        )
        await sink.aclose(timeout=5)
        return sink

    try:
        with caplog.at_level(logging.WARNING, logger="framepipe"):
            sink = asyncio.run(main())
    finally:
        hung.close()
    assert (sink.written, sink.dropped) == (0, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("writing 3 event(s) failed" in m and "retrying" in m for m in messages)
    assert any("3 event(s) not written after 2 attempt(s)" in m for m in messages)


def test_an_event_emitted_outside_the_loop_is_queued_and_written_at_close() -> None:
    import redis

    with redis_namespace("fp-sink-") as namespace:
        stream = f"{namespace}events"
        sink = RedisEventSink(REDIS_URL, stream)
        sink("order.completed", {"n": 1})  # no running loop: queued, never raises
        assert len(sink._pending) == 1 and sink.dropped == 0

        async def main() -> None:
            sink("order.completed", {"n": 2})
            await sink.aclose()

        asyncio.run(main())
        client = redis.Redis.from_url(REDIS_URL)
        entries = client.xrange(stream)
        client.close()
    assert [json.loads(f[b"data"])["n"] for _, f in entries] == [1, 2]
    assert (sink.written, sink.dropped) == (2, 0)

    lone = RedisEventSink(REDIS_URL, "fp-sink-never-written")
    cycle: list[Any] = []
    cycle.append(cycle)
    lone("x", {"cycle": cycle})  # data that does not serialize: counted, never raised
    assert lone.dropped == 1 and not lone._pending

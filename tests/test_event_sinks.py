"""Event sinks (state store, Redis Stream) and processor events, against the real backends.

The store sink runs on SQLite and PostgreSQL (the ``store`` fixture), the Redis sink on the real
Redis at ``REDIS_URL`` and on a port where nothing listens. Processor events go through a real
``App`` and ``StreamPipeline`` with worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import PG_URL, REDIS_URL, redis_namespace, service_missing
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
from redis_servers import PrivateRedis, running
from waiting import wait_until_async

FAST = Backoff(0.05, 2.0, 0.2, 0)
"""Retries 0.05 s doubling to 0.2 s: the old five attempts were over in about half a second."""


def _lines(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    """``LEVEL message`` of each line logged by the ``kind`` sinks."""
    name = f"framepipe.events.{kind}"
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == name]


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
    origins, seqs = zip(*(f[b"event_id"].decode().split("-") for _, f in entries), strict=True)
    assert len(set(origins)) == 1 and len(origins[0]) == 16
    assert [int(n) for n in seqs] == list(range(1, 301))  # the type filter leaves no gaps


# A type made from a file name that is not UTF-8 (os.fsdecode: a lone surrogate) and one
# made from binary data (a NUL): no backend can store either as written.
_ODD_TYPES = [("zone.caf\udce9.entered", "zone.caf\\udce9.entered"), ("tag.a\x00b", "tag.a\\x00b")]


def test_an_odd_event_type_never_fails_the_store_sink_s_batch(store: StateStore) -> None:
    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site")
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
            sink = RedisEventSink(REDIS_URL, stream)
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
    """Nothing listens: calls return at once, the overflow is counted, and aclose gives up
    after its timeout (the writer is retrying without end) and counts what is left."""
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> tuple[RedisEventSink, float]:
        sink = RedisEventSink(url, "events", backoff=Backoff(0.01, 2, 0.05, 0), max_pending=50)
        for i in range(120):
            sink("order.completed", {"n": i})  # returns at once
        assert (sink.dropped, sink.pending) == (70, 50)  # the oldest, beyond max_pending
        await wait_until_async("the outage noticed", lambda: sink.failing_since is not None)
        started = time.monotonic()
        await sink.aclose(timeout=1)
        return sink, time.monotonic() - started

    with caplog.at_level(logging.INFO, logger="framepipe"):
        sink, closing = asyncio.run(main())
    assert closing < 5
    assert (sink.written, sink.dropped, sink.pending) == (0, 120, 0)
    lines = _lines(caplog, "redis")
    assert len(lines) == 2, lines
    assert lines[0].startswith("WARNING event sink redis (redis://:***@127.0.0.1:")
    assert "cannot write (retrying until it can; up to 50 events" in lines[0]
    assert "): ConnectionError: Error 111 connecting to 127.0.0.1:" in lines[0]
    assert "closed with 50 event(s) not written within 1 s" in lines[1]
    assert "s3cret-pw" not in caplog.text


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
    from framepipe.sink_queue import QueuedSink

    class Slow(QueuedSink):
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
        sink = RedisEventSink(url, "events", backoff=Backoff(30, 2, 30, 0))
        for i in range(3):
            sink("order.completed", {"n": i})
        await wait_until_async("the batch in flight", lambda: not sink._pending, 30)
        sink("order.completed", {"n": 3})  # queued behind the batch
        assert sink.pending == 4
        await sink.aclose(timeout=0.5)
        return sink

    sink = asyncio.run(main())
    assert (sink.written, sink.dropped, sink.pending) == (0, 4, 0)
    assert not sink._pending and not sink._inflight


def test_a_redis_that_accepts_and_never_answers_keeps_the_batch_and_close_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung Redis (a half-open connection after a network cut): each attempt ends at the
    socket timeout; the batch is retried, never dropped, and the outage is one warning. A
    close while an attempt hangs (the default 10 s timeout) returns after its own timeout."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel accepts the connections; nothing ever answers
    url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
    default = RedisEventSink(url, "events")
    kwargs = default._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 10.0 and kwargs["socket_connect_timeout"] == 5.0

    async def main() -> tuple[RedisEventSink, float]:
        default("order.completed", {"n": 0})
        await asyncio.sleep(0.2)  # its first attempt hangs, for 10 s
        started = time.monotonic()
        await default.aclose(timeout=0.5)
        closing = time.monotonic() - started
        assert (default.written, default.dropped) == (0, 1)
        sink = RedisEventSink(url, "events", backoff=Backoff(0.05, 2, 0.1, 0), socket_timeout=0.3)
        for i in range(3):
            sink("order.completed", {"n": i})
        await wait_until_async("the outage noticed", lambda: sink.failing_since is not None, 30)
        await asyncio.sleep(3)  # several attempts: the old code dropped the batch after 5
        assert (sink.written, sink.dropped, sink.pending) == (0, 0, 3)
        await sink.aclose(timeout=0.5)
        return sink, closing

    try:
        with caplog.at_level(logging.INFO, logger="framepipe"):
            sink, closing = asyncio.run(main())
    finally:
        hung.close()
    assert closing < 3
    assert (sink.written, sink.dropped) == (0, 3)
    lines = _lines(caplog, "redis")
    assert [line.split(" ", 1)[0] for line in lines] == ["WARNING"] * 3, lines
    assert "closed with 1 event(s) not written within 0.5 s" in lines[0]
    assert "did not answer in time" in lines[0]
    assert "cannot write (" in lines[1] and "): TimeoutError: Timeout reading" in lines[1]
    assert "closed with 3 event(s) not written within 0.5 s" in lines[2]
    assert "writing has failed for" in lines[2]


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


# -- outages: a private Redis stopped, hung, full; a store that refuses writes -----------------


def stream_entries(url: str, stream: str) -> list[dict[str, Any]]:
    """The stream's entries: their fields, ``data`` decoded."""
    import redis

    with redis.Redis.from_url(url) as client:
        raw = client.xrange(stream)
    return [
        {k.decode(): json.loads(v) if k == b"data" else v.decode() for k, v in f.items()}
        for _, f in raw
    ]


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server whose append-only file keeps the stream across a stop."""
    with running(PrivateRedis(tmp_path, persistent=True)) as server:
        yield server


@pytest.mark.slow
def test_a_redis_outage_longer_than_the_old_retries_loses_nothing_and_is_logged_once(
    persistent_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped for 3 s, several times what five attempts at this backoff lasted: the
    events wait in the queue and reach the stream in order once it is back; one warning when
    writing fails, one line when it works again."""

    async def main() -> RedisEventSink:
        sink = RedisEventSink(
            persistent_redis.url, "events", backoff=FAST, connect_timeout=1, socket_timeout=1
        )
        for i in range(10):
            sink("order.completed", {"n": i})
        await wait_until_async("the first events written", lambda: sink.written == 10)
        persistent_redis.stop()
        for i in range(10, 40):
            sink("order.completed", {"n": i})
            await asyncio.sleep(0.1)
        assert sink.failing_since is not None
        assert (sink.written, sink.dropped, sink.pending) == (10, 0, 30)
        persistent_redis.start()
        await wait_until_async(
            "the queue written", lambda: sink.written == 40, 30, explain=sink.stats
        )
        assert sink.failing_since is None
        await sink.aclose()
        return sink

    with caplog.at_level(logging.INFO, logger="framepipe"):
        sink = asyncio.run(main())
    assert (sink.written, sink.dropped, sink.pending) == (40, 0, 0)
    entries = stream_entries(persistent_redis.url, "events")
    assert [e["data"]["n"] for e in entries] == list(range(40))
    lines = _lines(caplog, "redis")
    assert len(lines) == 2, lines
    warning, recovered = lines
    assert warning.startswith(f"WARNING event sink redis ({persistent_redis.url} stream events)")
    assert "cannot write (" in warning and "): ConnectionError: " in warning and "\n" not in warning
    assert recovered.startswith(f"INFO event sink redis ({persistent_redis.url} stream events)")
    assert " writes again after " in recovered
    assert recovered.endswith(": 30 event(s) waited, 0 dropped meanwhile")


@pytest.mark.slow
def test_an_outage_that_overflows_the_queue_drops_the_oldest_queued_and_counts_them(
    persistent_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis away from the start; the first batch (4 events) is being retried, 10 more fit in
    the queue: of the 26 events behind the batch the oldest 16 are dropped. The stream shows
    the gap in the ``event_id`` sequence."""
    persistent_redis.stop()

    async def main() -> RedisEventSink:
        sink = RedisEventSink(persistent_redis.url, "events", max_pending=10, batch=4, backoff=FAST)
        for i in range(4):
            sink("order.completed", {"n": i})
        await wait_until_async("the first batch taken", lambda: len(sink._inflight) == 4)
        for i in range(4, 30):
            sink("order.completed", {"n": i})
        assert (sink.dropped, sink.pending) == (16, 14)
        await asyncio.sleep(1.5)  # longer than the old retries: no more dropped
        assert (sink.written, sink.dropped, sink.pending) == (0, 16, 14)
        persistent_redis.start()
        await wait_until_async("the queue written", lambda: sink.written == 14, 30)
        await sink.aclose()
        return sink

    with caplog.at_level(logging.INFO, logger="framepipe"):
        sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (14, 16)
    entries = stream_entries(persistent_redis.url, "events")
    assert [e["data"]["n"] for e in entries] == [0, 1, 2, 3, *range(20, 30)]
    assert [int(e["event_id"].split("-")[1]) for e in entries] == [1, 2, 3, 4, *range(21, 31)]
    lines = _lines(caplog, "redis")
    assert [line.split(" ", 1)[0] for line in lines] == ["WARNING", "INFO"], lines
    assert lines[1].endswith(": 14 event(s) waited, 16 dropped meanwhile")


@pytest.mark.slow
def test_a_hung_redis_that_runs_timed_out_writes_later_leaves_repeats_with_one_event_id(
    persistent_redis: PrivateRedis,
) -> None:
    """Redis paused (SIGSTOP) for 2 s: attempts time out, their commands wait in the socket
    and run when it resumes, and the retry writes them again. Every event is there, in order
    of first appearance, and its repeats carry its ``event_id``."""

    async def main() -> RedisEventSink:
        sink = RedisEventSink(persistent_redis.url, "events", backoff=FAST, socket_timeout=0.3)
        for i in range(5):
            sink("order.completed", {"n": i})
        await wait_until_async("the first events written", lambda: sink.written == 5)
        persistent_redis.pause()
        try:
            for i in range(5, 15):
                sink("order.completed", {"n": i})
                await asyncio.sleep(0.2)
            assert sink.failing_since is not None
        finally:
            persistent_redis.resume()
        await wait_until_async("the queue written", lambda: sink.written == 15, 30)
        await sink.aclose()
        return sink

    sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (15, 0)
    entries = stream_entries(persistent_redis.url, "events")
    first: dict[str, int] = {}
    for entry in entries:
        n = first.setdefault(entry["event_id"], entry["data"]["n"])
        assert n == entry["data"]["n"]  # a repeat is the same event
    assert list(first.values()) == list(range(15))


@pytest.mark.slow
def test_a_partly_refused_pipeline_writes_only_the_rest_again(
    persistent_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis at its memory limit takes the first XADDs of a batch and refuses the rest (OOM):
    those are retried until there is room, and the ones it took are not written twice."""
    import redis

    admin = redis.Redis.from_url(persistent_redis.url)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 300_000)
    pad = "x" * 50_000

    async def main() -> RedisEventSink:
        sink = RedisEventSink(persistent_redis.url, "events", backoff=FAST)
        for i in range(10):
            sink("order.completed", {"n": i, "pad": pad})
        await wait_until_async("the refusal", lambda: sink.failing_since is not None)
        took = sink.written
        assert 0 < took < 10 and sink.pending == 10 - took
        await asyncio.sleep(1)  # retried: as memory frees up, maybe one more fits
        assert sink.written < 10 and sink.dropped == 0
        admin.config_set("maxmemory", 0)
        await wait_until_async("the rest written", lambda: sink.written == 10, 30)
        await sink.aclose()
        return sink

    try:
        with caplog.at_level(logging.INFO, logger="framepipe"):
            asyncio.run(main())
    finally:
        admin.close()
    entries = stream_entries(persistent_redis.url, "events")
    assert [e["data"]["n"] for e in entries] == list(range(10))
    lines = _lines(caplog, "redis")
    assert len(lines) == 2 and "): OutOfMemoryError: command not allowed" in lines[0], lines


Outage = tuple[StateStore, Callable[[], None], Callable[[], None]]


@contextlib.contextmanager
def _sqlite_outage(tmp_path: Path) -> Iterator[Outage]:
    """A SQLite store whose writes fail while another connection holds the write lock."""
    path = tmp_path / "state.db"
    locker: list[sqlite3.Connection] = []

    def begin() -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        locker.append(conn)

    def end() -> None:
        conn = locker.pop()
        conn.rollback()
        conn.close()

    with StateStore(f"sqlite:///{path}", busy_timeout_s=0.2) as store:
        yield store, begin, end


@contextlib.contextmanager
def _postgres_outage() -> Iterator[Outage]:
    """A store on a PostgreSQL database of its own, which refuses connections (and has its
    sessions ended) during the outage. The URL holds a password (trust auth ignores it)."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            user = conn.exec_driver_sql("SELECT current_user").scalar_one()
    except sa.exc.OperationalError as exc:
        service_missing(f"PostgreSQL at {PG_URL}", exc)
    name = f"fp_sink_{uuid.uuid4().hex[:10]}"
    url = sa.make_url(PG_URL).set(database=name, username=user, password="s3cret-pw")

    def run(sql: str) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(sql)

    def begin() -> None:
        run(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        run(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")

    def end() -> None:
        run(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

    run(f"CREATE DATABASE {name}")
    try:
        with StateStore(url.render_as_string(hide_password=False)) as store:
            yield store, begin, end
    finally:
        end()
        run(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])]
)
def store_outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    """A store, and how to begin and end an outage of it (SQLite locked, PostgreSQL refusing)."""
    outage = _sqlite_outage(tmp_path) if request.param == "sqlite" else _postgres_outage()
    with outage as value:
        yield value


def test_a_store_outage_longer_than_the_old_retries_loses_nothing_and_is_logged_once(
    store_outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses writes for 3 s: the events wait and are committed in order once it
    takes them; one single-line warning without the password, one line when it works again."""
    store, begin, end = store_outage

    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site", backoff=FAST)
        for i in range(5):
            sink("order.completed", {"n": i})
        await wait_until_async("the first events written", lambda: sink.written == 5)
        await asyncio.to_thread(begin)
        try:
            for i in range(5, 35):
                sink("order.completed", {"n": i})
                await asyncio.sleep(0.1)
            assert sink.failing_since is not None
            assert (sink.written, sink.dropped, sink.pending) == (5, 0, 30)
        finally:
            await asyncio.to_thread(end)
        await wait_until_async(
            "the queue written", lambda: sink.written == 35, 30, explain=sink.stats
        )
        await sink.aclose()
        return sink

    with caplog.at_level(logging.INFO, logger="framepipe"):
        sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (35, 0)
    assert [d["n"] for _, d in stored(store)] == list(range(35))
    lines = _lines(caplog, "store")
    assert len(lines) == 2, lines
    warning, recovered = lines
    assert warning.startswith(f"WARNING event sink store ({store.safe_url}) cannot write (")
    assert "): OperationalError: " in warning
    assert "\n" not in warning and "Background on this error" not in warning
    assert recovered.endswith(": 30 event(s) waited, 0 dropped meanwhile")
    assert "s3cret-pw" not in caplog.text


def test_the_sinks_counts_are_in_the_app_s_metrics_while_attached(
    tmp_path: Path, store: StateStore
) -> None:
    """Two sinks on one app: each metric is exposed once, with a sample per sink; a Redis
    that is away shows as not writing, with its queue; closed, the sinks leave the metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    app = App("site", settings=Settings(home=tmp_path))
    away = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"

    def samples() -> dict[tuple[str, str, str], float]:
        text = app.metrics_text()
        names = [f.name for f in text_string_to_metric_families(text)]
        assert len(names) == len(set(names)), names
        found = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("framepipe_event_sink_")
        ]
        assert {s.labels["app"] for s in found} <= {"site"}  # each series names its app
        return {(s.name, s.labels["sink"], s.labels["target"]): s.value for s in found}

    async def main() -> None:
        stored_sink = StoreEventSink(store, "site").attach(app)
        redis_sink = RedisEventSink(away, "events", backoff=FAST, max_pending=3).attach(app)
        for i in range(5):
            app.emit("order.completed", {"n": i})
        await wait_until_async("stored", lambda: stored_sink.written == 5)
        await wait_until_async("the outage", lambda: redis_sink.failing_since is not None)
        target = "redis://:***@127.0.0.1:" + away.rsplit(":", 1)[1] + " stream events"
        got = samples()
        assert got[("framepipe_event_sink_written_total", "store", store.safe_url)] == 5
        assert got[("framepipe_event_sink_writing", "store", store.safe_url)] == 1
        assert got[("framepipe_event_sink_pending", "redis", target)] == 3  # the batch
        assert got[("framepipe_event_sink_dropped_total", "redis", target)] == 2
        assert got[("framepipe_event_sink_writing", "redis", target)] == 0
        assert redis_sink.stats()["last_error"].startswith("ConnectionError: ")
        await stored_sink.aclose()
        await redis_sink.aclose(timeout=0.2)
        assert not samples()
        app.emit("order.completed", {"n": 5})  # detached: not counted anywhere
        assert (stored_sink.dropped, redis_sink.dropped) == (0, 5)

    asyncio.run(main())
    assert "s3cret-pw" not in app.metrics_text()


def test_data_no_backend_could_hold_is_stored_alike_on_every_backend(store: StateStore) -> None:
    """A ``nan`` score, an infinite area, a NUL in a text and a file name with a lone surrogate
    (what ``os.listdir`` gives for a Latin-1 name): SQLite would keep some and PostgreSQL
    refuse them; both store the same value, numbers JSON cannot hold as null and the text with
    the character's escape."""

    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site")
        sink(
            "tag.measured",
            {"score": float("nan"), "area": float("-inf"), "raw": "a\x00b", "caf\udce9.mp4": 1},
        )
        await sink.aclose(timeout=20)
        return sink

    sink = asyncio.run(main())
    assert (sink.written, sink.dropped) == (1, 0)
    [(_, data)] = stored(store)
    assert data == {
        "app": "site",
        "score": None,
        "area": None,
        "raw": "a\\x00b",
        "caf\\udce9.mp4": 1,
    }


@pytest.mark.slow
def test_an_event_sink_that_cannot_write_makes_the_running_app_degraded(
    tmp_path: Path, persistent_redis: PrivateRedis
) -> None:
    """Its events wait in a queue that drops the oldest once full: the app's health says so
    (DEGRADED, with the sink's counts) while the outage lasts, and RUNNING once it is over."""
    from framepipe import SystemState

    app = App("site", settings=Settings(home=tmp_path), health_interval=0.05)
    app.add_pipeline(StreamPipeline("cam", PatternSource("cam", fps=20)))

    async def main() -> tuple[Any, Any]:
        sink = RedisEventSink(persistent_redis.url, "events", backoff=FAST, socket_timeout=0.3)
        sink.attach(app)
        await app.start()
        try:
            persistent_redis.pause()
            try:
                app.emit("order.completed", {"n": 1})
                await wait_until_async("the outage", lambda: sink.failing_since is not None)
                down = app.health()
            finally:
                persistent_redis.resume()
            await wait_until_async("written", lambda: sink.failing_since is None, 30)
            return down, app.health()
        finally:
            await app.stop()
            await sink.aclose()

    down, back = asyncio.run(main())
    assert down.state is SystemState.DEGRADED
    [entry] = down.event_sinks
    assert entry["sink"] == "redis" and entry["target"].endswith(" stream events")
    assert entry["pending"] >= 1 and entry["failing_since"] is not None
    assert back.state is SystemState.RUNNING
    assert back.event_sinks[0]["failing_since"] is None and back.event_sinks[0]["pending"] == 0


def test_an_event_the_database_refuses_is_dropped_alone_and_a_long_type_is_cut(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An event type longer than the column, and an event the database refuses for good (a
    rule its administrator added; any row it refuses is the same case): the long type is cut,
    the refused event dropped, counted and named in a warning; the events around it are
    written, in order, at once (it is no outage to wait out)."""
    long_type = "vision.tag." + "x" * 100
    with store.write() as conn:
        if store.dialect == "postgresql":
            conn.exec_driver_sql(
                "ALTER TABLE fp_events ADD CONSTRAINT no_refused CHECK (type <> 'tag.refused')"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER no_refused BEFORE INSERT ON fp_events "
                "WHEN NEW.type = 'tag.refused' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )

    async def main() -> StoreEventSink:
        sink = StoreEventSink(store, "site", batch=16)
        sink("order.started", {"n": 0})
        sink("tag.refused", {"n": 1})
        sink(long_type, {"n": 2})
        sink("order.completed", {"n": 3})
        await sink.aclose(timeout=20)
        return sink

    started = time.monotonic()
    sink = asyncio.run(main())
    assert time.monotonic() - started < 10
    rows = stored(store)
    assert [d["n"] for _, d in rows] == [0, 2, 3]
    assert (sink.written, sink.dropped) == (3, 1)
    [cut] = [t for t, d in rows if d["n"] == 2]
    assert len(cut) == 60 and cut.startswith("vision.tag.xxx") and cut.endswith("…")
    warned = [r.getMessage() for r in caplog.records if "refused event" in r.getMessage()]
    assert len(warned) == 1
    assert "tag.refused" in warned[0] and "\n" not in warned[0]

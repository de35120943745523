"""Shared fixtures: one suite, every state backend (SQLite file, real PostgreSQL server).

PostgreSQL is the server on 127.0.0.1:5432 (database ``test``, trust auth), or
``FRAMEPIPE_TEST_POSTGRES_URL``. Each test gets a schema of its own. When the server is missing
the PostgreSQL cases skip with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hypothesis
import pytest
import sqlalchemy as sa

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings

if TYPE_CHECKING:
    from redis_servers import PrivateRedis
    from s3server import S3Server

# Never let an AWS SDK look for instance metadata (a non-loopback address) during the tests.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# No per-example time limit in the property tests: speed is the benchmarks' business, and a
# machine busy with parallel workers (pytest -n) would fail an example for being slow.
hypothesis.settings.register_profile("framepipe", deadline=None)
hypothesis.settings.load_profile("framepipe")

REDIS_URL = os.environ.get("FRAMEPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("FRAMEPIPE_TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def dependency_missing(message: str) -> NoReturn:
    """Skip (laptop) or fail (CI) because a package, tool or file the test needs is not
    installed; also at a module's top level."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing dependency fails the run)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def need_modules(*names: str, install: str) -> None:
    """:func:`dependency_missing` unless every module in ``names`` can be imported."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            dependency_missing(f"{name} is not installed: {install}")


def service_missing(what: str, exc: BaseException) -> None:
    """Skip (laptop) or fail (CI) because a real service is not reachable."""
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service fails the run)")
    pytest.skip(message)


def _pg_engine() -> sa.Engine:
    try:
        engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        service_missing(f"PostgreSQL at {PG_URL}", exc)
    return engine


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL of the real PostgreSQL server, confined to a fresh schema dropped afterwards."""
    admin = _pg_engine()
    schema = f"fp_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The state database URL of each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


def fast_settings(home: Path, database_url: str) -> Settings:
    """Settings on ``database_url`` with fast retries and heartbeats, for tests."""
    return Settings(
        home=home,
        database_url=database_url,
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
        heartbeat_interval=0.2,
        shutdown_grace=2.0,
    )


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings on the backend under test, with fast retries."""
    return fast_settings(tmp_path / "home", database_url)


@pytest.fixture
def store(settings: Settings) -> Iterator[StateStore]:
    """An open state store on the backend under test."""
    with StateStore(settings.resolved_database_url) as s:
        yield s


@contextlib.contextmanager
def redis_namespace(prefix: str) -> Iterator[str]:
    """A fresh key prefix on the real Redis (``REDIS_URL``); every key under it, result streams
    included, is deleted afterwards. Skips (laptop) or fails (CI) when Redis is missing."""
    try:
        import redis
    except ImportError as exc:
        service_missing("the redis package (pip install 'framepipe[redis]')", exc)
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    namespace = f"{prefix}{uuid.uuid4().hex[:10]}:"
    try:
        yield namespace
    finally:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh namespace on the real Redis (``fptest:<random>``); its keys are deleted
    afterwards."""
    with redis_namespace("fptest:") as namespace:
        yield namespace


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own (tests/redis_servers.py), without persistence or a
    password, started; stopped afterwards."""
    from redis_servers import PrivateRedis, running

    with running(PrivateRedis(tmp_path)) as server:
        yield server


@pytest.fixture
def aws_env() -> Iterator[None]:
    """Only the test AWS credentials for the test: nothing from the developer's setup leaks in."""
    from s3server import aws_test_env

    with aws_test_env():
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The real S3-compatible server (moto's, tests/s3server.py) on loopback, started once for
    the session by the first test that needs it; skips (laptop) or fails (CI) without it."""
    from s3server import aws_test_env, s3_server_at

    stack = contextlib.ExitStack()
    with aws_test_env():  # the server and its setup client start with the test credentials
        server = stack.enter_context(s3_server_at(tmp_path_factory.mktemp("moto")))
    with stack:
        yield server


@pytest.fixture
def objects(settings: Settings) -> ObjectStore:
    """The object store of ``settings``."""
    return open_object_store(settings.resolved_objects_url)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder every temporary directory goes to during the test (to check it is empty)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog wired to the ``framepipe`` logger, whatever ``configure_logging`` did before."""
    logger = logging.getLogger("framepipe")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate

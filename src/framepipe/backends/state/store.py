"""The state store: one SQLAlchemy engine on SQLite (embedded) or PostgreSQL (distributed).

Guarantees:

* The schema is at :data:`SCHEMA_HEAD` once the store is open: a fresh database is migrated
  (Alembic, under a lock so concurrent openers do not race), an older one is upgraded, a newer
  or unknown one is refused with :class:`SchemaVersionError` instead of being touched.
* On SQLite the file is in WAL mode with a busy timeout, and write transactions start with
  ``BEGIN IMMEDIATE``: concurrent writers in several processes queue for the lock instead of
  failing with "database is locked" when a read transaction tries to upgrade.
* A committed write is durable per ``sqlite_synchronous`` (``FULL`` by default).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from framepipe.backends.state.schema import SCHEMA_HEAD, VERSION_TABLE
from framepipe.errors import MissingDependencyError, SchemaVersionError, StateStoreError
from framepipe.urls import safe_url

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["DATABASE_BACKENDS", "StateStore", "parse_database_url"]

_MIGRATIONS = Path(__file__).with_name("migrations")
_WRITE = "framepipe_write"


def _alembic_config(connection: sa.Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


_IDLE_PING_S = 5.0


def _ping_if_idle(engine: sa.Engine) -> None:
    """Check a pooled connection before use only if it sat idle for a while (a database
    restart drops it): ``pool_pre_ping`` would add a round trip to every transaction."""

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < _IDLE_PING_S:
            return
        try:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_conn.rollback()
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc


_PG_CONNECTION = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}
"""libpq's connection options a PostgreSQL state store sets unless its URL sets them: a
server that does not answer a connection is given up after 10 s (libpq waits for ever by
default), and a connection whose server went away without a word (a failover to another
address, a network partition) is found broken within about a minute, by TCP keepalives while
a query waits for its answer and by ``tcp_user_timeout`` while data it sent goes unacknowledged,
instead of the kernel's retransmission timeout (15 minutes and more)."""


def _pg_connect_args(parsed: sa.engine.URL) -> dict[str, str]:
    """:data:`_PG_CONNECTION` without the options ``parsed``'s query gives itself."""
    return {k: v for k, v in _PG_CONNECTION.items() if k not in parsed.query}


DATABASE_BACKENDS = ("sqlite", "postgresql")
"""The databases a state store keeps its state in (a URL's backend name)."""

_URL_FORM = "sqlite:///path/state.db or postgresql+psycopg://user:password@host:5432/database"


def parse_database_url(url: str) -> sa.engine.URL:
    """``url`` parsed, for SQLite or PostgreSQL (:data:`DATABASE_BACKENDS`). Otherwise
    :class:`StateStoreError` saying what is wrong without the URL's text: a URL that does not
    parse cannot be shown with its password masked, so it is not shown at all."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StateStoreError(f"the database URL does not parse; expected {_URL_FORM}") from None
    except ValueError:  # int() of the port: its text is not repeated (it may be a password)
        raise StateStoreError("the database URL's port is not a number") from None
    backend = parsed.get_backend_name()
    if backend not in DATABASE_BACKENDS:
        raise StateStoreError(
            f"the database URL names {backend!r}: the state database is SQLite or "
            f"PostgreSQL ({_URL_FORM})"
        )
    return parsed


_LEGACY_VERSION_TABLE = "alembic_version"  # where framepipe stamped its revision before


def _stamped_revision(conn: sa.Connection) -> str | None:
    """The revision in framepipe's version table, or None when there is none yet."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()


def _adopt_legacy_stamp(conn: sa.Connection, cfg: Config) -> str | None:
    """A database an earlier framepipe stamped in Alembic's default ``alembic_version``: its
    revision moves to :data:`VERSION_TABLE` and that table, framepipe's own, is dropped; the
    revision, or None. Only when framepipe's tables are there and the table holds one row,
    a revision of framepipe's: any other ``alembic_version`` (an application's sharing the
    database) is left as it is."""
    inspector = sa.inspect(conn)
    if not (inspector.has_table(_LEGACY_VERSION_TABLE) and inspector.has_table("fp_executions")):
        return None
    rows = conn.exec_driver_sql(f"SELECT version_num FROM {_LEGACY_VERSION_TABLE}").all()
    if len(rows) != 1:
        return None
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    revision = str(rows[0][0])
    try:
        ScriptDirectory.from_config(cfg).get_revision(revision)
    except CommandError:
        return None
    command.stamp(cfg, revision)
    conn.exec_driver_sql(f"DROP TABLE {_LEGACY_VERSION_TABLE}")
    return revision


class StateStore:
    """An open state database. Thread-safe: each call checks a connection out of the pool."""

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        busy_timeout_s: float = 60.0,
        migrate: bool = True,
    ) -> None:
        self.url = url
        parsed = parse_database_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        elif self.dialect == "postgresql":
            kwargs["pool_size"] = 10
            kwargs["connect_args"] = _pg_connect_args(parsed)
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                exc.name or "psycopg", "postgres", f"the database URL {self.safe_url}"
            ) from exc
        self._relaxed: sa.Engine | None = None
        if self.dialect == "sqlite":
            self._install_sqlite_pragmas(sqlite_synchronous, busy_timeout_s)
        elif self.dialect == "postgresql":
            _ping_if_idle(self.engine)
            # A second, small pool whose sessions commit without waiting for the WAL flush
            # (write(durable=False)): no extra round trip per transaction to switch it.
            self._relaxed = sa.create_engine(
                parsed, pool_size=2, max_overflow=8, connect_args=_pg_connect_args(parsed)
            )
            _ping_if_idle(self._relaxed)

            @sa.event.listens_for(self._relaxed, "connect")
            def _relax(dbapi_conn: Any, _record: Any) -> None:
                with dbapi_conn.cursor() as cursor:
                    cursor.execute("SET synchronous_commit = off")
                dbapi_conn.commit()

        self._writer = self.engine.execution_options(**{_WRITE: True})
        self._closed = False
        if migrate:
            self.migrate()

    def _install_sqlite_pragmas(self, synchronous: str, busy_timeout_s: float) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cursor = dbapi_conn.cursor()
            _set_wal(cursor, busy_timeout_s)
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @sa.event.listens_for(self.engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            immediate = conn.get_execution_options().get(_WRITE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    # -- transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self, *, durable: bool = True) -> Iterator[sa.Connection]:
        """A write transaction, committed on exit and rolled back on error.

        ``durable=False`` lets PostgreSQL acknowledge the commit before its WAL is flushed
        (``synchronous_commit = off`` for this transaction only): a server crash may lose it,
        but never reorders it after a later durable commit, which flushes it too. For writes a
        later durable commit supersedes (claims, leases, progress). SQLite ignores it."""
        self._check_open()
        engine = self._writer if durable or self._relaxed is None else self._relaxed
        with engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction with a consistent snapshot."""
        self._check_open()
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- schema -----------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The schema revision stamped in the database, or None if it has none yet."""
        with self.read() as conn:
            return _stamped_revision(conn)

    def migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_HEAD`, refusing a newer or unknown revision."""
        self._check_open()
        try:
            with self.write() as conn:
                if self.dialect == "postgresql":  # one lock per schema, not per database
                    conn.exec_driver_sql(
                        "SELECT pg_advisory_xact_lock(hashtextextended("
                        "'framepipe-migrate:' || coalesce(current_schema(), ''), 0))"
                    )
                current = _stamped_revision(conn)
                if current == SCHEMA_HEAD:
                    return
                # Alembic is imported only when the schema must change (it costs a worker's
                # start-up a fifth of a second).
                from alembic import command
                from alembic.script import ScriptDirectory
                from alembic.util.exc import CommandError

                cfg = _alembic_config(conn)
                if current is None:
                    current = _adopt_legacy_stamp(conn, cfg)
                    if current == SCHEMA_HEAD:
                        return
                if current is not None:
                    try:
                        ScriptDirectory.from_config(cfg).get_revision(current)
                    except CommandError as exc:
                        raise SchemaVersionError(
                            f"database {self.safe_url} has schema revision {current!r}, which "
                            f"this framepipe does not know (its newest is {SCHEMA_HEAD!r}); "
                            "a newer framepipe wrote it: upgrade framepipe"
                        ) from exc
                command.upgrade(cfg, "head")
        except sa.exc.DatabaseError as exc:  # also "file is not a database" (corrupt)
            raise StateStoreError(f"cannot open database {self.safe_url}: {exc.orig}") from exc

    def check_writable(self) -> str | None:
        """None when the database can be read and written now; else why not, in one line
        (for health checks). Writes nothing and waits at most a fraction of a second: on
        SQLite it takes the write lock and gives it back (a lock held by another writer means
        writable), on PostgreSQL it asks whether the session is read-only."""
        try:
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    return self._sqlite_write_probe(conn)
                with conn.begin():
                    conn.exec_driver_sql("SELECT 1").scalar()
                    if self.dialect == "postgresql":
                        read_only = conn.exec_driver_sql("SHOW transaction_read_only").scalar()
                        if read_only == "on":
                            return "read-only: the server accepts no writes"
        except Exception as exc:
            return f"unreachable: {getattr(exc, 'orig', None) or type(exc).__name__}"
        return None

    def _sqlite_write_probe(self, conn: sa.Connection) -> str | None:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        timeout = cursor.execute("PRAGMA busy_timeout").fetchone()[0]
        cursor.execute("PRAGMA busy_timeout=200")
        try:
            cursor.execute("SELECT count(*) FROM sqlite_master").fetchone()
            cursor.execute("BEGIN IMMEDIATE")
            try:  # deletes nothing, but only a writable database lets it run
                cursor.execute("DELETE FROM fp_events WHERE id < 0")
            finally:
                cursor.execute("ROLLBACK")
        except Exception as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                return None
            return (
                f"read-only: {text}"
                if "readonly" in text or "read-only" in text
                else f"unusable: {text}"
            )
        finally:
            cursor.execute(f"PRAGMA busy_timeout={int(timeout)}")
            cursor.close()
        return None

    @property
    def safe_url(self) -> str:
        """The URL for messages and logs, shown by :func:`framepipe.urls.safe_url`: a password
        in it, and the value of every query parameter whose name says it is a secret
        (``?password=``, libpq's documented form), masked."""
        return safe_url(self.url)

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError(f"state store {self.safe_url} is closed")

    def close(self) -> None:
        """Dispose of the connection pool; further use raises :class:`StateStoreError`."""
        if not self._closed:
            self._closed = True
            self.engine.dispose()
            if self._relaxed is not None:
                self._relaxed.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_wal(cursor: Any, busy_timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock: SQLite
    answers "database is locked" at once, without its busy handler, when several connections
    open a fresh database together (one is converting it to WAL)."""
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(0.1, delay * 2)

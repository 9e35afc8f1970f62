"""Engine and session handling: one engine per app, one session per request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast
from weakref import WeakKeyDictionary

import psycopg
from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Named constraints so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


WRITE_OPTION = "manager_write"
_COMMANDS = "manager.command_cursor"
# The psycopg Pipeline of a DBAPI connection in write_then_read, while it runs.
_PIPELINES: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()
T = TypeVar("T")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the per-backend settings this service relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _configure_sqlite(engine)
        return engine
    # No pool_pre_ping: it costs a round trip per checkout. Only a connection that has
    # been idle a while is pinged (_ping_idle): after a database restart every pooled
    # connection is dead, and the first request on each would otherwise answer 503.
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "after_cursor_execute", _sync_pipeline)
    event.listen(engine, "checkin", _note_idle)
    event.listen(engine, "checkout", _ping_idle)
    return engine


# A pooled connection idle this long is pinged (SELECT 1, one round trip) when it is
# checked out. A busy pool hands out connections used moments ago, so under load this
# costs nothing; a restart takes longer than this, so every connection it killed has
# been idle at least this long when it is next taken.
PING_AFTER_IDLE = 1.0  # seconds


def _note_idle(_dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """Raising DisconnectionError makes the pool drop this connection and take another
    (a new one, if the pool's others are dead too)."""
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE:
        return
    try:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        if not dbapi_conn.autocommit:
            dbapi_conn.rollback()
    except Exception as exc:  # the driver's own error: the connection is gone
        raise DisconnectionError(f"pooled connection gone: {type(exc).__name__}") from exc


def _sync_pipeline(_conn: Connection, cursor: Any, *_args: Any) -> None:
    """In pipeline mode (write_then_read) a statement is only queued, and SQLAlchemy
    would take it for one without rows: its statements are synced, each its own round
    trip. The hot path's own statements bypass SQLAlchemy and are read in batches."""
    pipeline = _PIPELINES.get(cursor.connection)
    if pipeline is not None:
        pipeline.sync()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A writer takes the lock up front: a deferred transaction that reads and then
        # writes fails with SQLITE_BUSY when another commit came in between, instead
        # of waiting for the busy timeout. Readers stay deferred and never block.
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def begin_write(session: Session) -> None:
    """Start the session's transaction as a writer (BEGIN IMMEDIATE on SQLite).

    Call it before the transaction's first statement; a no-op on PostgreSQL, where
    row locks and constraints do the arbitration.
    """
    if session.in_transaction() and session.get_transaction() is not None:
        if session.get_transaction().connections:  # type: ignore[union-attr]
            raise RuntimeError("begin_write() must come before the transaction's first statement")
    session.connection(execution_options={WRITE_OPTION: True})


@contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A new session in a write transaction, committed at the end of the block."""
    with sessions.begin() as session:
        begin_write(session)
        yield session


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """A Core connection in a write transaction, committed at the end of the block.

    For a hot path that needs no ORM: it skips the Session's own bookkeeping, which
    costs more than the statements of a short transaction. Rolled back on error.
    """
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            yield conn


def write_then_read(engine: Engine, work: Callable[[Connection], Callable[[], T]]) -> T:
    """Run `work` in a write transaction, commit, then return what its reader reads.

    `work` sends its statements and returns a reader of their results, called after
    the commit. On PostgreSQL `engine` must be in autocommit mode (create_app's
    `manager.autocommit_engine`): the transaction is our own BEGIN and COMMIT, sent in
    psycopg's pipeline mode, so BEGIN travels with the first statement (read at once)
    and COMMIT with the rest (read after it): two round trips instead of four. (On a
    connection that is not in autocommit, psycopg syncs after its own BEGIN.) An
    error in any statement undoes the whole transaction.
    """
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        if conn.dialect.name != "postgresql":
            with conn.begin():
                read = work(conn)
            return read()
        raw: Any = conn.connection.dbapi_connection
        if not raw.autocommit:
            raise RuntimeError("write_then_read needs an autocommit engine on PostgreSQL")
        try:
            with raw.pipeline() as pipeline:
                _PIPELINES[raw] = pipeline
                cursor = _command_cursor(conn)
                cursor.execute(b"BEGIN")
                read = work(conn)
                cursor.execute(b"COMMIT")
            # Leaving the pipeline synced it: every result is in, the commit included.
        except psycopg.Error as exc:
            # What the pipeline raises at a sync, SQLAlchemy has not seen: wrap it as its
            # own statements' errors are, and drop the connection if it died.
            dead = conn.dialect.is_disconnect(cast(Any, exc), raw, None)
            if dead or not _roll_back(raw):
                conn.invalidate(exc)
                conn.engine.dispose(close=False)
            raise DBAPIError.instance(
                "pipelined transaction", None, exc, psycopg.Error, connection_invalidated=dead
            ) from exc
        except BaseException:
            if not _roll_back(raw):
                conn.invalidate()
            raise
        finally:
            _PIPELINES.pop(raw, None)
        return read()


def _command_cursor(conn: Connection) -> Any:
    """One cursor per pooled connection for BEGIN and COMMIT: a new one costs more."""
    cursor = conn.connection.info.get(_COMMANDS)
    if cursor is None:
        cursor = conn.connection.info[_COMMANDS] = conn.connection.cursor()
    return cursor


def _roll_back(raw: Any) -> bool:
    """End a failed transaction; False if the connection cannot (it is then dropped)."""
    try:
        if not raw.closed and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.execute("ROLLBACK")
    except psycopg.Error:
        return False
    return not raw.closed

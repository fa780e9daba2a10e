"""The one engine and session factory per process."""

from __future__ import annotations

import json
import select as io_select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import (
    JSON,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Insert,
    Table,
    Text,
    all_,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from triage.db.models import Base
from triage.errors import ConfigError


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the API read while a worker writes; busy_timeout makes writers queue instead of
    # failing with "database is locked" under the worker's thread pool.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


# A pooled connection back from a transaction within this many seconds is handed out without a
# ping. Pinging on every checkout (pool_pre_ping) cost one extra round trip per transaction,
# about a tenth of a worker's time in `make bench`; a connection idle for longer may have been
# closed by the server or a proxy, so it is pinged first. A restart or failover inside the
# window is still caught without a round trip: the server's goodbye (an error, then end of
# stream) is already waiting on the socket of an idle connection, where nothing else arrives
# unasked, so a readable socket means "ping it".
PING_IF_IDLE_SECONDS = 10.0
_LAST_USED = "triage_last_used"


def _remember_use(_dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
    record.info[_LAST_USED] = time.monotonic()


def _has_unread_input(dbapi_conn: DBAPIConnection) -> bool:
    fileno = getattr(dbapi_conn, "fileno", None)
    if fileno is None:
        return True  # cannot look: ping it
    try:
        # poll, not select: a busy worker's descriptors may number past select's 1024.
        poller = io_select.poll()
        poller.register(fileno(), io_select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True  # closed already


def _ping_if_idle(
    dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
) -> None:
    last = record.info.get(_LAST_USED)
    recent = last is not None and time.monotonic() - last < PING_IF_IDLE_SECONDS
    if recent and not _has_unread_input(dbapi_conn):
        return
    try:
        cur = dbapi_conn.cursor()
        cur.execute("SELECT 1")
        cur.close()
        # The ping opened a transaction on a non-autocommit driver; leave the connection clean.
        dbapi_conn.rollback()
    except Exception as exc:
        # The pool discards this connection and checks out (or opens) another.
        raise sa_exc.DisconnectionError(f"stale pooled connection: {exc}") from exc


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs (the driver we depend on)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    # hide_parameters: a database error's text is logged and stored on attempt rows; with
    # the statement's parameters it would carry ticket text and requester addresses there.
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Tasks hold a connection only around short transactions, never across an API call, so a
    # pool much smaller than the worker's concurrency suffices. No overflow: a connection
    # opened past the pool is closed again when it comes back, so under steady load overflow
    # meant a new PostgreSQL backend every few transactions (306 backends in one 1500-ticket
    # bench run, 61 without). A thread past the pool waits for a connection instead; no code
    # path holds one connection while asking for a second (the suite passes on a pool of 1).
    parsed, connect_args = _prepare_threshold(parsed)
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=0,
        pool_recycle=1800,
        hide_parameters=True,
        connect_args=connect_args,
    )
    event.listen(engine, "connect", _remember_use)
    event.listen(engine, "checkin", _remember_use)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


# Runs of a statement on a connection before psycopg prepares it, unless DATABASE_URL says.
# psycopg's default is 5. A worker's per-batch statements (the claim, the wave's labels) run
# a few times a second across a pool of connections, so at 5 most of them were still parsed
# and planned afresh minutes after a start: in a CPU-bound bench run, 120 of 174 label
# statements, at 4.8 ms of server CPU each against 3.0 prepared (log_statement_stats). At 1 a
# statement is prepared on its second run: one that runs once is never prepared.
PREPARE_THRESHOLD = 1


def _prepare_threshold(url: URL) -> tuple[URL, dict[str, Any]]:
    """`?prepare_threshold=` in DATABASE_URL, as psycopg takes it (an int, or None for never).

    psycopg prepares a statement on the server once a connection has run it a few times. A
    pooler in transaction mode (PgBouncer before 1.21) hands the next transaction to another
    server connection, where that statement does not exist; `?prepare_threshold=none` turns
    preparing off. The URL would pass the value on as a string, which psycopg fails on."""
    value = url.query.get("prepare_threshold")
    if value is None:
        return url, {"prepare_threshold": PREPARE_THRESHOLD}
    given = value if isinstance(value, str) else value[-1]
    if given.strip().lower() in ("", "none", "off", "never"):
        threshold = None
    elif given.strip().isdigit():
        threshold = int(given)
    else:
        raise ConfigError(
            f"DATABASE_URL prepare_threshold={given!r}: a whole number of executions, or none"
        )
    return url.difference_update_query(["prepare_threshold"]), {"prepare_threshold": threshold}


@lru_cache(maxsize=4)
def get_engine(url: str, pool_size: int = 10) -> Engine:
    return make_engine(url, pool_size=pool_size)


@lru_cache(maxsize=4)
def get_sessionmaker(url: str, pool_size: int = 10) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url, pool_size), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def engine_of(factory: sessionmaker[Session]) -> Engine:
    """The engine a session factory of `get_sessionmaker` is bound to."""
    engine: Engine = factory.kw["bind"]
    return engine


@contextmanager
def one_statement(factory: sessionmaker[Session]) -> Iterator[Connection]:
    """A connection for a transaction that is a single statement: in autocommit mode, so the
    statement commits by itself.

    psycopg sends BEGIN and COMMIT as round trips of their own, so a one-statement transaction
    costs three. Each round trip costs more CPU than its bytes suggest in a busy process: the
    thread gives up the GIL to wait and queues to take it back. With webhooks posted flat out
    (`make bench`, 4b), storing a ticket and its classify message as one statement instead of
    a transaction of two took the API from 3.5-4.3 ms of CPU per request to 2.1-2.3, and
    PostgreSQL from 0.8-1.1 ms to 0.55-0.6 (bench/RESULTS.md, session 19)."""
    with engine_of(factory).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        yield connection


# A table's column, or a mapped class's attribute for one.
Column_ = ColumnElement[Any] | QueryableAttribute[Any]


def among(column: Column_, name: str, dialect: str) -> ColumnElement[bool]:
    """`column IN (:name)`, a list given when the statement runs. On PostgreSQL it is
    `column = ANY(:name)` with the list as one array parameter.

    An IN list renders a placeholder per item, so each length is a statement of its own,
    which the server parsed and planned on every call: psycopg prepares a statement only once
    a connection has run the same text a few times. With one array the text never changes,
    and is prepared once per connection. Unprepared, a queue-only delivery's statement cost the
    server 0.97-1.17 ms of CPU, prepared 0.60 (`log_statement_stats`, `make bench` scenario 2)."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def not_among(column: Column_, name: str, dialect: str) -> ColumnElement[bool]:
    """`column NOT IN (:name)`, as `among` has it (`column != ALL(:name)` on PostgreSQL)."""
    if dialect == "postgresql":
        return column != all_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.not_in(bindparam(name, expanding=True))


def insert_rows(
    session: Session, model: type[Base], rows: list[dict[str, Any]], returning: str | None = "id"
) -> list[Any]:
    """INSERT many rows in the session's transaction with one statement, bypassing the ORM's
    unit of work: on the hot path its bookkeeping costs more than the statement. Returns the
    `returning` column in the order of `rows`. Every row has the same keys.

    On PostgreSQL the rows go as one array per column (`INSERT ... SELECT FROM unnest(...)`):
    the statement's text is the same whatever the number of rows, so it is parsed once by the
    driver and the server instead of once per batch size (a multi-row VALUES of a few dozen
    rows is too long for psycopg's statement cache). Elsewhere, and for a single row, a plain
    (multi-row) VALUES."""
    if not rows:
        return []
    table = model.__table__
    assert isinstance(table, Table)
    connection = session.connection()
    # One row (the common case at a moderate rate) takes the plain INSERT below: arrays of one
    # cost the driver and the server far more (psycopg dumps arrays in Python, per column).
    if len(rows) > 1 and connection.dialect.name == "postgresql" and returning in (None, "id"):
        columns = tuple(rows[0])
        params = {
            f"a_{name}": [_array_item(table.c[name], row[name]) for row in rows] for name in columns
        }
        result = connection.execute(_unnest_insert(table, columns, returning), params)
        # Ids are drawn in the SELECT's order (ORDER BY ordinality), so ascending ids are the
        # rows' order; RETURNING itself promises no order.
        return [] if returning is None else sorted(result.scalars())
    result = connection.execute(_insert_statement(table, returning), rows)
    return [] if returning is None else list(result.scalars())


def _array_item(column: Column[Any], value: Any) -> Any:
    # JSON goes in a text array and is cast back per row (see _unnest_insert).
    if isinstance(column.type, JSON) and value is not None:
        return json.dumps(value)
    return value


@lru_cache(maxsize=64)
def _insert_statement(table: Table, returning: str | None) -> Insert:
    # One statement object per table: SQLAlchemy memoizes its cache key on the object, so a
    # statement built afresh per call is keyed (and its parameters coerced) every time.
    stmt = insert(table)
    if returning is None:
        return stmt
    return stmt.returning(table.c[returning], sort_by_parameter_order=True)


@lru_cache(maxsize=64)
def _unnest_insert(table: Table, columns: tuple[str, ...], returning: str | None) -> Insert:
    def array_type(column: Column[Any]) -> Any:
        return postgresql.ARRAY(Text if isinstance(column.type, JSON) else column.type)

    source = (
        func.unnest(*(bindparam(f"a_{name}", type_=array_type(table.c[name])) for name in columns))
        .table_valued(*columns, with_ordinality="ordinality")
        .render_derived()
    )
    values = select(
        *(
            cast(source.c[name], table.c[name].type)
            if isinstance(table.c[name].type, JSON)
            else source.c[name]
            for name in columns
        )
    ).order_by(source.c.ordinality)
    stmt = insert(table).from_select(list(columns), values)
    return stmt if returning is None else stmt.returning(table.c[returning])

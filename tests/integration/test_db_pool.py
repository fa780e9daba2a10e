"""The PostgreSQL pool is a hard limit that keeps its connections: many threads doing short
transactions share `pool_size` server backends, rather than opening (and closing) one per
burst. Overflow connections had cost PostgreSQL as much CPU as the work itself."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from tests.support.stack import wait_until
from triage.db.session import _has_unread_input, make_engine
from triage.errors import ConfigError

THREADS = 16
ROUNDS = 25


def test_threads_share_the_pool_without_opening_more_backends(pg_url):
    engine = make_engine(pg_url, pool_size=3)
    backends: set[int] = set()
    most_at_once = 0
    in_use = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal in_use, most_at_once
        try:
            for _ in range(ROUNDS):
                with engine.begin() as conn:
                    with lock:
                        in_use += 1
                        most_at_once = max(most_at_once, in_use)
                    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    # Long enough that the threads really do want more than three at once.
                    conn.execute(text("SELECT pg_sleep(0.002)"))
                    with lock:
                        in_use -= 1
                        backends.add(pid)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.dispose()
    assert errors == []
    # Every round ran, no more than three at a time, on the same three backends throughout.
    assert most_at_once == 3
    assert len(backends) == 3


def test_a_connection_the_server_closed_is_not_handed_out_even_just_after_use(pg_url):
    """A database restart or failover closes every backend. A pooled connection last used a
    moment before is not pinged (the ping costs a round trip per transaction), but the server's
    goodbye is already waiting on its socket: the pool sees it and replaces the connection, so
    the next transaction runs instead of failing with a disconnect."""
    engine = make_engine(pg_url, pool_size=1)
    admin = make_engine(pg_url, pool_size=1)
    try:
        with engine.begin() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()

        def backend_gone() -> bool:
            # A transaction of its own per look: pg_stat_activity is a snapshot held for the
            # whole transaction, so a loop inside one transaction that first saw the backend
            # never saw it leave (it hung until pytest's timeout once on a slow machine).
            with admin.begin() as conn:
                query = text("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = :pid)")
                return bool(conn.execute(query, {"pid": pid}).scalar())

        # The server has closed the connection once the backend is gone.
        wait_until(backend_gone, 10, what="the terminated backend to exit", every=0.01)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()
        admin.dispose()


def test_a_healthy_connection_just_used_has_nothing_waiting_so_is_not_pinged(pg_url):
    """The check that catches a closed connection costs no round trip, and on a live one it
    finds nothing waiting: the ping is still skipped for a connection just used."""
    engine = make_engine(pg_url, pool_size=1)
    try:
        for _ in range(3):
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
            pooled = engine.raw_connection()
            assert pooled.dbapi_connection is not None
            assert not _has_unread_input(pooled.dbapi_connection)
            pooled.close()
    finally:
        engine.dispose()


def _prepared_after_repeats(url: str) -> int:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.begin() as conn:
            for _ in range(10):
                conn.execute(text("SELECT count(*) FROM tickets WHERE id = :id"), {"id": 1})
            return int(conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar())
    finally:
        engine.dispose()


def test_prepared_statements_can_be_turned_off_for_a_transaction_pooler(pg_url):
    """Behind PgBouncer in transaction mode a statement psycopg prepared on one server
    connection is missing on the next; `?prepare_threshold=none` keeps it from preparing."""
    assert _prepared_after_repeats(pg_url) > 0  # triage's default: prepared on the second run
    assert _prepared_after_repeats(f"{pg_url}?prepare_threshold=none") == 0
    assert _prepared_after_repeats(f"{pg_url}?prepare_threshold=0") > 0


def test_a_prepare_threshold_that_is_not_a_number_is_refused(pg_url):
    with pytest.raises(ConfigError, match="prepare_threshold='sometimes'"):
        make_engine(f"{pg_url}?prepare_threshold=sometimes")

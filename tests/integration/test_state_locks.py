"""Batched state changes against the real PostgreSQL: rows are locked in id order, whatever
order the UPDATE's plan scans them in, so two overlapping batches cannot deadlock."""

from __future__ import annotations

import threading
import time

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.support.stack import truncate
from triage.db.models import TicketState
from triage.db.repo import accept_ticket
from triage.db.session import get_sessionmaker, session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.states import transition_many


def _locked(engine, ticket_id: int) -> bool:
    with engine.connect() as conn:
        try:
            conn.execute(
                text("SELECT id FROM tickets WHERE id = :i FOR UPDATE NOWAIT"), {"i": ticket_id}
            )
        except OperationalError:
            return True
        finally:
            conn.rollback()
    return False


def test_a_batch_transition_locks_tickets_in_id_order(pg_url):
    truncate(pg_url)
    sessions = get_sessionmaker(pg_url, 4)
    with session_scope(sessions) as session:
        a, b, c = (
            accept_ticket(
                session,
                InboundTicket(source="generic", external_id=f"lock-{i}", subject="s", body="b"),
            ).ticket_id
            for i in range(3)
        )
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        # New row versions for a and b: a sequential scan now meets c first, then a, then b.
        conn.execute(
            text("UPDATE tickets SET last_error = 'x' WHERE id IN (:a, :b)"), {"a": a, "b": b}
        )
    holder = engine.connect()
    holder.execute(text("SELECT id FROM tickets WHERE id = :b FOR UPDATE"), {"b": b})
    moved: list[int] = []

    def batch() -> None:
        with session_scope(sessions) as session:
            # Force the physical scan order the default plan would use for a large batch.
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            tickets = transition_many(
                session, [c, b, a], TicketState.QUEUED, only_from=frozenset({TicketState.RECEIVED})
            )
            moved.extend(t.id for t in tickets)

    worker = threading.Thread(target=batch)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not _locked(engine, a):
            assert time.monotonic() < deadline, "the batch never took a lock"
            time.sleep(0.05)
        # Waiting on b (held above), the batch holds a but not c: it goes in id order.
        assert worker.is_alive()
        assert not _locked(engine, c)
    finally:
        holder.rollback()
        holder.close()
        worker.join(10)
        engine.dispose()
    assert sorted(moved) == sorted([a, b, c])


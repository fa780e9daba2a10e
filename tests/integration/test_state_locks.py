"""Batched state changes against the real PostgreSQL: rows are locked in id order, whatever
order the UPDATE's plan scans them in, so two overlapping batches cannot deadlock."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import OperationalError

from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.models import Ticket, TicketState, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import get_sessionmaker, session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_claims import CLAIMABLE, claim_chunk
from triage.pipeline.classify_labels import store_labels
from triage.pipeline.states import claim_for_classification, transition_ids


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


def _while_blocked(engine, holder, work, *, blocked, what, check) -> None:
    """Run `work` on a thread until `blocked()` says it waits on the lock `holder` holds;
    `check()` must then be true. The holder lets go at the end, and `work` finishes."""
    worker = threading.Thread(target=work)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not blocked():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)
        assert worker.is_alive()
        assert check()
    finally:
        holder.rollback()
        holder.close()
        worker.join(10)
        engine.dispose()


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
            moved.extend(
                transition_ids(
                    session,
                    [c, b, a],
                    TicketState.QUEUED,
                    only_from=frozenset({TicketState.RECEIVED}),
                )
            )

    # Waiting on b (held above), the batch holds a but not c: it goes in id order.
    _while_blocked(
        engine,
        holder,
        batch,
        blocked=lambda: _locked(engine, a),
        what="the batch never took a lock",
        check=lambda: not _locked(engine, c),
    )
    assert sorted(moved) == sorted([a, b, c])


def _waiting_on_a_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )


def test_recording_labels_locks_tickets_in_id_order(pg_url, clean_redis):
    """The finishing transaction's INSERTs lock the tickets they reference (the foreign key
    check). Answers arrive in any order; the rows must still go in ticket order, or a batch
    that locks in id order (the relay marking tickets queued) deadlocks with it."""
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    with session_scope(rt.sessions) as session:
        a, b = (
            accept_ticket(
                session,
                InboundTicket(
                    source="generic", external_id=f"fk-{i}", subject="Refund", body=f"Charged {i}"
                ),
            ).ticket_id
            for i in range(2)
        )
    outcomes: dict[int, str] = {}
    claims = {c.ticket_id: c for c in claim_chunk(rt, [a, b], reuse=False, outcomes=outcomes)}
    assert sorted(claims) == [a, b]
    answers = [(claims[i], rt.backend.classify(claims[i].request)) for i in (b, a)]
    engine = create_engine(pg_url)
    holder = engine.connect()
    holder.execute(text("SELECT id FROM tickets WHERE id = :a FOR UPDATE"), {"a": a})
    recorded: list[dict[int, str]] = []

    def finish() -> None:
        with session_scope(rt.sessions) as session:
            recorded.append(store_labels(rt, session, answers).outcomes)

    # Waiting on a (held above), it must not hold b yet: b is after a in id order.
    _while_blocked(
        engine,
        holder,
        finish,
        blocked=lambda: _waiting_on_a_lock(engine),
        what="the recording never waited for ticket a",
        check=lambda: not _locked(engine, b),
    )
    assert recorded and set(recorded[0]) == {a, b}
    assert set(recorded[0].values()) <= {"routed", "review"}


def test_a_claim_takes_what_is_claimable_and_a_lapsed_lease_but_not_a_live_one(pg_url):
    truncate(pg_url)
    sessions = get_sessionmaker(pg_url, 4)
    now = utcnow()
    with session_scope(sessions) as session:
        ids = [
            accept_ticket(
                session,
                InboundTicket(source="generic", external_id=f"claim-{i}", subject="s", body="b"),
            ).ticket_id
            for i in range(4)
        ]
        queued, live, lapsed, routed = ids
        for ticket_id, state, age in (
            (queued, "queued", 0),
            (live, "classifying", 5),
            (lapsed, "classifying", 120),
            (routed, "routed", 0),
        ):
            session.execute(
                update(Ticket)
                .where(Ticket.id == ticket_id)
                .values(state=state, state_changed_at=now - timedelta(seconds=age), attempts=1)
            )
    with session_scope(sessions) as session:
        rows = claim_for_classification(
            session, ids, only_from=CLAIMABLE, stale_before=now - timedelta(seconds=60)
        )
    assert sorted((r.id, r.state, r.attempts) for r in rows) == [
        (queued, "classifying", 2),
        (lapsed, "classifying", 2),
    ]
    with sessions() as session:
        states = {row.id: row.state for row in session.execute(select(Ticket.id, Ticket.state))}
    assert states[live] == "classifying" and states[routed] == "routed"

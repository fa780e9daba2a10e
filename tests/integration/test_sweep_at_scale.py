"""The sweeper runs on every worker every few seconds, for the life of the installation: each
of its statements must be served by an index (so a pass costs the same at ten million tickets
as at ten), and the outbox must not grow for ever. Real PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Engine

from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.models import Dispatch, OutboxMessage, Ticket, utcnow
from triage.db.session import get_engine, session_scope
from triage.pipeline.relay import CLASSIFY_TASK, DELIVER_TASK
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.reliability.sweeper import sweep_once

LARGE = ("tickets", "dispatches", "outbox", "classifications", "attempts")


def _ticket(session: Any, n: int, *, state: str = "routed", age: float = 0.0) -> int:
    at = utcnow() - timedelta(seconds=age)
    ticket = Ticket(
        source="generic",
        external_id=f"scale-{n}",
        subject="s",
        body="b",
        clean_text="b",
        content_hash=f"h{n}",
        state=state,
        state_changed_at=at,
        received_at=at,
    )
    session.add(ticket)
    session.flush()
    return ticket.id


def _outbox(session: Any, ticket_id: int, *, sent_ago: float | None, task: str) -> int:
    row = OutboxMessage(
        ticket_id=ticket_id,
        task=task,
        queue=CLASSIFY_QUEUE,
        args={"ticket_id": ticket_id},
        sent_at=None if sent_ago is None else utcnow() - timedelta(seconds=sent_ago),
        created_at=utcnow() - timedelta(seconds=sent_ago or 0),
    )
    session.add(row)
    session.flush()
    return row.id


def test_outbox_rows_sent_past_the_retention_are_deleted_and_pending_ones_never(
    pg_url, clean_redis
):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_OUTBOX_RETENTION_HOURS="24"))
    day = 24 * 3600.0
    with session_scope(rt.sessions) as s:
        ticket = _ticket(s, 1)
        old = [_outbox(s, ticket, sent_ago=2 * day, task=DELIVER_TASK) for _ in range(3)]
        recent = _outbox(s, ticket, sent_ago=day / 2, task=DELIVER_TASK)
        # Unsent for two days (a message due much later, say): still owed to the broker.
        owed = _outbox(s, ticket, sent_ago=None, task=CLASSIFY_TASK)
        s.execute(
            OutboxMessage.__table__.update()  # type: ignore[attr-defined]
            .where(OutboxMessage.id == owed)
            .values(
                created_at=utcnow() - timedelta(seconds=2 * day),
                available_at=utcnow() + timedelta(days=1),
            )
        )
    report = sweep_once(rt)
    assert report.pruned_outbox == 3
    with rt.sessions() as s:
        left = set(s.scalars(select(OutboxMessage.id)))
    assert left == {recent, owed} and not left & set(old)
    assert sweep_once(rt).pruned_outbox == 0


def test_every_statement_of_a_sweep_pass_is_served_by_an_index(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_STUCK_AFTER_SECONDS="60"))
    with session_scope(rt.sessions) as s:
        # Something for each of the pass's queries to find: a stuck ticket, an undelivered
        # dispatch, old sent outbox rows.
        _ticket(s, 1, state="queued", age=600)
        routed = _ticket(s, 2, age=600)
        s.add(Dispatch(ticket_id=routed, route="triage.dept.billing", generation=0))
        s.flush()
        s.execute(
            Dispatch.__table__.update().values(  # type: ignore[attr-defined]
                created_at=utcnow() - timedelta(seconds=600)
            )
        )
        _outbox(s, routed, sent_ago=3 * 24 * 3600.0, task=DELIVER_TASK)
    statements: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if not executemany and statement.lstrip().upper().startswith(("SELECT", "DELETE")):
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        sweep_once(rt)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    assert any("dispatches" in sql for sql, _ in statements)
    assert any(sql.lstrip().upper().startswith("DELETE") for sql, _ in statements)

    engine = get_engine(pg_url)
    scanned: dict[str, list[str]] = {}
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        # Tables this small are read whole whatever the indexes; with sequential scans priced
        # out, a plan still reads one only where no index can serve the statement.
        raw.execute("SET enable_seqscan = off")
        for sql, params in statements:
            with raw.transaction(force_rollback=True):
                plan = raw.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()[0]
            found = _seq_scans(plan[0]["Plan"])
            if found & set(LARGE):
                scanned[sql] = sorted(found)
        raw.execute("RESET enable_seqscan")
    assert scanned == {}, json.dumps(scanned, indent=1)


def _seq_scans(node: dict[str, Any]) -> set[str]:
    found = {node["Relation Name"]} if node["Node Type"] == "Seq Scan" else set()
    for child in node.get("Plans", []):
        found |= _seq_scans(child)
    return found


def test_indexes_exist_on_a_migrated_database(pg_url):
    with get_engine(pg_url).connect() as conn:
        names = set(
            conn.scalars(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"))
        )
        assert {"ix_dispatches_undelivered", "ix_outbox_ticket", "ix_tickets_received"} <= names
        assert conn.scalar(select(func.count()).select_from(Ticket)) is not None

"""The claim, the same-text lookup and the wave's label statement find their rows by id, on a
PostgreSQL database that has a history and no statistics (a server without autovacuum, or
before its first ANALYZE of a table that grew fast).

Every state change adds an entry to `ix_tickets_state_changed`, and the entries of states a
ticket has left stay until a vacuum. Planned without statistics, the claim combined its ids
with a bitmap scan of that index's claimable states, which read every ticket's history, and
the lookup hashed the whole classifications table to match hashes that had no label. While
the table was small, the wave's lock read all of it when its ids came as a join with the
wave. Each statement is explained, unexecuted, on the connection that runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from tests.support.rows import add_label, add_ticket
from tests.support.services import fresh_database
from tests.support.stack import make_runtime, stack_env
from triage.classify.backends.base import ClassificationResult
from triage.classify.schema import TicketLabel
from triage.db.models import Classification, Ticket, TicketState
from triage.db.session import engine_of, session_scope
from triage.pipeline.classify_claims import claim_chunk
from triage.pipeline.classify_labels import _record_in_one_statement


@pytest.fixture
def rt(clean_redis: str) -> Iterator[Any]:
    with fresh_database("triage_plans") as (url, _name):
        runtime = make_runtime(stack_env(url, clean_redis))
        yield runtime
        engine_of(runtime.sessions).dispose()


def _with_history(rt: Any, history: int) -> None:
    """`history` routed tickets, each with a label, each moved through the states a worker
    moves it through (received, queued, classifying, routed), one update per state."""
    with session_scope(rt.sessions) as s:
        template = add_ticket(s, "the template", state=TicketState.RECEIVED.value)
        label = add_label(s, template)
        copied = [c.name for c in Ticket.__table__.columns if c.name not in ("id", "external_id")]
        s.execute(
            text(
                f"INSERT INTO tickets (external_id, {', '.join(copied)}) "
                f"SELECT 'history-' || n, {', '.join(copied)} FROM tickets, "
                "generate_series(1, :n) AS n WHERE tickets.id = :template"
            ),
            {"n": history - 1, "template": template.id},
        )
        # Each its own text, as with real tickets.
        s.execute(text("UPDATE tickets SET content_hash = md5(external_id) || md5(external_id)"))
        label_columns = [
            c.name for c in Classification.__table__.columns if c.name not in ("id", "ticket_id")
        ]
        s.execute(
            text(
                f"INSERT INTO classifications (ticket_id, {', '.join(label_columns)}) "
                f"SELECT t.id, {', '.join('c.' + name for name in label_columns)} "
                "FROM tickets t, classifications c WHERE c.id = :label AND t.id <> c.ticket_id"
            ),
            {"label": label.id},
        )
    for state in ("queued", "classifying", "routed"):
        with session_scope(rt.sessions) as s:
            s.execute(text("UPDATE tickets SET state = :state"), {"state": state})


def _explained(engine: Engine, table: str) -> tuple[list[str], Any]:
    """A list that fills with the plan of each statement that reads `table`, and the hook."""
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if f" {table}" not in statement or statement.lstrip().startswith(("BEGIN", "COMMIT")):
            return
        probe = cursor.connection.cursor()
        probe.execute("EXPLAIN " + statement, params)
        plans.append("\n".join(str(row[0]) for row in probe.fetchall()))
        probe.close()

    event.listen(engine, "before_cursor_execute", explain)
    return plans, explain


def _answer(rt: Any, n: int) -> ClassificationResult:
    return ClassificationResult(
        label=TicketLabel(
            intent="billing",
            department=rt.config.taxonomy.department_for("billing"),
            priority="high",
            language="en",
            sentiment="negative",
            confidence=0.93,
            summary=f"answer {n}",
        ),
        backend=rt.backend.name,
        model="claude-haiku-4-5",
        prompt_version="p1",
        latency_ms=500.0,
        calls=1,
    )


# A small table too: there a planner without statistics read the whole table to lock a
# wave's tickets when they came as a join with the wave.
@pytest.mark.parametrize("history", [300, 3000])
def test_a_claim_and_its_wave_find_their_tickets_by_id(rt, history):
    _with_history(rt, history)
    with session_scope(rt.sessions) as s:
        ids = [
            add_ticket(s, f"a new ticket {n}", state=TicketState.QUEUED.value).id for n in range(5)
        ]
    engine = engine_of(rt.sessions)
    plans, hook = _explained(engine, "tickets")
    try:
        claims = claim_chunk(rt, ids, True, {})
        wave = [(claim, _answer(rt, n)) for n, claim in enumerate(claims)]
        recorded = _record_in_one_statement(rt, wave)
    finally:
        event.remove(engine, "before_cursor_execute", hook)

    # The statements ran as well as being explained: every ticket claimed, labelled, routed.
    assert [c.ticket_id for c in claims] == ids
    assert sorted(recorded.label_ids) == ids
    assert {recorded.outcomes[i] for i in ids} == {"routed"}
    claim, lookup, label = (
        next(p for p in plans if marker in p)
        for marker in ("Update on tickets", "ix_tickets_content_hash", "Insert on classifications")
    )
    for plan in (claim, lookup, label):
        assert "ix_tickets_state_changed" not in plan, plan
    assert "Seq Scan on tickets" not in label, label
    assert "Seq Scan on classifications" not in lookup, lookup
    assert "Hash" not in lookup, lookup

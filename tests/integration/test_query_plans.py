"""Lookups that run per request or per operator command find their rows through an index, on
both databases, rather than reading a table that grows with every ticket.

The statements are the ones the code issues (captured as it runs them), each explained on the
same connection. On PostgreSQL sequential scans are priced out of the planner's choice: a plan
that still reads the whole table has no index it could use, and one that walks another index
end to end (the primary key's, say) is caught by naming the index the lookup needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from tests.support.rows import add_ticket
from triage.db.erasure import requester_ticket_ids
from triage.db.migrate import upgrade
from triage.db.repo import ticket_timeline, ticket_view
from triage.db.session import make_engine
from triage.reliability.deadletter import close_open_letters


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'plans.sqlite3'}"
        upgrade(url)
    engine = make_engine(url, pool_size=1)
    yield engine
    engine.dispose()


def _plans(engine: Engine, run: Callable[[Session], object], table: str) -> list[str]:
    """The plan of each statement `run` issues that reads `table`, as text."""
    plans: list[str] = []
    postgres = engine.dialect.name == "postgresql"

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if not re.search(rf"\b(FROM|UPDATE) {table}\b", statement):
            return
        probe = cursor.connection.cursor()
        probe.execute(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + statement, params)
        plans.append("\n".join(str(row[-1]) for row in probe.fetchall()))
        probe.close()

    event.listen(engine, "before_cursor_execute", explain)
    try:
        with Session(engine) as session, session.begin():
            if postgres:
                session.connection().exec_driver_sql("SET LOCAL enable_seqscan = off")
            run(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert plans, f"nothing read {table}"
    return plans


def _reads_whole_table(plan: str, table: str) -> bool:
    return f"Seq Scan on {table}" in plan or f"SCAN {table}" in plan


def test_erasure_by_email_looks_the_address_up_in_an_index(engine):
    for plan in _plans(engine, lambda s: requester_ticket_ids(s, " Ann@Example.com"), "tickets"):
        assert not _reads_whole_table(plan, "tickets"), plan
        assert "ix_tickets_requester_email" in plan, plan


def test_a_tickets_dead_letters_are_looked_up_in_an_index(engine):
    def read_and_close(session: Session) -> None:
        ticket = add_ticket(session, "Where is my refund?")
        assert ticket_view(session, ticket.id) is not None  # GET /tickets/{id}
        close_open_letters(session, ticket.id)  # the ticket classified again

    for plan in _plans(engine, read_and_close, "dead_letters"):
        assert not _reads_whole_table(plan, "dead_letters"), plan
        # Not the primary key's index walked end to end with a filter on ticket_id.
        assert "ix_dead_letters_ticket" in plan, plan


def test_a_tickets_reprocessing_is_looked_up_in_an_index(engine):
    def timeline(session: Session) -> None:
        ticket = add_ticket(session, "Where is my refund?")
        assert ticket_timeline(session, ticket.id)  # triage tickets show

    for plan in _plans(engine, timeline, "reprocess_items"):
        assert not _reads_whole_table(plan, "reprocess_items"), plan
        # Not the unique (run_id, ticket_id) index walked end to end.
        assert "ix_reprocess_items_ticket" in plan, plan

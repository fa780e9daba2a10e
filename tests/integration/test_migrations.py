"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, Table, create_engine, func, inspect, select
from sqlalchemy.orm import sessionmaker

from tests.support.rows import add_label, add_ticket
from tests.support.services import PG_ADMIN_URL, fresh_database, require_service
from triage.db.migrate import alembic_config, current_revision, head_revision, upgrade
from triage.db.models import Attempt, Base, Classification, Ticket, utcnow
from triage.db.session import get_engine, make_engine, normalize_url, session_scope


def _diff(url: str) -> list:
    # SQLite cannot reflect expression indexes, so Alembic leaves them out of the comparison
    # there (with a warning); test_query_plans checks the one we have is used on both.
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_postgresql_schema_matches_models_and_is_at_head(pg_url):
    assert _diff(pg_url) == []
    assert current_revision(get_engine(pg_url)) == head_revision(pg_url)


def test_sqlite_upgrade_from_empty_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade(url)
    assert _diff(url) == []
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"tickets", "classifications", "dispatches", "dead_letters", "outbox"} <= tables


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own at head, for a test that moves it between revisions."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'moving.sqlite3'}"
        upgrade(url)
        yield url
        return
    require_service("PostgreSQL", PG_ADMIN_URL)
    with fresh_database("triage_migrations") as (url, _name):
        yield url


def _revisions(url: str) -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(url))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _at(url: str) -> str | None:
    engine = create_engine(normalize_url(url))
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(empty_url):
    """Each revision's downgrade undoes exactly its upgrade: from every step down, the way
    back up to head builds the models' schema again (a leftover column or index would fail
    the upgrade, a missing one the comparison)."""
    cfg = alembic_config(empty_url)
    revisions = _revisions(empty_url)
    for below in reversed([None, *revisions[:-1]]):
        command.downgrade(cfg, below or "base")
        assert _at(empty_url) == below
        command.upgrade(cfg, "head")
        assert _diff(empty_url) == [], f"down to {below} and up again"
        command.downgrade(cfg, below or "base")
    engine = create_engine(normalize_url(empty_url))
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    command.upgrade(cfg, "head")
    assert _diff(empty_url) == []


def _insert(conn: Connection, table_name: str, **values: Any) -> int:
    """A row in the table as it is at the database's revision: `values`, and a plain value
    for every other required column."""
    table = Table(table_name, MetaData(), autoload_with=conn)
    sqlite = conn.dialect.name == "sqlite"
    row: dict[str, Any] = {}
    for column in table.columns:
        if column.primary_key or column.nullable or column.server_default is not None:
            continue
        plain: dict[type, Any] = {
            datetime: utcnow(),
            Decimal: Decimal("0"),
            float: 0.0,
            int: 0,
            str: "x",
        }
        # JSON reports `object` as its Python type.
        row[column.name] = plain.get(column.type.python_type, {})
    row.update(values)
    for name, value in row.items():
        if sqlite and isinstance(value, datetime):
            row[name] = value.astimezone(UTC).replace(tzinfo=None)
    return int(conn.execute(table.insert().values(row).returning(table.c.id)).scalar_one())


def test_upgrading_a_database_with_rows_keeps_them_and_fills_the_new_columns(empty_url):
    """From before 0005 (erasure), 0006 (reusable answers) and 0007 (generation start): the
    rows load through today's models, nothing is erased, and a ticket sent back through
    classification before 0007 counts its age bound from when it was sent back, not from
    receipt weeks ago (which would dead-letter it on its first transient failure)."""
    command.downgrade(alembic_config(empty_url), "0004")
    month_ago, minute_ago = utcnow() - timedelta(days=30), utcnow() - timedelta(minutes=1)
    engine = create_engine(normalize_url(empty_url))
    with engine.begin() as conn:
        first = _insert(
            conn,
            "tickets",
            external_id="a",
            state="routed",
            generation=0,
            requester_email="ann@example.com",
            received_at=month_ago,
            state_changed_at=month_ago,
        )
        again = _insert(
            conn,
            "tickets",
            external_id="b",
            state="queued",
            generation=1,
            received_at=month_ago,
            state_changed_at=minute_ago,
        )
        label = _insert(conn, "classifications", ticket_id=first, summary="Refund", confidence=0.9)
        attempt = _insert(conn, "attempts", ticket_id=again, number=1, outcome="retry", api_calls=1)
    engine.dispose()

    upgrade(empty_url)

    sessions = sessionmaker(create_engine(normalize_url(empty_url)))
    with sessions() as session:
        routed, requeued = session.get_one(Ticket, first), session.get_one(Ticket, again)
        assert (routed.requester_email, routed.erased_at) == ("ann@example.com", None)
        assert routed.generation_started_at is None  # its first generation: from received_at
        assert requeued.generation_started_at == minute_ago
        assert requeued.received_at == month_ago
        kept = session.get_one(Classification, label)
        assert (kept.summary, kept.first_answer_attempt_id) == ("Refund", None)
        logged = session.get_one(Attempt, attempt)
        assert (logged.api_calls, logged.answer) == (1, None)
    sessions.kw["bind"].dispose()


def test_downgrading_a_database_with_rows_keeps_the_rows_that_refer_to_tickets(empty_url):
    """SQLite rebuilds a table to drop a column (0007's downgrade rebuilds tickets). With
    foreign keys enforced, dropping the old table deleted, through ON DELETE CASCADE, every
    label, dispatch and attempt of every ticket."""
    sessions = sessionmaker(make_engine(empty_url, pool_size=1))
    with session_scope(sessions) as session:
        ticket = add_ticket(session, "Where is my refund?")
        add_label(session, ticket)
        session.add(Attempt(ticket_id=ticket.id, stage="classify", number=1, outcome="ok"))
    sessions.kw["bind"].dispose()

    command.downgrade(alembic_config(empty_url), "0004")
    upgrade(empty_url)

    sessions = sessionmaker(make_engine(empty_url, pool_size=1))
    with sessions() as session:
        counts = {
            model.__name__: session.scalar(select(func.count()).select_from(model))
            for model in (Ticket, Classification, Attempt)
        }
    sessions.kw["bind"].dispose()
    assert counts == {"Ticket": 1, "Classification": 1, "Attempt": 1}

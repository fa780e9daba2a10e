"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from triage.db.migrate import current_revision, head_revision, upgrade
from triage.db.models import Base
from triage.db.session import get_engine, normalize_url


def _diff(url: str) -> list:
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

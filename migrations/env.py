"""Alembic environment: the database URL comes from triage's settings, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from triage.config import Settings
from triage.db.models import Base
from triage.db.session import make_engine

target_metadata = Base.metadata


def _url() -> str:
    configured = context.config.get_main_option("sqlalchemy.url")
    return configured or Settings().database_url


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables for it.
        render_as_batch=sqlite,
        compare_type=True,
    )
    if sqlite:
        # A rebuild drops the old table, and with foreign keys enforced (as every triage
        # connection has them) that DROP deletes every row referring to it through ON DELETE
        # CASCADE: rebuilding tickets emptied classifications, dispatches and attempts. The
        # pragma is ignored inside a transaction, hence before it, and checked after.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if sqlite:
            _restore_foreign_keys(connection)


def _restore_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    connection.commit()
    if broken:
        raise RuntimeError(f"migration left rows referring to missing rows: {broken[:5]}")


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()

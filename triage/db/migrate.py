"""Schema changes through Alembic, callable from the CLI and from tests."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from triage.config import PROJECT_ROOT
from triage.db.session import normalize_url


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    # ConfigParser interpolation would choke on a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_current_schema(url: str) -> None:
    """Refuse to run against a database whose schema is behind the code (or missing)."""
    from triage.db.session import get_engine
    from triage.errors import ConfigError

    head = head_revision(url)
    applied = current_revision(get_engine(url))
    if applied != head:
        raise ConfigError(
            f"database schema is at {applied or 'nothing'}, this triage needs {head}: "
            "run `triage db upgrade`"
        )

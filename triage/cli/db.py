"""`triage db`: schema migrations."""

from __future__ import annotations

import typer

from triage.cli.common import console, guarded

app = typer.Typer(
    help="Database schema (Alembic).\n\nExample: triage db upgrade", no_args_is_help=True
)


@app.command()
@guarded
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION.

    Example: DATABASE_URL=postgresql://localhost/triage triage db upgrade
    """
    from triage.config import Settings
    from triage.db.migrate import upgrade as do_upgrade

    url = Settings().database_url
    do_upgrade(url, revision)
    console.print(f"database at [bold]{_redact(url)}[/] is at {revision}")


@app.command()
@guarded
def current() -> None:
    """Show the applied and the latest revision.

    Example: triage db current
    """
    from triage.config import Settings
    from triage.db.migrate import current_revision, head_revision
    from triage.db.session import get_engine

    url = Settings().database_url
    console.print(f"applied: {current_revision(get_engine(url))}  latest: {head_revision(url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)

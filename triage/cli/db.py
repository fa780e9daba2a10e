"""`triage db`: schema migrations."""

from __future__ import annotations

import typer
from rich.markup import escape

from triage.cli.common import EXIT_USAGE, console, fail, guarded

app = typer.Typer(
    help="Database schema (Alembic).\n\nExample: triage db upgrade", no_args_is_help=True
)


@app.command()
@guarded
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION.

    Example: DATABASE_URL=postgresql://localhost/triage triage db upgrade
    """
    from alembic.util import CommandError

    from triage.config import Settings
    from triage.db.migrate import current_revision
    from triage.db.migrate import upgrade as do_upgrade
    from triage.db.session import get_engine

    url = Settings().database_url
    try:
        do_upgrade(url, revision)
    except CommandError as exc:
        # An unknown revision: Alembic's own words, without its traceback.
        fail(f"db upgrade {revision}: {exc}", EXIT_USAGE)
    # What the database is at now, not the target named: upgrading to a revision it is
    # already past changes nothing.
    applied = current_revision(get_engine(url))
    console.print(f"database at [bold]{escape(_redact(url))}[/] is at {applied}", highlight=False)


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

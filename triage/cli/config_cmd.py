"""`triage config`: validate settings and config/ files."""

from __future__ import annotations

import os

import typer

from triage.cli.common import console, guarded, print_json

app = typer.Typer(
    help="Configuration.\n\nExample: triage config validate --json", no_args_is_help=True
)


@app.command()
@guarded
def validate(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Load and validate settings, taxonomy, model table and sinks; exit 2 naming what is
    wrong.

    Example: TRIAGE_CONFIG_DIR=./config triage config validate
    """
    from triage.config import load_config, unknown_triage_variables
    from triage.sinks.loader import load_sinks_file, secret_variables
    from triage.sinks.registry import load_sinks

    cfg = load_config()
    # Workers build the sinks at start-up: a misspelt department or an unset secret there must
    # fail here too, not pass validation and stop the worker (or, before, every delivery).
    load_sinks(cfg)
    _check_database_url(cfg.settings.database_url)
    sinks_file = cfg.settings.config_dir / "sinks.yaml"
    secrets = secret_variables(load_sinks_file(sinks_file)) if sinks_file.exists() else set()
    unknown = unknown_triage_variables(os.environ, secrets)
    summary = {
        "config_dir": str(cfg.settings.config_dir),
        "taxonomy": cfg.taxonomy.name,
        "taxonomy_version": cfg.taxonomy.version,
        "intents": len(cfg.taxonomy.intents),
        "departments": len(cfg.taxonomy.departments),
        "backend": cfg.settings.effective_backend(),
        "model": cfg.settings.model,
        "sinks": str(sinks_file) if sinks_file.exists() else "none (queue messages only)",
        "unknown_variables": unknown,
    }
    if as_json:
        print_json(summary)
        return
    for key, value in summary.items():
        if key != "unknown_variables":
            console.print(f"[bold]{key}[/]: {value}")
    for name in unknown:
        # On stderr, and not an error: other tools may use the prefix too.
        typer.echo(f"warning: {name} is set but is not a triage setting; ignored", err=True)
    console.print("[green]config is valid[/]")


def _check_database_url(url: str) -> None:
    """Parse DATABASE_URL and load its driver as start-up does, without connecting (that is
    `triage doctor`'s part): ArgumentError, reported naming DATABASE_URL, when it cannot."""
    from sqlalchemy.engine import make_url

    from triage.db.session import normalize_url

    make_url(normalize_url(url)).get_dialect()

"""The `triage` console script."""

from __future__ import annotations

import typer

from triage.cli import (
    backfill,
    config_cmd,
    db,
    dlq,
    doctor,
    reprocess,
    run,
    send,
    serve,
    stats,
    sweep,
    tickets,
)

app = typer.Typer(
    name="triage",
    help="Customer-support ticket triage: webhooks in, labels and department queues out.\n\n"
    "Example: triage doctor && triage tickets list --state needs_review",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.registered_commands += serve.app.registered_commands
app.registered_commands += run.app.registered_commands
app.registered_commands += send.app.registered_commands
app.registered_commands += reprocess.app.registered_commands
app.registered_commands += sweep.app.registered_commands
app.registered_commands += backfill.app.registered_commands
app.registered_commands += doctor.app.registered_commands
app.registered_commands += stats.app.registered_commands
app.add_typer(db.app, name="db")
app.add_typer(config_cmd.app, name="config")
app.add_typer(tickets.app, name="tickets")
app.add_typer(dlq.app, name="dlq")

if __name__ == "__main__":
    app()

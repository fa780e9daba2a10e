"""`triage tickets`: look at tickets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import select

from triage.cli.common import console, fail, guarded, print_json

app = typer.Typer(help="Inspect tickets.", no_args_is_help=True)


@app.command("show")
@guarded
def show(
    ticket_id: int = typer.Argument(..., help="Ticket id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one ticket: state, labels, dispatches, dead letters.

    Example: triage tickets show 42 --json
    """
    from triage.config import Settings
    from triage.db.repo import ticket_view
    from triage.db.session import get_sessionmaker

    with get_sessionmaker(Settings().database_url)() as session:
        view = ticket_view(session, ticket_id)
    if view is None:
        fail(f"ticket {ticket_id} not found")
    if as_json:
        print_json(view)
        return
    for key, value in view.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False)


@app.command("list")
@guarded
def list_tickets(
    state: str | None = typer.Option(None, help="Only this state."),
    limit: int = typer.Option(50, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List tickets, newest first.

    Example: triage tickets list --state needs_review --json
    """
    from triage.config import Settings
    from triage.db.models import Classification, Ticket
    from triage.db.session import get_sessionmaker

    stmt = (
        select(Ticket, Classification)
        .outerjoin(Classification, Classification.id == Ticket.current_classification_id)
        .order_by(Ticket.id.desc())
        .limit(limit)
    )
    if state:
        stmt = stmt.where(Ticket.state == state)
    with get_sessionmaker(Settings().database_url)() as session:
        rows = session.execute(stmt).all()
    data: list[dict[str, Any]] = [
        {
            "ticket_id": t.id,
            "source": t.source,
            "external_id": t.external_id,
            "state": t.state,
            "department": t.department,
            "intent": c.intent if c else None,
            "confidence": c.confidence if c else None,
            "received_at": t.received_at,
        }
        for t, c in rows
    ]
    if as_json:
        print_json(data)
        return
    table = Table(
        "id", "source", "external id", "state", "intent", "department", "conf", "received"
    )
    for row in data:
        received: datetime = row["received_at"]
        table.add_row(
            str(row["ticket_id"]),
            row["source"],
            row["external_id"],
            row["state"],
            row["intent"] or "-",
            row["department"] or "-",
            f"{row['confidence']:.2f}" if row["confidence"] is not None else "-",
            received.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)

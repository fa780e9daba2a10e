"""`triage tickets`: look at tickets."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from triage.cli import filters as opt
from triage.cli.common import (
    EXIT_USAGE,
    confirm_or_exit,
    console,
    fail,
    fmt_time,
    guarded,
    plain,
    print_json,
    shown_count,
)

app = typer.Typer(
    help="Inspect tickets.\n\nExample: triage tickets list --since 1d --json", no_args_is_help=True
)


@app.command("show")
@guarded
def show(
    ticket_id: int = typer.Argument(..., help="Ticket id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one ticket and its timeline: received, every attempt with its error, every
    classification (model, versions, tokens, cost, latency), dispatches, deliveries, dead
    letters and reprocessing.

    Example: triage tickets show 42 --json | jq '.timeline[] | select(.event=="attempt")'
    """
    from triage.config import Settings
    from triage.db.models import is_row_id
    from triage.db.repo import ticket_timeline, ticket_view
    from triage.db.session import get_sessionmaker

    if not is_row_id(ticket_id):
        fail(f"ticket {ticket_id} not found")
    with get_sessionmaker(Settings().database_url)() as session:
        view = ticket_view(session, ticket_id)
        timeline = ticket_timeline(session, ticket_id)
    if view is None:
        fail(f"ticket {ticket_id} not found")
    if as_json:
        print_json({**view, "timeline": timeline})
        return
    _print_view(view)
    table = Table("at (UTC)", "event", "detail", title=f"ticket {ticket_id}: timeline")
    for event in timeline:
        table.add_row(event["at"][:23].replace("T", " "), event["event"], plain(_detail(event)))
    console.print(table)


def _print_view(view: dict[str, Any]) -> None:
    label = view["labels"] or {}
    console.print(
        f"[bold]ticket {view['ticket_id']}[/] {escape(view['source'])}/"
        f"{escape(view['external_id'])}  state [bold]{view['state']}[/]  department "
        f"{escape(view['department'] or '-')}  generation {view['generation']}",
        highlight=False,
    )
    if label:
        console.print(
            plain(
                f"label: {label['intent']} ({label['confidence']:.2f}) priority "
                f"{label['priority']} language {label['language']} sentiment "
                f"{label['sentiment']} — {label['summary']}"
            ),
            highlight=False,
        )
    if view["review_reason"]:
        console.print(plain(f"review: {view['review_reason']}"), highlight=False)
    if view["last_error"]:
        console.print(f"[red]last error:[/] {escape(view['last_error'])}", highlight=False)


def _detail(event: dict[str, Any]) -> str:
    d = event["detail"]
    kind = event["event"]
    if kind == "attempt":
        text = f"{d['stage']} #{d['number']} {d['outcome']}"
        if d["latency_ms"] is not None:
            text += f" {d['latency_ms']:.0f} ms"
        if d["api_calls"]:
            text += f", {d['api_calls']} API calls ${d['cost_usd']}"
        if d["error"]:
            text += f" — {d['error_type']}: {d['error']}"
        return text
    if kind == "classification":
        mark = " (current)" if d["current"] else ""
        return (
            f"{d['intent']}/{d['department']} conf {d['confidence']:.2f}{mark}\n"
            f"{d['backend']} {d['model']} taxonomy {d['taxonomy_version']} prompt "
            f"{d['prompt_version']}\n{d['input_tokens']} in / {d['output_tokens']} out tokens, "
            f"${d['cost_usd']}, {d['latency_ms']:.0f} ms"
            + (f", reused #{d['reused_from_id']}" if d["reused_from_id"] else "")
        )
    if kind == "dispatch":
        text = f"{d['route']} (rule {d['rule']}, generation {d['generation']})"
        if d["sinks_done"]:
            text += f"\nsinks done (not sent again): {', '.join(d['sinks_done'])}"
        return text
    if kind == "dead_letter":
        return (
            f"#{d['id']} at {d['stage']} after {d['attempts']} attempts: "
            f"{d['error_type']}: {d['message']}"
        )
    if kind == "reprocessed":
        changed = "label changed" if d["label_changed"] else "label unchanged"
        return f"run {d['run_id']}: {d['outcome']}, {changed}" + (
            f" — {d['error']}" if d["error"] else ""
        )
    return ", ".join(f"{k} {v}" for k, v in d.items())


@app.command("list")
@guarded
def list_tickets(
    state: opt.State = None,
    intent: opt.Intent = None,
    department: opt.Department = None,
    source: opt.Source = None,
    since: opt.Since = None,
    until: opt.Until = None,
    confidence_below: opt.ConfidenceBelow = None,
    model: opt.Model = None,
    taxonomy_version: opt.TaxonomyVersion = None,
    limit: int = typer.Option(50, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List tickets, newest first, with their current label.

    Example: triage tickets list --state needs_review --since 7d --confidence-below 0.5 --json
    """
    from triage.config import Settings
    from triage.db.queries import ticket_select
    from triage.db.session import get_sessionmaker

    f = opt.ticket_filter(
        state=state,
        intent=intent,
        department=department,
        source=source,
        since=since,
        until=until,
        confidence_below=confidence_below,
        model=model,
        taxonomy_version=taxonomy_version,
        limit=limit,
    )
    settings = Settings()
    with get_sessionmaker(settings.database_url)() as session:
        if opt.names_label_fields(f):
            from triage.config import load_models, load_taxonomy

            taxonomy = load_taxonomy(settings.config_dir / "taxonomy.yaml")
            models = load_models(settings.config_dir / "models.yaml").models
            opt.check_label_names(session, f, taxonomy, models)
        # One row past the limit tells whether the listing is all there is.
        rows = session.execute(ticket_select(dataclasses.replace(f, limit=limit + 1))).all()
    more, rows = len(rows) > limit, rows[:limit]
    data: list[dict[str, Any]] = [
        {
            "ticket_id": t.id,
            "source": t.source,
            "external_id": t.external_id,
            "state": t.state,
            "department": t.department,
            "intent": c.intent if c else None,
            "confidence": c.confidence if c else None,
            "model": c.model if c else None,
            "taxonomy_version": c.taxonomy_version if c else None,
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
        table.add_row(
            str(row["ticket_id"]),
            plain(row["source"]),
            plain(row["external_id"]),
            row["state"],
            plain(row["intent"] or "-"),
            plain(row["department"] or "-"),
            f"{row['confidence']:.2f}" if row["confidence"] is not None else "-",
            fmt_time(row["received_at"]),
        )
    console.print(table)
    console.print(shown_count(len(data), "tickets", more=more), style="dim")


@app.command("erase")
@guarded
def erase(
    ticket_ids: list[int] = typer.Argument(None, help="Ticket ids.", show_default=False),
    email: str | None = typer.Option(
        None, "--email", help="Every ticket of this requester (case-insensitive)."
    ),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Erase tickets' personal data, for a data subject's request: subject, text, requester,
    helpdesk metadata, the model's summaries and error text. Labels, routing and cost stay,
    and the tickets are never classified again. It cannot be undone; the helpdesk keeps its
    own copy of the ticket.

    Tickets still being classified keep their text and are listed as in flight: run the
    command again once they have an outcome (it exits 1 until then, and for unknown ids).

    Example: triage tickets erase --email jane@example.com --yes --json
    """
    from triage.config import Settings
    from triage.db.erasure import Erasure, erase_tickets, requester_ticket_ids
    from triage.db.models import is_row_id
    from triage.db.session import get_sessionmaker, session_scope

    if bool(ticket_ids) == bool(email):
        fail("give ticket ids or --email (one of them)", EXIT_USAGE)
    sessions = get_sessionmaker(Settings().database_url)
    if email:
        with sessions() as session:
            ids = requester_ticket_ids(session, email)
    else:
        ids = list(dict.fromkeys(ticket_ids))
    # An id beyond the column's range names no ticket (PostgreSQL would refuse the query).
    unknown = [i for i in ids if not is_row_id(i)]
    ids = [i for i in ids if is_row_id(i)]
    report = Erasure()
    if ids:
        confirm_or_exit(
            f"Erase the personal data of {len(ids)} tickets? This cannot be undone", yes=yes
        )
        with session_scope(sessions) as session:
            report = erase_tickets(session, ids)
    report.missing.extend(unknown)
    if as_json:
        print_json(dataclasses.asdict(report))
    else:
        console.print(
            f"{len(report.erased)} tickets erased, {len(report.already)} erased before",
            highlight=False,
        )
        if report.in_flight:
            console.print(
                f"still being classified, not erased (run again later): {report.in_flight}",
                style="yellow",
                highlight=False,
            )
        if report.missing:
            console.print(f"no such tickets: {report.missing}", style="red", highlight=False)
    if report.in_flight or report.missing:
        raise typer.Exit(1)

"""`triage sweep`: one pass of the sweeper that recovers stuck work."""

from __future__ import annotations

import typer

from triage.cli.common import (
    console,
    fail,
    guarded,
    load_runtime,
    print_json,
    stop_if_broker_unreachable,
)

app = typer.Typer()


@app.command()
@guarded
def sweep(
    # At least a second: 0 read as "not given" (the setting), and a negative deadline would
    # count tickets received a moment ago as stuck and send them again.
    stuck_after: float | None = typer.Option(
        None,
        min=1,
        help="Seconds in a non-final state that count as stuck (default: the setting).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Publish outbox messages left behind, re-enqueue stuck tickets and undelivered
    dispatches, dead-letter dispatches to departments no longer configured, delete outbox
    rows sent longer ago than TRIAGE_OUTBOX_RETENTION_HOURS, and keep triage.dead to
    TRIAGE_DEAD_QUEUE_MAX_LENGTH messages, once
    (workers run this every TRIAGE_SWEEP_INTERVAL_SECONDS).

    Example: triage sweep --stuck-after 600 --json
    """
    from triage.reliability.sweeper import sweep_once

    rt = load_runtime()
    if not rt.settings.effective_broker_url():
        fail("no broker configured: set REDIS_URL or TRIAGE_BROKER_URL")
    stop_if_broker_unreachable(rt, "a pass now would publish and re-enqueue nothing")
    report = sweep_once(rt, stuck_after=stuck_after)
    data = {
        "relayed": report.relayed,
        "requeued_tickets": report.requeued_tickets,
        "requeued_deliveries": report.requeued_deliveries,
        "stranded_deliveries": report.stranded_deliveries,
        "pruned_outbox": report.pruned_outbox,
        "dropped_dead_notices": report.dropped_dead_notices,
    }
    if as_json:
        print_json(data)
    else:
        console.print(
            f"relayed {report.relayed} outbox messages; re-enqueued {report.requeued_tickets} "
            f"tickets and {report.requeued_deliveries} deliveries; dead-lettered "
            f"{report.stranded_deliveries} routed to a department that no longer exists; "
            f"deleted {report.pruned_outbox} outbox rows sent over "
            f"{rt.settings.outbox_retention_hours:g} h ago; dropped "
            f"{report.dropped_dead_notices} of triage.dead's oldest messages",
            highlight=False,
        )

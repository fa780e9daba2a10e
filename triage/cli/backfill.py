"""`triage backfill --batch`: bulk reclassification through the Message Batches API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from triage.cli import filters as opt
from triage.cli.common import (
    EXIT_PROBLEM,
    confirm_or_exit,
    console,
    err_console,
    fail,
    guarded,
    load_runtime,
    print_json,
    stop_if_broker_unreachable,
)
from triage.cli.progress import progress_bar

app = typer.Typer()


@app.command()
@guarded
def backfill(
    ticket_ids: list[int] | None = typer.Argument(None, help="Ticket ids (or use filters)."),
    batch: bool = typer.Option(
        False, "--batch", help="Use the Message Batches API (required; half price, async)."
    ),
    from_file: Path | None = typer.Option(
        None, "--from-file", help="File of ticket ids, one per line."
    ),
    state: opt.State = None,
    intent: opt.Intent = None,
    department: opt.Department = None,
    source: opt.Source = None,
    since: opt.Since = None,
    until: opt.Until = None,
    confidence_below: opt.ConfidenceBelow = None,
    model: opt.Model = None,
    taxonomy_version: opt.TaxonomyVersion = None,
    limit: int | None = typer.Option(None, help="Only the newest N matching tickets."),
    chunk_size: int = typer.Option(
        1000, help="Requests per batch (the API allows up to 100,000 and 256 MB)."
    ),
    poll_interval: float = typer.Option(30.0, min=0, help="Seconds between status polls."),
    submit_only: bool = typer.Option(
        False, "--submit-only", help="Create the batches and exit; run again to poll and import."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count and estimate; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    confirm_above: int = typer.Option(100, help="Ask before sending more than this many."),
    resume: int | None = typer.Option(None, help="Resume this run id (else: same selection)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Reclassify many finished tickets through the Message Batches API at the batch price.
    Batch ids are stored before polling: if this command is killed, run it again and it polls
    and imports the batches it created instead of creating new ones. Errored or expired items
    go back to the workers' normal classify path.

    Example: triage backfill --batch --since 30d --taxonomy-version 3f2a9c --yes
    """
    from triage.pipeline import reprocess as rp
    from triage.pipeline.backfill import BatchBackfill, check_batch_settings

    if not batch:
        fail("backfill needs --batch (for real-time reclassification use triage reprocess)", 2)
    f = opt.bulk_selection(
        ticket_ids,
        from_file,
        resume=resume,
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
    rt = load_runtime()
    # Before anything is recorded, and before a dry run estimates what could not be sent.
    check_batch_settings(rt.settings, chunk_size)
    with rt.sessions() as session:
        opt.check_label_names(session, f, rt.config.taxonomy, rt.config.models.models)
    if dry_run:
        # What the same command would do now: resume the run it would resume, sending only
        # what that run has not put in a batch yet.
        found = rp.find_run(rt, "batch", f, run_id=resume)
        ids = _unsent_tickets(rt, found.id) if found else rp.select_ids(rt, f)
        est = rp.estimate(rt, ids, batch=True)
        if as_json:
            print_json({**est.as_json(), "resuming_run": found.id if found else None})
            return
        if found is not None:
            console.print(f"would resume backfill run {found.id}", highlight=False)
        console.print(
            f"{est.tickets} tickets would be sent in batches to {est.model}: estimated "
            f"${est.cost_usd} at the batch price",
            highlight=False,
        )
        return
    # Before anything is paid for or recorded: with the broker down each imported label's
    # routing message would wait out a failed connection and stay in the outbox, and the run
    # would still end as a success.
    stop_if_broker_unreachable(rt, "backfilled tickets could not be routed")
    # Asked before the run is recorded: after a "no", a later backfill of the same selection
    # must start afresh, not resume the one that was turned down.
    earlier = rp.find_run(rt, "batch", f, run_id=resume)
    unsent = _unsent_tickets(rt, earlier.id) if earlier else rp.select_ids(rt, f)
    if len(unsent) > confirm_above:
        est = rp.estimate(rt, unsent, batch=True)
        confirm_or_exit(
            f"Send {len(unsent)} tickets to {est.model} in batches (estimated ${est.cost_usd})?",
            yes=yes,
        )
    run, resumed = rp.find_or_create_run(rt, "batch", f, run_id=resume)
    job = BatchBackfill(rt, run.id, chunk_size=chunk_size)
    before = job.progress()
    if resumed:
        err_console.print(
            f"resuming backfill run {run.id}: {before.batches_open} batches open, "
            f"{before.done} of {before.total} tickets done",
            highlight=False,
        )
    created = 0
    interrupted = False
    try:
        created = job.submit()
        if created:
            err_console.print(f"created {created} batches", highlight=False)
        if submit_only:
            _report(rt, run.id, job, as_json, created, interrupted=False)
            return
        _poll(job, poll_interval)
    except KeyboardInterrupt:
        # Whatever was created is persisted; a rerun submits the rest and polls them all.
        interrupted = True
    if interrupted:
        err_console.print(
            "interrupted: the batches keep running at Anthropic; run the same command again "
            "to poll and import them"
        )
    rp.summarize(rt, run.id, finish=True)
    _report(rt, run.id, job, as_json, created, interrupted=interrupted)
    if interrupted:
        raise typer.Exit(EXIT_PROBLEM)


def _poll(job: Any, interval: float) -> None:
    with progress_bar() as bar:
        task = bar.add_task("batches", total=max(1, job.progress().total))

        def show(p: Any) -> None:
            bar.update(task, total=max(1, p.total), completed=p.done + p.processed_in_batches)

        job.poll_until_done(interval=interval, on_progress=show)


def _unsent_tickets(rt: Any, run_id: int) -> list[int]:
    """The run's tickets not in a batch yet, less those erased since it chose them (they
    will not be sent)."""
    from sqlalchemy import select

    from triage.db.models import ReprocessItem, Ticket

    with rt.sessions() as session:
        return list(
            session.scalars(
                select(ReprocessItem.ticket_id)
                .join(Ticket, Ticket.id == ReprocessItem.ticket_id)
                .where(
                    ReprocessItem.run_id == run_id,
                    ReprocessItem.batch_id.is_(None),
                    ReprocessItem.done_at.is_(None),
                    Ticket.erased_at.is_(None),
                )
            )
        )


def _report(
    rt: Any, run_id: int, job: Any, as_json: bool, created: int, *, interrupted: bool
) -> None:
    from triage.pipeline.backfill import open_batches, skipped_tickets
    from triage.pipeline.reprocess import summarize

    summary = summarize(rt, run_id)
    batches = open_batches(rt, run_id)
    skipped = skipped_tickets(rt, run_id)
    data = {
        "run_id": run_id,
        "total": summary.total,
        "done": summary.done,
        "outcomes": summary.outcomes,
        "labels_changed": summary.labels_changed,
        "cost_usd": str(summary.cost_usd),
        "batches_created_now": created,
        "batches": batches,
        "interrupted": interrupted,
        "skipped": [{"ticket_id": i, "reason": why} for i, why in skipped.items()],
    }
    if as_json:
        print_json(data)
        return
    for b in batches:
        counts = ", ".join(f"{k} {v}" for k, v in (b["request_counts"] or {}).items() if v)
        console.print(
            f"batch {b['api_batch_id'] or '(not yet accepted)'}: {b['status']}, "
            f"{b['requests']} requests{' — ' + counts if counts else ''}",
            highlight=False,
        )
    if skipped:
        # The first few, then a count, as reprocess lists the tickets it leaves out.
        shown = "; ".join(f"ticket {i} ({why})" for i, why in list(skipped.items())[:10])
        more = f"; and {len(skipped) - 10:,} more" if len(skipped) > 10 else ""
        console.print(f"skipped {shown}{more}", highlight=False, soft_wrap=True)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())) or "none yet"
    console.print(
        f"run {run_id}: {summary.done}/{summary.total} done ({outcomes}); "
        f"{summary.labels_changed} labels changed; cost ${summary.cost_usd}",
        highlight=False,
    )

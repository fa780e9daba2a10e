"""`triage reprocess`: classify finished tickets again (inline, resumable, history kept)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from triage.cli import filters as opt
from triage.cli.common import (
    EXIT_PROBLEM,
    EXIT_USAGE,
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
def reprocess(
    ticket_ids: list[int] | None = typer.Argument(None, help="Ticket ids (or use filters)."),
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
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Count and estimate cost; change nothing."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    confirm_above: int = typer.Option(
        100, help="Ask before reprocessing more than this many tickets."
    ),
    concurrency: int = typer.Option(8, "--concurrency", "-c", min=1, help="Calls in flight."),
    resume: int | None = typer.Option(None, help="Resume this run id (else: same selection)."),
    stop_after: int | None = typer.Option(
        None, min=1, help="Process at most N tickets now; run again to continue."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Classify finished tickets again with the current taxonomy, prompt and model. Old labels
    stay as history; the ticket is routed by its new label. Interrupt with Ctrl-C and run the
    same command again: finished tickets are not redone. Respects the shared API limit.

    Example: triage reprocess --intent billing --since 30d --dry-run
    """
    from triage.pipeline import reprocess as rp

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
    with rt.sessions() as session:
        opt.check_label_names(session, f, rt.config.taxonomy, rt.config.models.models)
    skipped = _skipped_ids(rt, f, resume)
    if dry_run:
        _dry_run(rt, f, resume, stop_after, as_json)
        return
    # Before any ticket is reopened: with the broker down each new label's routing message
    # would wait out a failed connection and stay in the outbox, and the run would still end
    # as a success.
    stop_if_broker_unreachable(rt, "reprocessed tickets could not be routed")
    # Asked before the run is recorded: after a "no", a later run of the same command must
    # start afresh, not resume the selection that was turned down.
    earlier, planned = _would_reprocess(rt, f, resume, stop_after)
    if len(planned) > confirm_above:
        est = rp.estimate(rt, planned)
        where = f" (resuming run {earlier.id})" if earlier else ""
        confirm_or_exit(
            f"Reprocess {len(planned)} tickets with {est.model}{where} "
            f"(estimated ${est.cost_usd})?",
            yes=yes,
        )
    run, resumed = rp.find_or_create_run(rt, "inline", f, run_id=resume, allow_empty=False)
    pending = rp.pending_items(rt, run.id)
    if resumed:
        err_console.print(
            f"resuming run {run.id}: {run.total - len(pending)} of {run.total} already done",
            highlight=False,
        )
    if stop_after is not None:
        pending = pending[:stop_after]
    outcomes: Counter[str] = Counter()
    interrupted = _work(rt, pending, concurrency, outcomes)
    summary = rp.summarize(rt, run.id, finish=True)
    _print_summary(summary, as_json, interrupted, skipped)
    if outcomes["dead"]:
        # A permanent API error (a model the key may not use, say) dead-letters every ticket
        # it meets: a script must not read that run as a success. Nor retry it blindly: a
        # finished run is not resumed, the same command starts a new one and pays for every
        # ticket again.
        again = (
            "; running this command again would start a new run over every ticket"
            if summary.done >= summary.total
            else ""
        )
        err_console.print(
            f"{outcomes['dead']} tickets dead-lettered: `triage dlq list` shows why, "
            f"`triage dlq replay` retries them{again}",
            highlight=False,
            soft_wrap=True,
        )
    if interrupted or outcomes["dead"]:
        raise typer.Exit(EXIT_PROBLEM)


def _skipped_ids(rt: Any, f: Any, resume: int | None) -> dict[int, str]:
    """The named tickets this run leaves out, and why, said before anything starts. None when
    resuming: a run's own tickets are mid-reprocess, not finished, until it is done."""
    from triage.pipeline import reprocess as rp

    if not f.ids or resume is not None or rp.find_run(rt, "inline", f) is not None:
        return {}
    skipped = rp.ineligible_ids(rt, f.ids)
    # The first few, then a count: a file of stale ids would otherwise make one line of
    # thousands of reasons (--json lists every one).
    reasons = "; ".join(f"ticket {i} {why}" for i, why in list(skipped.items())[:10])
    if len(skipped) > 10:
        reasons += f"; and {len(skipped) - 10:,} more"
    if skipped and len(skipped) == len(f.ids):
        fail(
            f"nothing to reprocess: {reasons} (only finished tickets can be reprocessed)",
            EXIT_USAGE,
        )
    if skipped:
        err_console.print(f"skipping {reasons}", highlight=False, soft_wrap=True)
    return skipped


def _dry_run(rt: Any, f: Any, resume: int | None, stop_after: int | None, as_json: bool) -> None:
    """Estimate what the same command without --dry-run would do: resume the run it would
    resume (its pending tickets only), stop where --stop-after stops."""
    from triage.pipeline import reprocess as rp

    run, ticket_ids = _would_reprocess(rt, f, resume, stop_after)
    est = rp.estimate(rt, ticket_ids)
    if as_json:
        print_json({**est.as_json(), "resuming_run": run.id if run else None})
        return
    if run is not None:
        console.print(
            f"would resume run {run.id} ({run.total - len(rp.pending_items(rt, run.id))} of "
            f"{run.total} already done)",
            highlight=False,
        )
    _print_estimate(est)


def _would_reprocess(
    rt: Any, f: Any, resume: int | None, stop_after: int | None
) -> tuple[Any, list[int]]:
    """The run the command would resume (None: it would start one) and the tickets it would
    classify now: that run's pending ones, or the selection; at most --stop-after."""
    from triage.pipeline import reprocess as rp

    run = rp.find_run(rt, "inline", f, run_id=resume)
    ticket_ids = rp.pending_ticket_ids(rt, run.id) if run else rp.select_ids(rt, f)
    if stop_after is not None:
        ticket_ids = ticket_ids[:stop_after]
    return run, ticket_ids


def _work(rt: Any, item_ids: list[int], concurrency: int, outcomes: Counter[str]) -> bool:
    """Run the items on a thread pool with a progress bar, counting their outcomes. Returns
    True when interrupted (Ctrl-C): no new items start, the ones already running finish and
    are marked done."""
    from triage.pipeline.reprocess import reprocess_item

    if not item_ids:
        return False
    queue = iter(item_ids)
    in_flight: set[Future[Any]] = set()
    interrupted = False
    with progress_bar() as bar, ThreadPoolExecutor(concurrency, "reprocess") as pool:
        task = bar.add_task(RUNNING, total=len(item_ids))
        pause = _PauseNotice(rt, bar, task)
        try:
            for item_id in queue:
                in_flight.add(pool.submit(reprocess_item, rt, item_id))
                if len(in_flight) >= concurrency * 2:
                    in_flight = _drain(in_flight, bar, task, outcomes, pause)
            while in_flight:
                in_flight = _drain(in_flight, bar, task, outcomes, pause)
        except KeyboardInterrupt:
            interrupted = True
            err_console.print("interrupted: finishing the tickets in flight…")
            # Up to twice the concurrency is submitted; the queued ones have not called the
            # API yet and stay pending for the rerun instead of being paid for after Ctrl-C.
            started = {future for future in in_flight if not future.cancel()}
            wait(started)
            _collect(started, bar, task, outcomes)
    if interrupted:
        err_console.print("run the same command again to continue where this one stopped")
    return interrupted


RUNNING = "reprocessing"
# How long the run waits for a ticket to finish before it looks at the circuit breaker, to
# say why nothing moves.
PAUSE_CHECK_SECONDS = 2.0


class _PauseNotice:
    """Says so when the run stalls on an open circuit: the calls wait for it without a bound
    (this process has nothing else to do), and a bar that stops moving for a cool-down of
    minutes, after a 401 say, looks like a hang. One line when the pause begins (why, and
    what to do) and one when calls go again."""

    def __init__(self, rt: Any, bar: Any, task: Any) -> None:
        self._rt = rt
        self._bar = bar
        self._task = task
        self._paused = False

    def check(self) -> None:
        admission = self._rt.admission
        if admission is None:
            return
        try:
            reason = admission.breaker.open_reason()
            left = admission.breaker.open_seconds()
        except Exception:  # noqa: BLE001 - only a notice; the calls decide without Redis too
            return
        if reason is not None and not self._paused:
            self._paused = True
            self._bar.update(self._task, description=f"paused: circuit open ({reason})")
            err_console.print(_pause_message(reason, left), highlight=False, soft_wrap=True)
        elif reason is None and self._paused:
            self._paused = False
            self._bar.update(self._task, description=RUNNING)
            err_console.print("circuit closed: reprocessing goes on", highlight=False)

    @property
    def paused(self) -> bool:
        return self._paused


def _pause_message(reason: str, left: float) -> str:
    from triage.reliability.limits import API_KEY_REJECTED

    when = f"the next try in {left:.0f}s" if left > 0 else "a probe call under way"
    if reason == API_KEY_REJECTED:
        why = "the API rejected the key (401); check ANTHROPIC_API_KEY (the workers are paused too)"
    else:
        why = "the API answered overloaded or rate-limited too often"
    return (
        f"paused: the API circuit is open ({reason}): {why}. The run waits for it to close "
        f"({when}); Ctrl-C stops it, and the same command continues later"
    )


def _drain(
    in_flight: set[Future[Any]],
    bar: Any,
    task: Any,
    outcomes: Counter[str],
    pause: _PauseNotice,
) -> set[Future[Any]]:
    while True:
        done, rest = wait(in_flight, timeout=PAUSE_CHECK_SECONDS, return_when=FIRST_COMPLETED)
        if done:
            break
        pause.check()
    if pause.paused:
        pause.check()
    _collect(done, bar, task, outcomes)
    return rest


def _collect(done: set[Future[Any]], bar: Any, task: Any, outcomes: Counter[str]) -> None:
    for future in done:
        # An unexpected error stops the run with its message.
        outcomes[future.result().outcome] += 1
        bar.advance(task)


def _print_estimate(est: Any) -> None:
    console.print(
        f"{est.tickets} tickets would be reprocessed with {est.model}: about "
        f"{est.input_tokens:,} input and {est.output_tokens:,} output tokens, "
        f"estimated ${est.cost_usd} (list price, an upper bound)",
        highlight=False,
    )


def _print_summary(summary: Any, as_json: bool, interrupted: bool, skipped: dict[int, str]) -> None:
    data = {
        "run_id": summary.run_id,
        "total": summary.total,
        "done": summary.done,
        "outcomes": summary.outcomes,
        "labels_changed": summary.labels_changed,
        "cost_usd": str(summary.cost_usd),
        "interrupted": interrupted,
        "skipped": [{"ticket_id": i, "reason": why} for i, why in skipped.items()],
    }
    if as_json:
        print_json(data)
        return
    table = Table("run", "done", "labels changed", "cost", "outcomes")
    table.add_row(
        str(summary.run_id),
        f"{summary.done}/{summary.total}",
        str(summary.labels_changed),
        f"${summary.cost_usd}",
        ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())) or "-",
    )
    console.print(table)

"""`triage dlq`: dead letters — list, show, replay, purge."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Select, delete, select

from triage.cli import filters as opt
from triage.cli.common import (
    EXIT_PROBLEM,
    EXIT_USAGE,
    confirm_or_exit,
    console,
    err_console,
    fail,
    fmt_time,
    guarded,
    load_runtime,
    plain,
    print_json,
    shown_count,
)
from triage.db.models import DeadLetter, Ticket, is_row_id
from triage.errors import TriageError

app = typer.Typer(
    help="Dead letters: tickets that could not complete a stage.\n\n"
    "Example: triage dlq list --since 1d",
    no_args_is_help=True,
)


# The stages that dead-letter a ticket (classify_stage, deliver_stage, the sweeper).
STAGES = ("classify", "deliver")


def _letters(
    *,
    stage: str | None,
    error_type: str | None,
    since: str | None,
    until: str | None,
    include_replayed: bool,
    limit: int | None,
) -> Select[DeadLetter]:
    if stage is not None and stage not in STAGES:
        fail(f"--stage {stage!r}: one of {', '.join(STAGES)}", EXIT_USAGE)
    stmt = select(DeadLetter)
    if not include_replayed:
        stmt = stmt.where(DeadLetter.replayed_at.is_(None))
    if stage:
        stmt = stmt.where(DeadLetter.stage == stage)
    if error_type:
        stmt = stmt.where(DeadLetter.error_type == error_type)
    start, end = opt.parse_window(since, until)
    if start is not None:
        stmt = stmt.where(DeadLetter.created_at >= start)
    if end is not None:
        stmt = stmt.where(DeadLetter.created_at < end)
    stmt = stmt.order_by(DeadLetter.id.desc())
    return stmt.limit(limit) if limit else stmt


def _check_error_type(rt: Any, error_type: str | None) -> None:
    """An --error-type that no letter has and triage never raises is a typo: it would match
    nothing, and `replay` would answer "no matching dead letters" with exit 0."""
    if error_type is None or error_type in _error_names(TriageError):
        return
    with rt.sessions() as session:
        seen = session.scalar(
            select(DeadLetter.id).where(DeadLetter.error_type == error_type).limit(1)
        )
    if seen is None:
        known = ", ".join(sorted(_error_names(TriageError)))
        fail(f"--error-type {error_type!r}: no dead letter has it (one of {known})", EXIT_USAGE)


def _error_names(error: type[TriageError]) -> set[str]:
    """The error types a letter can record: TriageError and everything below it."""
    names = {error.__name__}
    for sub in error.__subclasses__():
        names |= _error_names(sub)
    return names


def _row(dl: DeadLetter) -> dict[str, Any]:
    return {
        "id": dl.id,
        "ticket_id": dl.ticket_id,
        "stage": dl.stage,
        "error_type": dl.error_type,
        "message": dl.message,
        "attempts": dl.attempts,
        "first_failed_at": dl.first_failed_at,
        "last_failed_at": dl.last_failed_at,
        "request_id": dl.request_id,
        "replayed_at": dl.replayed_at,
    }


Stage = typer.Option(None, help="Only this stage (classify, deliver).")
# The letter's time, not its ticket's: `purge --until 30d` goes by when tickets failed.
Since = Annotated[
    str | None, typer.Option(help="Dead-lettered at or after: 7d, 12h or an ISO date/time (UTC).")
]
Until = Annotated[
    str | None, typer.Option(help="Dead-lettered before: 7d, 12h or an ISO date/time (UTC).")
]
ErrorType = typer.Option(None, help="Only this error type (e.g. InvalidOutput).")


@app.command("list")
@guarded
def list_letters(
    stage: str | None = Stage,
    error_type: str | None = ErrorType,
    since: Since = None,
    until: Until = None,
    include_replayed: bool = typer.Option(False, "--all", help="Include replayed letters."),
    limit: int = typer.Option(50, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List open dead letters, newest first.

    Example: triage dlq list --stage classify --since 1d --json
    """
    opt.check_limit(limit)
    rt = load_runtime()
    _check_error_type(rt, error_type)
    stmt = _letters(
        stage=stage,
        error_type=error_type,
        since=since,
        until=until,
        include_replayed=include_replayed,
        # One past the limit tells whether the listing is all there is.
        limit=limit + 1,
    )
    with rt.sessions() as session:
        rows = [_row(dl) for dl in session.scalars(stmt)]
    more, rows = len(rows) > limit, rows[:limit]
    if as_json:
        print_json(rows)
        return
    table = Table("id", "ticket", "stage", "error", "attempts", "last failed", "replayed")
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["ticket_id"]),
            r["stage"],
            plain(f"{r['error_type']}: {r['message'][:80]}"),
            str(r["attempts"]),
            fmt_time(r["last_failed_at"]),
            fmt_time(r["replayed_at"]),
        )
    console.print(table)
    console.print(shown_count(len(rows), "dead letters", more=more), style="dim")


@app.command("show")
@guarded
def show(
    letter_id: int = typer.Argument(..., help="Dead letter id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one dead letter: the error, its payload and the ticket it belongs to.

    Example: triage dlq show 7
    """
    if not is_row_id(letter_id):
        fail(f"dead letter {letter_id} not found")
    rt = load_runtime()
    with rt.sessions() as session:
        dl = session.get(DeadLetter, letter_id)
        if dl is None:
            fail(f"dead letter {letter_id} not found")
        ticket = session.get(Ticket, dl.ticket_id)
        data = {
            **_row(dl),
            "payload": dl.payload,
            "ticket": None
            if ticket is None
            else {"id": ticket.id, "state": ticket.state, "subject": ticket.subject},
        }
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        shown = fmt_time(value) if key.endswith("_at") else value
        console.print(f"[bold]{key}[/]: {escape(str(shown))}", highlight=False)


@app.command("replay")
@guarded
def replay(
    letter_ids: list[int] | None = typer.Argument(None, help="Dead letter ids."),
    replay_all: bool = typer.Option(False, "--all", help="Every open dead letter."),
    stage: str | None = Stage,
    error_type: str | None = ErrorType,
    since: Since = None,
    until: Until = None,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Send dead-lettered tickets back through the stage that failed (history kept). By ids,
    by filters, or --all; asks first when more than one letter is chosen by filter.

    Example: triage dlq replay --stage classify --error-type TransientError --yes
    """
    by_filter = replay_all or any((stage, error_type, since, until))
    if not letter_ids and not by_filter:
        fail("choose letters: ids, filters (--stage, --since, ...) or --all", EXIT_USAGE)
    if letter_ids and by_filter:
        # Named letters were replayed whatever the filters said: `replay 7 --stage deliver`
        # replayed letter 7 at classify.
        fail("choose letters by ids or by filters/--all, not both", EXIT_USAGE)
    rt = load_runtime()
    if letter_ids:
        ids = list(dict.fromkeys(letter_ids))
        _require_letters(rt, ids)
    else:
        _check_error_type(rt, error_type)
        stmt = _letters(
            stage=stage,
            error_type=error_type,
            since=since,
            until=until,
            include_replayed=False,
            limit=None,
        )
        with rt.sessions() as session:
            ids = [dl.id for dl in session.scalars(stmt)]
        if not ids and not as_json:
            console.print("no matching dead letters")
            return
        if len(ids) > 1:
            confirm_or_exit(f"Replay {len(ids)} dead letters?", yes=yes)
    replayed: list[dict[str, Any]] = []
    skipped: list[int] = []
    unsent: list[int] = []
    interrupted = _replay_each(rt, ids, replayed, skipped, unsent)
    if as_json:
        print_json({"replayed": replayed, "skipped": skipped})
    else:
        _print_replayed(replayed, skipped)
    if unsent:
        err_console.print(
            f"the broker did not take the messages of {len(unsent)} replayed tickets: they "
            "wait in the outbox until a worker's sweeper (or `triage sweep`) sends them once "
            "the broker is back",
            highlight=False,
            soft_wrap=True,
        )
    if interrupted:
        err_console.print(
            f"interrupted after {len(replayed) + len(skipped)} of {len(ids)} letters; run the "
            "same command again to replay the rest",
            highlight=False,
        )
    if interrupted or unsent:
        raise typer.Exit(EXIT_PROBLEM)


def _replay_each(
    rt: Any,
    ids: list[int],
    replayed: list[dict[str, Any]],
    skipped: list[int],
    unsent: list[int],
) -> bool:
    """Replay the letters, one transaction each: one bad letter must not hold back the
    others. Returns True when Ctrl-C stopped it. The letters replayed so far stay replayed (a
    message not yet published waits in the outbox for the sweeper) and are reported; the
    rest stay open for the same command to pick up. `unsent` gets the tickets whose message
    a configured broker did not take."""
    from triage.reliability.deadletter import replay as replay_letter

    # Without a broker configured (beside `triage run`) the outbox is the way, not a failure.
    configured = publishing = rt.settings.effective_broker_url() is not None
    try:
        for letter_id in ids:
            with rt.sessions.begin() as session:
                result = replay_letter(session, letter_id)
            if result is None:
                skipped.append(letter_id)
                continue
            replayed.append(
                {"dead_letter_id": letter_id, "ticket_id": result.ticket_id, "stage": result.stage}
            )
            if publishing and rt.publisher.publish([result.outbox_id]) == 0:
                # The broker is down: leave the rest in the outbox as well, for the sweeper,
                # rather than wait out a failed connection for every letter.
                publishing = False
            if not publishing and configured:
                unsent.append(result.ticket_id)
    except KeyboardInterrupt:
        return True
    return False


def _print_replayed(replayed: list[dict[str, Any]], skipped: list[int]) -> None:
    for r in replayed:
        console.print(
            f"replayed dead letter {r['dead_letter_id']}: ticket {r['ticket_id']} back to "
            f"{r['stage']}",
            highlight=False,
        )
    if skipped:
        console.print(
            f"skipped {len(skipped)} (not found, already replayed, or the ticket moved on): "
            + ", ".join(map(str, skipped)),
            highlight=False,
        )


def _require_letters(rt: Any, ids: list[int]) -> None:
    """Named letters must exist: a mistyped id is an error before anything is replayed, not a
    "skipped" line after the others were."""
    valid = [i for i in ids if is_row_id(i)]
    with rt.sessions() as session:
        found = set(session.scalars(select(DeadLetter.id).where(DeadLetter.id.in_(valid))))
    missing = [i for i in ids if i not in found]
    if missing:
        noun = "dead letter" if len(missing) == 1 else "dead letters"
        fail(f"{noun} {', '.join(map(str, missing))} not found")


@app.command("purge")
@guarded
def purge(
    include_open: bool = typer.Option(
        False, "--include-open", help="Also delete letters never replayed (cannot be undone)."
    ),
    stage: str | None = Stage,
    error_type: str | None = ErrorType,
    since: Since = None,
    until: Until = None,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Delete dead-letter records: replayed ones by default, open ones too with
    --include-open. Tickets are kept (a purged open letter's ticket stays dead_lettered).

    Example: triage dlq purge --until 30d --yes
    """
    rt = load_runtime()
    _check_error_type(rt, error_type)
    stmt = _letters(
        stage=stage,
        error_type=error_type,
        since=since,
        until=until,
        include_replayed=True,
        limit=None,
    )
    if not include_open:
        stmt = stmt.where(DeadLetter.replayed_at.is_not(None))
    with rt.sessions() as session:
        ids = [dl.id for dl in session.scalars(stmt)]
    if ids:
        what = "dead letters (including open ones)" if include_open else "replayed dead letters"
        confirm_or_exit(f"Delete {len(ids)} {what}?", yes=yes)
        with rt.sessions.begin() as session:
            for start in range(0, len(ids), 1000):
                session.execute(
                    delete(DeadLetter).where(DeadLetter.id.in_(ids[start : start + 1000]))
                )
    if as_json:
        print_json({"purged": len(ids)})
    else:
        console.print(f"purged {len(ids)} dead letters")

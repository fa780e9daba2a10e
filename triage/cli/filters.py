"""The ticket filter options every selecting command shares, declared once."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from sqlalchemy import select

from triage.cli.common import EXIT_USAGE, fail
from triage.db.models import MAX_ROW_ID, Classification, Ticket, TicketState, is_row_id
from triage.db.queries import TicketFilter

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from triage.taxonomy import Taxonomy

_RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(value: str | None, *, option: str) -> datetime | None:
    """`7d`, `12h`, `30m`, `2w` (ago), an ISO date or an ISO datetime (UTC unless given)."""
    if value is None:
        return None
    text = value.strip()
    match = _RELATIVE.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        try:
            return datetime.now(UTC) - timedelta(**{_UNITS[unit]: amount})
        except OverflowError:
            # timedelta and datetime stop at year 1; "that long ago" has no moment to stand for.
            fail(f"{option} {value!r}: too far back (before the year 1)", EXIT_USAGE)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{option} {value!r}: use 7d, 12h, 30m or an ISO date like 2026-11-01", EXIT_USAGE)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """`--since` and `--until` together, which must leave some time between them: `--since 7d
    --until 30d` (written backwards for "from 30 to 7 days ago") would match nothing."""
    start = parse_moment(since, option="--since")
    end = parse_moment(until, option="--until")
    if start is not None and end is not None and start >= end:
        fail(
            f"--since {since!r} is not before --until {until!r}: nothing is in that window",
            EXIT_USAGE,
        )
    return start, end


State = Annotated[
    list[str] | None,
    typer.Option("--state", help="Only tickets in this state (repeatable)."),
]
Intent = Annotated[str | None, typer.Option(help="Only this current intent.")]
Department = Annotated[str | None, typer.Option(help="Only this department.")]
Source = Annotated[str | None, typer.Option(help="Only this source (generic, zendesk, ...).")]
# A date/time without an offset is UTC, as every time the CLI prints is.
Since = Annotated[
    str | None, typer.Option(help="Received at or after: 7d, 12h or an ISO date/time (UTC).")
]
Until = Annotated[
    str | None, typer.Option(help="Received before: 7d, 12h or an ISO date/time (UTC).")
]
ConfidenceBelow = Annotated[
    float | None, typer.Option(help="Only current labels with confidence below this (0 to 1).")
]
Model = Annotated[str | None, typer.Option(help="Only labels from this model.")]
TaxonomyVersion = Annotated[
    str | None, typer.Option(help="Only labels made under this taxonomy version.")
]


def check_limit(limit: int | None) -> None:
    """`--limit` is a count of rows wanted; 0 or less is a mistake, not "no limit"."""
    if limit is not None and limit < 1:
        fail("--limit must be at least 1", EXIT_USAGE)


def check_source(source: str | None) -> None:
    from triage.ingest.sources.registry import SOURCES

    if source is not None and source not in SOURCES:
        fail(f"--source {source!r}: one of {', '.join(sorted(SOURCES))}", EXIT_USAGE)


def names_label_fields(f: TicketFilter) -> bool:
    return any(v is not None for v in (f.department, f.intent, f.model, f.taxonomy_version))


def check_label_names(
    session: Session, f: TicketFilter, taxonomy: Taxonomy, models: Collection[str]
) -> None:
    """--department, --intent, --model and --taxonomy-version name one the config knows now
    (the taxonomy, the model table), or one that tickets had before it changed. Anything else
    is a typo, which would match nothing and say so only as "0 tickets", exit 0 (or, for a
    backfill, as an empty run)."""
    checks = (
        ("--department", f.department, taxonomy.department_names, Ticket.department),
        ("--intent", f.intent, taxonomy.intent_names, Classification.intent),
        ("--model", f.model, tuple(models), Classification.model),
        (
            "--taxonomy-version",
            f.taxonomy_version,
            (taxonomy.version,),
            Classification.taxonomy_version,
        ),
    )
    for option, name, current, column in checks:
        if name is None or name in current:
            continue
        if session.scalar(select(column).where(column == name).limit(1)) is None:
            fail(
                f"{option} {name!r}: not in the config and no ticket has had it "
                f"(one of {', '.join(sorted(current))})",
                EXIT_USAGE,
            )


def ticket_filter(
    *,
    state: list[str] | None = None,
    intent: str | None = None,
    department: str | None = None,
    source: str | None = None,
    since: str | None = None,
    until: str | None = None,
    confidence_below: float | None = None,
    model: str | None = None,
    taxonomy_version: str | None = None,
    limit: int | None = None,
    ids: list[int] | None = None,
) -> TicketFilter:
    states = tuple(state or ())
    known = {s.value for s in TicketState}
    for s in states:
        if s not in known:
            fail(f"--state {s!r}: one of {', '.join(sorted(known))}", EXIT_USAGE)
    check_source(source)
    check_limit(limit)
    # Confidences run from 0 to 1: `--confidence-below 50` (meant as 0.5) would choose every
    # labelled ticket, and a reprocess would pay for all of them.
    if confidence_below is not None and not 0 < confidence_below <= 1:
        fail(
            f"--confidence-below {confidence_below:g}: a confidence is between 0 and 1 (e.g. 0.5)",
            EXIT_USAGE,
        )
    start, end = parse_window(since, until)
    return TicketFilter(
        ids=tuple(ids or ()),
        states=states,
        intent=intent,
        department=department,
        source=source,
        since=start,
        until=end,
        confidence_below=confidence_below,
        model=model,
        taxonomy_version=taxonomy_version,
        limit=limit,
        # As typed: `--since 7d` run again tomorrow is the same command (and resumes its run).
        extra={k: v for k, v in (("since", since), ("until", until)) if v is not None},
    )


def read_ids(path: Path) -> list[int]:
    """Ticket ids from a file: one per line (or separated by spaces/commas); # comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"--from-file {path}: {exc.strerror or exc}", EXIT_USAGE)
    ids: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            if not token.isdigit() or not is_row_id(int(token)):
                fail(f"{path}:{number}: {token!r} is not a ticket id", EXIT_USAGE)
            ids.append(int(token))
    return ids


# The ids go to the database as one IN list, a bind parameter each: PostgreSQL refuses a
# statement with more than 65,535 (with the other filters', and SQLite builds before 3.32 stop
# at 999, newer ones at 32,766), and said so as a "database error" that blamed DATABASE_URL.
MAX_NAMED_IDS = 30_000


def bulk_selection(
    ticket_ids: list[int] | None,
    from_file: Path | None,
    *,
    resume: int | None,
    **filters: Any,
) -> TicketFilter:
    """The tickets a bulk command (reprocess, backfill) acts on: ids given, ids from a file and
    filters. Refuses an empty selection unless a run is being resumed: "everything" must be
    asked for with a filter, never by forgetting one."""
    ids = list(ticket_ids or [])
    for ticket_id in ids:
        if not is_row_id(ticket_id):
            fail(f"{ticket_id} is not a ticket id (1 to {MAX_ROW_ID})", EXIT_USAGE)
    if resume is not None and not is_row_id(resume):
        fail(f"--resume {resume}: no run with that id", EXIT_USAGE)
    if from_file is not None:
        ids += read_ids(from_file)
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_NAMED_IDS:
        fail(
            f"{len(ids):,} ticket ids: at most {MAX_NAMED_IDS:,} per run; split the list and "
            "run once per part",
            EXIT_USAGE,
        )
    selection = ticket_filter(ids=ids, **filters)
    if selection.is_empty and resume is None:
        fail(
            "choose tickets: ids, --from-file, filters (e.g. --since 30d) or --resume RUN",
            EXIT_USAGE,
        )
    return selection

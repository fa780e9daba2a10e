"""Reprocessing: classify finished tickets again, inline in the calling process.

Why inline and not through the workers: the operator wants a progress bar, a count of changed
labels when it ends, and a command that can be interrupted and run again without paying twice.
All three are simple when the process that counts is the one that classifies; through the
queue they would need a results channel. Each ticket still goes through the one classify stage
(`classify_ticket_stage`: claim, shared API limit, backend, Classification row, routing,
dispatch), so a reprocessed ticket is indistinguishable from one the workers labelled, and a
transient failure is handed to the workers' normal retry path.

Resumability: a run freezes its selection as `reprocess_items` rows when it starts; an item's
`done_at` marks it finished. A rerun of the same selection (or `--resume RUN`) skips finished
items. An item interrupted between reopening its ticket and recording the label is finished
by whichever comes first: the rerun (which classifies it, the claim keeping a worker's sweeper
out) or a worker (after which the rerun only records the outcome).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from triage.classify.prompt import estimate_input_tokens
from triage.db.erasure import NOTHING_TO_CLASSIFY
from triage.db.models import (
    Classification,
    ReprocessItem,
    ReprocessRun,
    Ticket,
    TicketState,
    utcnow,
)
from triage.db.queries import TicketFilter, ticket_ids_select
from triage.db.session import session_scope
from triage.errors import ConfigError
from triage.pipeline.classify_labels import REOPENABLE, reopen
from triage.pipeline.classify_requests import build_request
from triage.pipeline.classify_stage import classify_ticket_stage
from triage.pipeline.runtime import Runtime

S = TicketState
# A label's output is ~80 tokens; used for estimates until there is history to average.
DEFAULT_OUTPUT_TOKENS = 80


def selection_key(kind: str, f: TicketFilter) -> str:
    """Equal for the same command over the same tickets; how a rerun finds its run."""
    selection = f.describe()
    # Relative windows (`--since 7d`) are keyed as typed, not as the moment they resolved to.
    selection.update(selection.pop("extra", {}))
    text = json.dumps({"kind": kind, **selection}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def eligible(f: TicketFilter) -> TicketFilter:
    """Only finished tickets can be reprocessed: in-flight ones are the workers'. Erased ones
    have no text left to classify."""
    allowed = {s.value for s in REOPENABLE}
    if f.states:
        bad = sorted(set(f.states) - allowed)
        if bad:
            raise ConfigError(
                f"--state {', '.join(bad)}: only finished tickets can be reprocessed "
                f"({', '.join(sorted(allowed))})"
            )
        return dataclasses.replace(f, classifiable=True)
    return dataclasses.replace(f, states=tuple(sorted(allowed)), classifiable=True)


def select_ids(rt: Runtime, f: TicketFilter) -> list[int]:
    with rt.sessions() as session:
        return list(session.scalars(ticket_ids_select(eligible(f))))


@dataclass(frozen=True, slots=True)
class Estimate:
    tickets: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    model: str

    def as_json(self) -> dict[str, Any]:
        return {
            "tickets": self.tickets,
            "model": self.model,
            "estimated_input_tokens": self.input_tokens,
            "estimated_output_tokens": self.output_tokens,
            "estimated_cost_usd": str(self.cost_usd),
        }


def estimate(rt: Runtime, ids: list[int], *, batch: bool = False) -> Estimate:
    """Tokens and list-price cost of classifying `ids` once with the first-line model: the
    prompt's own estimate for input, the model's average label size for output. An upper
    bound: prompt-cache discounts and reused labels only lower it."""
    settings = rt.settings
    if settings.effective_backend() == "local":
        return Estimate(len(ids), 0, 0, Decimal("0"), "local")
    model = settings.model
    spec = rt.config.models.spec(model)
    tokens_in = 0
    with rt.sessions() as session:
        average_out = session.scalar(
            select(func.avg(Classification.output_tokens)).where(
                Classification.model == model, Classification.output_tokens > 0
            )
        )
        for chunk in _chunks(ids, 500):
            for ticket in session.scalars(select(Ticket).where(Ticket.id.in_(chunk))):
                tokens_in += estimate_input_tokens(rt.config.taxonomy, build_request(rt, ticket))
    tokens_out = round(float(average_out or DEFAULT_OUTPUT_TOKENS)) * len(ids)
    cost = spec.cost(tokens_in, tokens_out, batch=batch)
    return Estimate(len(ids), tokens_in, tokens_out, cost, model)


def _chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def ineligible_ids(rt: Runtime, ids: tuple[int, ...] | list[int]) -> dict[int, str]:
    """Why each of the named tickets that cannot be reprocessed cannot: it does not exist, or
    it is not finished (the workers still own it), or its personal data was erased."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Ticket.id, Ticket.state, Ticket.erased_at).where(Ticket.id.in_(ids))
        )
        found = {row.id: row for row in rows}
    reasons: dict[int, str] = {}
    for ticket_id in ids:
        row = found.get(ticket_id)
        if row is None:
            reasons[ticket_id] = "not found"
        elif S(row.state) not in REOPENABLE:
            reasons[ticket_id] = f"is {row.state}, not finished"
        elif row.erased_at is not None:
            reasons[ticket_id] = NOTHING_TO_CLASSIFY
    return reasons


def _running_run(session: Session, kind: str, f: TicketFilter) -> ReprocessRun | None:
    return session.scalar(
        select(ReprocessRun)
        .where(
            ReprocessRun.kind == kind,
            ReprocessRun.selection_key == selection_key(kind, f),
            ReprocessRun.status == "running",
        )
        .order_by(ReprocessRun.id.desc())
        .limit(1)
    )


def find_run(
    rt: Runtime, kind: str, f: TicketFilter, *, run_id: int | None = None
) -> ReprocessRun | None:
    """The run `find_or_create_run` would resume, without creating one (what a dry run
    estimates): run `run_id`, else the unfinished run of this selection."""
    with rt.sessions() as session:
        if run_id is not None:
            return _resumed(session, kind, run_id, f)
        return _running_run(session, kind, f)


def _resumed(session: Session, kind: str, run_id: int, f: TicketFilter) -> ReprocessRun:
    run = session.get(ReprocessRun, run_id)
    if run is None or run.kind != kind:
        raise ConfigError(f"--resume {run_id}: no {kind} run with that id")
    # A run works through the tickets it froze when it started. Ids or filters that choose
    # others would be ignored without a word: `--resume 5 --intent refund` redoing run 5's
    # billing tickets.
    if not f.is_empty and run.selection_key != selection_key(kind, f):
        chosen = json.dumps(run.selection, sort_keys=True, default=str)
        raise ConfigError(
            f"--resume {run_id}: that run chose {chosen}, not these tickets; resume it "
            "without ids or filters, or leave out --resume to start this selection"
        )
    return run


def find_or_create_run(
    rt: Runtime,
    kind: str,
    f: TicketFilter,
    *,
    run_id: int | None = None,
    allow_empty: bool = True,
) -> tuple[ReprocessRun, bool]:
    """The unfinished run of this selection (resumed), or a new one with its items frozen.
    Returns (run, resumed). Without `allow_empty`, a selection with no finished ticket is a
    ConfigError rather than a run of nothing."""
    with session_scope(rt.sessions) as session:
        if run_id is not None:
            return _resumed(session, kind, run_id, f), True
        existing = _running_run(session, kind, f)
        if existing is not None:
            return existing, True
        ids = list(session.scalars(ticket_ids_select(eligible(f))))
        if not ids and not allow_empty:
            raise ConfigError(
                "nothing to reprocess: no finished ticket matches "
                f"(only {', '.join(sorted(s.value for s in REOPENABLE))} can be reprocessed)"
            )
        key = selection_key(kind, f)
        run = ReprocessRun(
            kind=kind,
            selection_key=key,
            selection=f.describe(),
            model=rt.settings.model if rt.settings.effective_backend() != "local" else "local",
            taxonomy_version=rt.config.taxonomy.version,
            total=len(ids),
        )
        session.add(run)
        session.flush()
        for chunk in _chunks(ids, 1000):
            session.execute(
                insert(ReprocessItem), [{"run_id": run.id, "ticket_id": i} for i in chunk]
            )
        return run, False


def pending_items(rt: Runtime, run_id: int) -> list[int]:
    return _pending(rt, run_id, ReprocessItem.id)


def pending_ticket_ids(rt: Runtime, run_id: int) -> list[int]:
    """The tickets of `pending_items`, in the same order."""
    return _pending(rt, run_id, ReprocessItem.ticket_id)


def _pending(rt: Runtime, run_id: int, column: InstrumentedAttribute[int]) -> list[int]:
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(column)
                .where(ReprocessItem.run_id == run_id, ReprocessItem.done_at.is_(None))
                .order_by(ReprocessItem.id)
            )
        )


@dataclass(frozen=True, slots=True)
class ItemResult:
    outcome: str
    label_changed: bool | None
    called: bool


def reprocess_item(rt: Runtime, item_id: int) -> ItemResult:
    """Classify one item's ticket again (unless a previous attempt already did) and mark the
    item done. Safe to call again for the same item."""
    with session_scope(rt.sessions) as session:
        item = session.get(ReprocessItem, item_id)
        if item is None or item.done_at is not None:
            return ItemResult("skipped", None, called=False)
        ticket = session.get(Ticket, item.ticket_id)
        if ticket is None:
            return _mark(session, item, "skipped", error="ticket deleted")
        if item.generation is None:
            if ticket.state not in REOPENABLE:
                return _mark(session, item, "skipped", error=f"ticket is {ticket.state}")
            previous = ticket.current_classification_id
            if not reopen(session, ticket.id, ticket.generation):
                return _mark(session, item, "skipped", error="ticket moved on")
            item.generation = ticket.generation + 1
            item.previous_classification_id = previous
            item.started_at = utcnow()
        elif ticket.generation != item.generation:
            return _mark(session, item, "superseded", error="a newer generation exists")
        elif ticket.state in REOPENABLE:
            # Interrupted after the label was recorded (or a worker finished it): no new call.
            return _settle(session, item, ticket, _outcome_of(ticket.state), called=False)
        ticket_id = ticket.id
    outcome = classify_ticket_stage(rt, ticket_id, reuse=False, max_inline_wait=float("inf"))
    with session_scope(rt.sessions) as session:
        item = session.get(ReprocessItem, item_id)
        ticket = session.get(Ticket, ticket_id)
        assert item is not None and ticket is not None
        return _settle(session, item, ticket, outcome, called=True)


def _outcome_of(state: str) -> str:
    return {S.ROUTED: "routed", S.NEEDS_REVIEW: "review", S.DEAD_LETTERED: "dead"}.get(
        S(state), state
    )


def _settle(
    session: Session, item: ReprocessItem, ticket: Ticket, outcome: str, *, called: bool
) -> ItemResult:
    changed: bool | None = None
    if ticket.generation == item.generation and ticket.state in (S.ROUTED, S.NEEDS_REVIEW):
        item.classification_id = ticket.current_classification_id
        changed = label_changed(session, item)
    item.outcome = outcome
    item.label_changed = changed
    item.error = ticket.last_error if outcome in ("retry", "dead") else None
    item.done_at = utcnow()
    return ItemResult(outcome, changed, called)


def label_changed(session: Session, item: ReprocessItem) -> bool | None:
    """Whether the item's new label differs from the one it replaced (intent or department)."""
    if item.classification_id is None:
        return None
    if item.previous_classification_id is None:
        return True
    old = session.get(Classification, item.previous_classification_id)
    new = session.get(Classification, item.classification_id)
    if old is None or new is None:
        return None
    return (old.intent, old.department) != (new.intent, new.department)


def _mark(session: Session, item: ReprocessItem, outcome: str, *, error: str) -> ItemResult:
    item.outcome = outcome
    item.error = error
    item.done_at = utcnow()
    return ItemResult(outcome, None, called=False)


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int
    total: int
    done: int
    outcomes: dict[str, int]
    labels_changed: int
    cost_usd: Decimal


def summarize(rt: Runtime, run_id: int, *, finish: bool = False) -> RunSummary:
    """Counts over the whole run (all invocations); `finish` closes it when nothing is left."""
    with session_scope(rt.sessions) as session:
        run = session.get(ReprocessRun, run_id)
        assert run is not None
        rows = session.execute(
            select(ReprocessItem.outcome, func.count())
            .where(ReprocessItem.run_id == run_id, ReprocessItem.done_at.is_not(None))
            .group_by(ReprocessItem.outcome)
        ).all()
        outcomes = {str(o): int(n) for o, n in rows}
        changed = session.scalar(
            select(func.count()).where(
                ReprocessItem.run_id == run_id, ReprocessItem.label_changed.is_(True)
            )
        )
        cost = session.scalar(
            select(func.coalesce(func.sum(Classification.cost_usd), 0))
            .join(ReprocessItem, ReprocessItem.classification_id == Classification.id)
            .where(ReprocessItem.run_id == run_id)
        )
        done = sum(outcomes.values())
        if finish and done >= run.total and run.status != "finished":
            run.status = "finished"
            run.finished_at = utcnow()
        return RunSummary(
            run_id=run_id,
            total=run.total,
            done=done,
            outcomes=outcomes,
            labels_changed=int(changed or 0),
            cost_usd=Decimal(str(cost or 0)),
        )

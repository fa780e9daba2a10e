"""Choosing tickets: the one filter that `tickets list`, `reprocess`, `backfill` and `dlq`
share, turned into SQL that runs the same on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, select

from triage.db.models import Classification, Ticket


@dataclass(frozen=True, slots=True)
class TicketFilter:
    """Every field is optional; set fields are ANDed. Label fields (intent, model, confidence,
    taxonomy version) are those of the ticket's current classification."""

    ids: tuple[int, ...] = ()
    states: tuple[str, ...] = ()
    intent: str | None = None
    department: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    confidence_below: float | None = None
    model: str | None = None
    taxonomy_version: str | None = None
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Leave out tickets whose personal data was erased: set by the commands that classify
    # what they select, and implied by them, so not part of `describe()`.
    classifiable: bool = False

    @property
    def is_empty(self) -> bool:
        return not any(
            v not in (None, (), {})
            for k, v in asdict(self).items()
            if k not in ("limit", "classifiable")
        )

    def describe(self) -> dict[str, Any]:
        """The set fields, JSON-ready (stored with a reprocess run, shown to the operator)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value in (None, (), {}) or key == "classifiable":
                continue
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        if "ids" in out:
            out["ids"] = sorted(out["ids"])
        if "states" in out:
            out["states"] = sorted(out["states"])
        return out


def ticket_select(f: TicketFilter) -> Select[Ticket, Classification]:
    """Tickets with their current label (None when not yet labelled), newest first."""
    stmt = select(Ticket, Classification).outerjoin(
        Classification, Classification.id == Ticket.current_classification_id
    )
    for condition in _conditions(f):
        stmt = stmt.where(condition)
    stmt = stmt.order_by(Ticket.id.desc())
    if f.limit is not None:
        stmt = stmt.limit(f.limit)
    return stmt


def ticket_ids_select(f: TicketFilter) -> Select[int]:
    """Just the ids, oldest first (the order reprocessing works through them)."""
    stmt = select(Ticket.id).outerjoin(
        Classification, Classification.id == Ticket.current_classification_id
    )
    for condition in _conditions(f):
        stmt = stmt.where(condition)
    if f.limit is not None:
        # The newest `limit` tickets, as `tickets list --limit` shows them.
        newest = stmt.order_by(Ticket.id.desc()).limit(f.limit).subquery()
        return select(newest.c.id).order_by(newest.c.id)
    return stmt.order_by(Ticket.id)


def _conditions(f: TicketFilter) -> Sequence[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if f.ids:
        conds.append(Ticket.id.in_(f.ids))
    if f.states:
        conds.append(Ticket.state.in_(f.states))
    if f.intent:
        conds.append(Classification.intent == f.intent)
    if f.department:
        conds.append(Ticket.department == f.department)
    if f.source:
        conds.append(Ticket.source == f.source)
    if f.since:
        conds.append(Ticket.received_at >= f.since)
    if f.until:
        conds.append(Ticket.received_at < f.until)
    if f.confidence_below is not None:
        conds.append(Classification.confidence < f.confidence_below)
    if f.model:
        conds.append(Classification.model == f.model)
    if f.taxonomy_version:
        conds.append(Classification.taxonomy_version == f.taxonomy_version)
    if f.classifiable:
        conds.append(Ticket.erased_at.is_(None))
    return conds

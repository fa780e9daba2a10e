"""The only place a ticket changes state.

Every change is a compare-and-set UPDATE (`WHERE state IN allowed`), so two workers handling
redelivered copies of one message cannot both move the ticket: the loser sees False.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Update, and_, case, select, update
from sqlalchemy.orm import Session

from triage.db.models import Ticket, TicketState, utcnow

S = TicketState

# to-state -> the states it may be entered from.
ALLOWED_FROM: dict[TicketState, frozenset[TicketState]] = {
    # QUEUED from itself: a re-triage (new customer text) of a ticket not yet claimed; the
    # fresh state_changed_at makes a worker that read the old text lose its claim.
    S.QUEUED: frozenset(
        {S.RECEIVED, S.QUEUED, S.CLASSIFYING, S.ROUTED, S.NEEDS_REVIEW, S.DEAD_LETTERED}
    ),
    # CLASSIFYING from itself: a redelivered message after a worker died mid-call.
    S.CLASSIFYING: frozenset({S.RECEIVED, S.QUEUED, S.CLASSIFYING}),
    S.CLASSIFIED: frozenset({S.CLASSIFYING}),
    # From DEAD_LETTERED: replaying a delivery that was dead-lettered after routing. From
    # CLASSIFYING: the finishing transaction stores the label and routes in one UPDATE (a
    # `classified` state that no other transaction could ever see would cost a statement).
    S.ROUTED: frozenset({S.CLASSIFYING, S.CLASSIFIED, S.DEAD_LETTERED}),
    S.NEEDS_REVIEW: frozenset({S.CLASSIFYING, S.CLASSIFIED, S.DEAD_LETTERED}),
    S.DEAD_LETTERED: frozenset(
        {S.RECEIVED, S.QUEUED, S.CLASSIFYING, S.CLASSIFIED, S.ROUTED, S.NEEDS_REVIEW}
    ),
}


class IllegalTransitionError(ValueError):
    pass


def transition(
    session: Session,
    ticket_id: int,
    to: TicketState,
    *,
    only_from: frozenset[TicketState] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    **fields: Any,
) -> bool:
    """Move `ticket_id` to `to` if its current state allows it; set `fields` in the same UPDATE.

    `only_from` narrows the allowed sources (e.g. replay only from dead_lettered). Returns
    whether the ticket moved; the caller's transaction commits it. `where` adds conditions
    (a lease on `state_changed_at`, say) to the same atomic check.
    """
    stmt = _update(to, only_from, where, fields).where(Ticket.id == ticket_id)
    # Core, not the ORM's bulk-update path: nothing in the session needs synchronising, and
    # the ORM layer costs several times the statement itself on the hot path.
    return session.connection().execute(stmt).rowcount == 1


def transition_many(
    session: Session,
    ticket_ids: Sequence[int],
    to: TicketState,
    *,
    only_from: frozenset[TicketState] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    **fields: Any,
) -> list[Ticket]:
    """`transition` for many tickets in one UPDATE; returns the tickets that moved, as they
    are after it. Rows are locked in id order (`_locked_in_id_order`)."""
    if not ticket_ids:
        return []
    stmt = _update(to, only_from, where, fields)
    stmt = (
        stmt.where(_locked_in_id_order(ticket_ids, stmt.whereclause))
        .returning(Ticket)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt).all())


def transition_each(
    session: Session,
    moves: Mapping[int, TicketState],
    *,
    only_from: frozenset[TicketState],
    each: Mapping[str, Mapping[int, Any]],
    **fields: Any,
) -> set[int]:
    """Move each ticket in `moves` to its own state, in one UPDATE: `each` gives per-ticket
    values by column, `fields` values shared by all. Returns the ids that moved."""
    if not moves:
        return set()
    for to in set(moves.values()):
        if not only_from <= ALLOWED_FROM[to]:
            raise IllegalTransitionError(f"{sorted(only_from - ALLOWED_FROM[to])} -> {to}")
    ids = sorted(moves)
    per_ticket = {
        column: case({i: values[i] for i in ids}, value=Ticket.id)
        for column, values in {"state": {i: moves[i].value for i in ids}, **each}.items()
    }
    allowed = Ticket.state.in_([s.value for s in only_from])
    stmt = (
        update(Ticket)
        .where(allowed, _locked_in_id_order(ids, allowed))
        .values(state_changed_at=utcnow(), **per_ticket, **fields)
        .returning(Ticket.id)
    )
    return set(session.connection().execute(stmt).scalars())


def _locked_in_id_order(
    ticket_ids: Sequence[int], condition: ColumnElement[bool] | None
) -> ColumnElement[bool]:
    """`id IN (...)` that first locks the rows meeting `condition` in id order.

    An UPDATE locks rows in whatever order its plan scans them (index order for a few ids,
    physical order for a bitmap scan of many), so two batches that overlap, say the relay
    marking rows queued and a worker claiming them, could each hold a row the other waits
    for: a deadlock, which PostgreSQL breaks only after a second. Locking in one order first
    makes that impossible. SQLite, which locks the whole database, renders no FOR UPDATE.
    """
    ids = sorted(set(ticket_ids))
    rows = select(Ticket.id).where(Ticket.id.in_(ids))
    if condition is not None:
        rows = rows.where(condition)
    # The plain list as well, for the planner: an index lookup of the ids on the outside.
    return and_(Ticket.id.in_(ids), Ticket.id.in_(rows.order_by(Ticket.id).with_for_update()))


def _update(
    to: TicketState,
    only_from: frozenset[TicketState] | None,
    where: Sequence[ColumnElement[bool]],
    fields: dict[str, Any],
) -> Update:
    allowed = ALLOWED_FROM[to]
    if only_from is not None:
        if not only_from <= allowed:
            raise IllegalTransitionError(f"{sorted(only_from - allowed)} -> {to} is not allowed")
        allowed = only_from
    return (
        update(Ticket)
        .where(Ticket.state.in_([s.value for s in allowed]), *where)
        .values(state=to.value, state_changed_at=utcnow(), **fields)
        .execution_options(synchronize_session=False)
    )

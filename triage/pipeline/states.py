"""The only place a ticket changes state.

Every change is a compare-and-set UPDATE (`WHERE state IN allowed`), so two workers handling
redelivered copies of one message cannot both move the ticket: the loser sees False.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ClauseElement,
    ColumnElement,
    Table,
    Update,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from triage.db.models import Ticket, TicketState, utcnow
from triage.db.session import among

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


def state_among(states: Iterable[TicketState]) -> ColumnElement[bool]:
    """`tickets.state IN (states)`, written so that no index can serve it: every statement
    here finds its tickets by id, and the state only checks them. Offered the choice,
    PostgreSQL's planner combined the ids with a bitmap scan of `ix_tickets_state_changed`'s
    entries for the states asked (no statistics, or stale ones, price them at a few rows).
    Every state change is an update that adds an index entry, and the entries of states a
    ticket has left stay until a vacuum: the scan read every ticket's `received`, `queued`
    and `classifying` entries. In `make bench` on a database without autovacuum, one claim
    in ten cost the server 3-4.4 ms (0.4 at the median), and the label statement 2.9 ms a
    wave on average against 1.3 once found by id. The sweeper, which looks tickets up by
    state, keeps the index."""
    return (Ticket.state + literal_column("''")).in_(sorted(s.value for s in states))


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


def claim_for_classification(
    session: Session,
    ticket_ids: Sequence[int],
    *,
    only_from: frozenset[TicketState],
    stale_before: datetime,
) -> list[Any]:
    """Move tickets to `classifying` for this worker and count the attempt, in one UPDATE
    built once. A ticket already
    `classifying` is taken over only if it was claimed before `stale_before` (its holder's
    lease is over). Returns the rows that moved, every column by name, locked in id order."""
    if not ticket_ids:
        return []
    connection = session.connection()
    stmt = _claim_statement(only_from, connection.dialect.name)
    params = {"ids": sorted(set(ticket_ids)), "stale_before": stale_before, "now": utcnow()}
    return list(connection.execute(stmt, params).all())


@lru_cache(maxsize=4)
def _claim_statement(only_from: frozenset[TicketState], dialect: str) -> Update:
    if not only_from <= ALLOWED_FROM[S.CLASSIFYING]:
        raise IllegalTransitionError(f"{sorted(only_from - ALLOWED_FROM[S.CLASSIFYING])}")
    table = Ticket.__table__
    assert isinstance(table, Table)
    claimable = and_(
        state_among(only_from),
        # The lease in the same atomic check: the relay may move received -> queued at any
        # moment, which must not cost the claim (the message is already in our hands).
        or_(
            Ticket.state != S.CLASSIFYING.value,
            Ticket.state_changed_at <= bindparam("stale_before"),
        ),
    )
    return (
        update(Ticket)
        .where(claimable, _locked_in_id_order(among(Ticket.id, "ids", dialect), claimable))
        .values(
            state=S.CLASSIFYING.value,
            state_changed_at=bindparam("now"),
            attempts=Ticket.attempts + 1,
        )
        .returning(*table.columns)
    )


def transition_ids(
    session: Session,
    ticket_ids: Sequence[int],
    to: TicketState,
    *,
    only_from: frozenset[TicketState] | None = None,
    **fields: Any,
) -> set[int]:
    """`transition` for many tickets in one UPDATE; returns the ids that moved. Rows are
    locked in id order (`_locked_in_id_order`)."""
    if not ticket_ids:
        return set()
    connection = session.connection()
    stmt = _update(to, only_from, (), fields)
    member = among(Ticket.id, "ids", connection.dialect.name)
    stmt = stmt.where(_locked_in_id_order(member, stmt.whereclause)).returning(Ticket.id)
    return set(connection.execute(stmt, {"ids": sorted(set(ticket_ids))}).scalars())


def transition_each(
    session: Session,
    moves: Mapping[int, TicketState],
    *,
    only_from: frozenset[TicketState],
    generations: Mapping[int, int],
    each: Mapping[str, Mapping[int, Any]],
    attempts: Mapping[int, int] | None = None,
    **fields: Any,
) -> set[int]:
    """Move each ticket in `moves` to its own state, in one UPDATE: `each` gives per-ticket
    values by column, `fields` values shared by all. Returns the ids that moved.

    A ticket moves only while it is still in the generation `generations` names for it: an
    attempt that read an earlier text (the ticket was re-triaged or reprocessed meanwhile,
    and may be `classifying` again under another worker) must not finish the new one. With
    `attempts`, also only while its attempt count is the one given: every claim counts one,
    so within a generation the count names the claim, and an attempt that outlived its lease
    must not finish a ticket another worker has claimed since."""
    if not moves:
        return set()

    for to in set(moves.values()):
        if not only_from <= ALLOWED_FROM[to]:
            raise IllegalTransitionError(f"{sorted(only_from - ALLOWED_FROM[to])} -> {to}")
    ids = sorted(moves)
    columns = {"state": {i: moves[i].value for i in ids}, **each}
    connection = session.connection()
    plain_fields = not any(isinstance(value, ClauseElement) for value in fields.values())
    shape = (only_from, tuple(columns), tuple(sorted(fields)), attempts is not None)
    params: dict[str, Any] = {f"f_{name}": value for name, value in fields.items()}
    if len(ids) == 1 and plain_fields:
        # One ticket (the common case at a moderate rate): a plain UPDATE of one row, which
        # needs no lock ordering and none of the arrays below.
        (ticket_id,) = ids
        params.update({f"v_{name}": columns[name][ticket_id] for name in columns})
        stmt = _each_one(*shape)
        one = {"one_id": ticket_id, "one_generation": generations[ticket_id], "now": utcnow()}
        if attempts is not None:
            one["one_attempts"] = attempts[ticket_id]
        return set(connection.execute(stmt, {**params, **one}).scalars())
    if connection.dialect.name == "postgresql" and plain_fields:
        params.update({f"v_{name}": [columns[name][i] for i in ids] for name in columns})
        params["generations"] = [generations[i] for i in ids]
        if attempts is not None:
            params["expected_attempts"] = [attempts[i] for i in ids]
        stmt = _each_by_arrays(*shape)
        return set(connection.execute(stmt, {**params, "ids": ids, "now": utcnow()}).scalars())
    per_ticket = {
        column: case({i: values[i] for i in ids}, value=Ticket.id)
        for column, values in columns.items()
    }
    allowed = state_among(only_from)
    current = [Ticket.generation == case({i: generations[i] for i in ids}, value=Ticket.id)]
    if attempts is not None:
        current.append(Ticket.attempts == case({i: attempts[i] for i in ids}, value=Ticket.id))
    stmt = (
        update(Ticket)
        .where(allowed, *current, _locked_in_id_order(Ticket.id.in_(ids), allowed))
        .values(state_changed_at=utcnow(), **per_ticket, **fields)
        .returning(Ticket.id)
    )
    return set(connection.execute(stmt).scalars())


@lru_cache(maxsize=16)
def _each_one(
    only_from: frozenset[TicketState],
    columns: tuple[str, ...],
    fields: tuple[str, ...],
    with_attempts: bool,
) -> Update:
    """`transition_each` for one ticket, built once per shape."""
    claim = [Ticket.attempts == bindparam("one_attempts")] if with_attempts else []
    return (
        update(Ticket)
        .where(
            Ticket.id == bindparam("one_id"),
            state_among(only_from),
            Ticket.generation == bindparam("one_generation"),
            *claim,
        )
        .values(
            state_changed_at=bindparam("now"),
            **{name: bindparam(f"v_{name}") for name in columns},
            **{name: bindparam(f"f_{name}") for name in fields},
        )
        .returning(Ticket.id)
    )


@lru_cache(maxsize=16)
def _each_by_arrays(
    only_from: frozenset[TicketState],
    columns: tuple[str, ...],
    fields: tuple[str, ...],
    with_attempts: bool,
) -> Update:
    """`transition_each` on PostgreSQL: the per-ticket values as one array per column, joined
    by id (`UPDATE ... FROM unnest(...)`). Built once per shape; a CASE per column, by
    contrast, is a new statement for every batch, and keying and rendering it cost more than
    running it."""
    table = Ticket.__table__
    assert isinstance(table, Table)
    ids = bindparam("ids", type_=postgresql.ARRAY(BigInteger))
    expected = ["expected_generation", *(["expected_attempts"] if with_attempts else [])]
    values = (
        func.unnest(
            ids,
            bindparam("generations", type_=postgresql.ARRAY(table.c["generation"].type)),
            *(
                [bindparam("expected_attempts", type_=postgresql.ARRAY(table.c["attempts"].type))]
                if with_attempts
                else []
            ),
            *(
                bindparam(f"v_{name}", type_=postgresql.ARRAY(table.c[name].type))
                for name in columns
            ),
        )
        .table_valued("id", *expected, *columns)
        .render_derived()
    )
    allowed = state_among(only_from)
    claim = [Ticket.attempts == values.c.expected_attempts] if with_attempts else []
    return (
        update(Ticket)
        .where(
            Ticket.id == values.c.id,
            allowed,
            Ticket.generation == values.c.expected_generation,
            *claim,
            _locked_in_id_order(Ticket.id == func.any(ids), allowed),
        )
        .values(
            state_changed_at=bindparam("now"),
            **{name: values.c[name] for name in columns},
            **{name: bindparam(f"f_{name}") for name in fields},
        )
        .returning(Ticket.id)
    )


def _locked_in_id_order(
    member: ColumnElement[bool], condition: ColumnElement[bool] | None
) -> ColumnElement[bool]:
    """`member` (the tickets' ids: a list, an expanding parameter or an array), first locking
    the member rows that meet `condition` in id order.

    An UPDATE locks rows in whatever order its plan scans them (index order for a few ids,
    physical order for a bitmap scan of many), so two batches that overlap, say the relay
    marking rows queued and a worker claiming them, could each hold a row the other waits
    for: a deadlock, which PostgreSQL breaks only after a second. Locking in one order first
    makes that impossible. SQLite, which locks the whole database, renders no FOR UPDATE.
    """
    rows = select(Ticket.id).where(member)
    if condition is not None:
        rows = rows.where(condition)
    # `member` as well, for the planner: an index lookup of the ids on the outside.
    return and_(member, Ticket.id.in_(rows.order_by(Ticket.id).with_for_update()))


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
        .where(state_among(allowed), *where)
        .values(state=to.value, state_changed_at=utcnow(), **fields)
        .execution_options(synchronize_session=False)
    )

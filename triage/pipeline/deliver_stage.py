"""Stage 2: a dispatched ticket is handed to its department's sinks.

Consumed from `dept.<department>` (or `triage.review`). With no sinks configured the queue
message itself is the delivery, and this stage only records that it was consumed.

The sinks run one after another. When one fails after others accepted the delivery, the
failed attempt records those (`Dispatch.sinks_done`), and every later attempt of the dispatch
(the deliver policy's retry, the sweeper's, a dead letter's replay) skips them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, Update, bindparam, exists, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from triage.db.models import Attempt, Classification, Dispatch, Ticket, TicketState, utcnow
from triage.db.repo import APPLIED_UPDATES
from triage.db.session import among, engine_of, insert_rows, one_statement, session_scope
from triage.errors import TransientError
from triage.metrics import SINK_SKIPPED
from triage.pipeline.relay import DELIVER_TASK
from triage.pipeline.runtime import Runtime
from triage.reliability.guard import StageFailure, handle_failure
from triage.reliability.retry import (
    deliver_lease_seconds,
    deliver_seconds,
    is_database_outage,
    policy_for,
)
from triage.sinks.base import Delivery

log = logging.getLogger(__name__)

S = TicketState
# The outcome of a delivery attempt in progress: the marker another copy of the message sees.
STARTED = "started"


@dataclass(frozen=True, slots=True)
class _Job:
    delivery: Delivery
    attempt: int
    age_seconds: float
    attempt_id: int
    # The ticket generation the dispatch belongs to.
    generation: int
    # The sinks an earlier attempt of this dispatch got through before another failed.
    sinks_done: frozenset[str] = frozenset()


class SinksDone(Exception):
    """The sinks accepted these deliveries but the database could not record them. Retry the
    recording only: sending again would deliver twice what a live worker knows it sent."""

    def __init__(self, dispatch_ids: list[int]) -> None:
        super().__init__(f"dispatches {dispatch_ids} delivered, not yet recorded")
        self.dispatch_ids = dispatch_ids


def deliver_stage(rt: Runtime, dispatch_id: int, *, sinks_done: bool = False) -> str:
    return deliver_many_stage(rt, [dispatch_id], sinks_done=sinks_done)[dispatch_id]


def deliver_many_stage(
    rt: Runtime, dispatch_ids: Sequence[int], *, sinks_done: bool = False
) -> dict[int, str]:
    """Deliver a batch of dispatches: one transaction to take them, their sinks (side by side
    when there are several), one transaction to record them. Returns each one's outcome."""
    outcomes: dict[int, str] = {}
    ids = list(dict.fromkeys(dispatch_ids))
    if not sinks_done:
        outcomes.update(_record_queue_only(rt, ids))
        ids = [i for i in ids if i not in outcomes]
        if not ids:
            return outcomes
    jobs = _begin(rt, ids, sinks_done, outcomes)
    failed: list[tuple[_Job, Exception]] = []
    sent = jobs
    if not sinks_done:
        jobs = sent = _within_attempts(rt, jobs, outcomes)
        with_sinks = [job for job in jobs if rt.sinks_for(job.delivery.department)]
        # Each delivery's sinks that accept it, in order, as they do: kept if a later one fails.
        accepted: dict[int, list[str]] = {job.delivery.dispatch_id: [] for job in with_sinks}
        results = rt.calls.run(
            [_send_for(rt, job, accepted[job.delivery.dispatch_id]) for job in with_sinks]
        )
        failed = [
            (job, result)
            for job, result in zip(with_sinks, results, strict=True)
            if isinstance(result, Exception)
        ]
        failing = {job.delivery.dispatch_id for job, _ in failed}
        sent = [job for job in jobs if job.delivery.dispatch_id not in failing]
    try:
        _record_delivered(rt, sent)
    except Exception as exc:
        if is_database_outage(exc):
            raise SinksDone([job.delivery.dispatch_id for job in sent]) from exc
        raise
    outcomes.update({job.delivery.dispatch_id: "delivered" for job in sent})
    for job, error in failed:
        failure = _failure(job, accepted[job.delivery.dispatch_id])
        outcomes[job.delivery.dispatch_id] = handle_failure(rt, failure, error)
    return outcomes


def _within_attempts(rt: Runtime, jobs: list[_Job], outcomes: dict[int, str]) -> list[_Job]:
    """The jobs still within the attempt bound. Earlier attempts that ended without an
    outcome (the worker died mid-delivery, every time) count too: without this, a delivery
    that kills its worker would be sent again by the sweeper for ever. The others are
    dead-lettered without another request, as the classify stage does."""
    max_attempts = policy_for("deliver", rt.settings).max_attempts
    over = [job for job in jobs if job.attempt > max_attempts]
    for job in over:
        lost = TransientError(
            f"{job.attempt - 1} delivery attempts started, none finished with an outcome "
            "(worker lost mid-delivery?)"
        )
        outcomes[job.delivery.dispatch_id] = handle_failure(rt, _failure(job), lost)
    return [job for job in jobs if job.attempt <= max_attempts] if over else jobs


def _record_queue_only(rt: Runtime, dispatch_ids: list[int]) -> dict[int, str]:
    """Dispatches to departments without sinks: the queue message was the delivery, and
    consuming it is all there is to record. Nothing is sent anywhere, so nothing can be sent
    twice: no in-flight marker, and the batch's dispatches and attempts are recorded together,
    on PostgreSQL in one statement (`one_statement`: a delivery message's transaction was four
    round trips). What this leaves (dispatches with sinks, and anything not deliverable now)
    takes the full path."""
    everything_but, listed = rt.sinks.queue_only()
    if not everything_but and not listed:
        return {}
    names = tuple(listed)
    now = utcnow()
    params = {"ids": sorted(dispatch_ids), "now": now}
    dialect = engine_of(rt.sessions).dialect.name
    if dialect == "postgresql":
        with one_statement(rt.sessions) as connection:
            rows = connection.execute(_queue_only_recorded(everything_but, names), params).all()
    else:
        with session_scope(rt.sessions) as session:
            marking = _queue_only_statement(everything_but, names, dialect)
            rows = session.connection().execute(marking, params).all()
            if rows:
                insert_rows(session, Attempt, _delivered_attempts(rows, now), returning=None)
    return {dispatch_id: "delivered" for dispatch_id, _t, _n in rows}


def _delivered_attempts(rows: Sequence[Any], now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "ticket_id": ticket_id,
            "stage": "deliver",
            "number": number,
            "outcome": "ok",
            "started_at": now,
            "finished_at": now,
        }
        # Ticket order: the foreign key check locks them (see classify_labels.store_labels).
        for _id, ticket_id, number in sorted(rows, key=lambda row: row[1])
    ]


@lru_cache(maxsize=8)
def _queue_only_recorded(everything_but: bool, names: tuple[str, ...]) -> Select[Any]:
    """`_queue_only_statement` and the attempt rows of what it marked, in one statement (the
    attempts in ticket order, as `_delivered_attempts` has them); returns what it marked."""
    marked = _queue_only_statement(everything_but, names, "postgresql").cte("marked")
    now = bindparam("now", type_=Attempt.__table__.c.started_at.type)
    # Every column without a server default named here: a statement that is not itself an
    # INSERT leaves its CTE's client-side defaults unset.
    attempts = insert(Attempt).from_select(
        ["ticket_id", "stage", "number", "outcome", "started_at", "finished_at", "api_calls"],
        select(
            marked.c.ticket_id,
            literal("deliver"),
            marked.c.delivery_attempts,
            literal("ok"),
            now,
            now,
            literal(0),
        ).order_by(marked.c.ticket_id),
        include_defaults=False,
    )
    return select(marked.c.id, marked.c.ticket_id, marked.c.delivery_attempts).add_cte(
        attempts.cte("recorded")
    )


@lru_cache(maxsize=8)
def _queue_only_statement(everything_but: bool, names: tuple[str, ...], dialect: str) -> Update:
    """Mark the live, undelivered dispatches among `ids` to queue-only departments delivered.
    Built once per sinks table: the statement is the same for every batch (and on
    PostgreSQL, whatever the number of ids, so the server prepares it once)."""
    if everything_but:
        quiet = or_(Dispatch.department.is_(None), Dispatch.department.not_in(names))
    else:
        quiet = Dispatch.department.in_(names)
    live = exists().where(
        Ticket.id == Dispatch.ticket_id,
        Ticket.generation == Dispatch.generation,
        Ticket.state.in_([S.ROUTED.value, S.NEEDS_REVIEW.value]),
    )
    return (
        update(Dispatch)
        .where(
            among(Dispatch.id, "ids", dialect),
            Dispatch.delivered_at.is_(None),
            quiet,
            live,
        )
        .values(delivered_at=bindparam("now"), delivery_attempts=Dispatch.delivery_attempts + 1)
        .returning(Dispatch.id, Dispatch.ticket_id, Dispatch.delivery_attempts)
    )


def _send_for(rt: Runtime, job: _Job, accepted: list[str]) -> Callable[[], None]:
    """The delivery's sinks in their configured order, less those an earlier attempt got
    through; each that accepts it is added to `accepted`."""

    def send() -> None:
        sinks = rt.sinks_for(job.delivery.department)
        if job.sinks_done:
            _skipped_as_done(job, [sink.name for sink in sinks if sink.name in job.sinks_done])
        for sink in sinks:
            if sink.name not in job.sinks_done:
                sink.deliver(job.delivery)
                accepted.append(sink.name)

    return send


def _skipped_as_done(job: _Job, names: list[str]) -> None:
    # A name the config no longer has is not among `names`: it neither runs nor is skipped.
    if not names:
        return
    log.info(
        "dispatch %s of ticket %s (attempt %s): %s skipped, already accepted in an earlier attempt",
        job.delivery.dispatch_id,
        job.delivery.ticket_id,
        job.attempt,
        ", ".join(names),
    )
    for name in names:
        SINK_SKIPPED.labels(sink=name, reason="already_done").inc()


def _keep_done(dispatch_id: int, accepted: list[str]) -> Callable[[Session], None]:
    """Add the sinks this failed attempt got through to the dispatch's, in the failure's
    transaction. Added to, not replaced: an attempt that outlived its lease, failing late,
    must not drop what a later one recorded."""

    def keep(session: Session) -> None:
        recorded = session.scalar(
            select(Dispatch.sinks_done).where(Dispatch.id == dispatch_id).with_for_update()
        )
        session.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id)
            .values(sinks_done=list(dict.fromkeys([*(recorded or []), *accepted])))
            .execution_options(synchronize_session=False)
        )

    return keep


def _record_delivered(rt: Runtime, jobs: list[_Job]) -> None:
    if not jobs:
        return
    now = utcnow()
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Dispatch)
            .where(
                Dispatch.id.in_([job.delivery.dispatch_id for job in jobs]),
                Dispatch.delivered_at.is_(None),
            )
            .values(delivered_at=now)
            .execution_options(synchronize_session=False)
        )
        ours = [job.attempt_id for job in jobs]
        session.execute(
            update(Attempt)
            .where(Attempt.id.in_(ours))
            .values(outcome="ok", finished_at=now)
            .execution_options(synchronize_session=False)
        )
        # Attempts whose worker died (or lost its database) never finished: say so.
        session.execute(
            update(Attempt)
            .where(
                Attempt.ticket_id.in_([job.delivery.ticket_id for job in jobs]),
                Attempt.stage == "deliver",
                Attempt.outcome == STARTED,
                Attempt.id.not_in(ours),
            )
            .values(outcome="lost", finished_at=now)
            .execution_options(synchronize_session=False)
        )


def _begin(
    rt: Runtime, dispatch_ids: list[int], sinks_done: bool, outcomes: dict[int, str]
) -> list[_Job]:
    with session_scope(rt.sessions) as session:
        # Take the dispatch rows first (row locks on PostgreSQL, in id order; the write lock on
        # SQLite), so two copies of a message cannot both miss each other's "started" attempt.
        taken = session.scalars(
            update(Dispatch)
            .where(Dispatch.id.in_(sorted(dispatch_ids)), Dispatch.delivered_at.is_(None))
            .values(delivery_attempts=Dispatch.delivery_attempts + 1)
            .returning(Dispatch)
            .execution_options(synchronize_session=False, populate_existing=True)
        ).all()
        by_id = {d.id: d for d in taken}
        others = [i for i in dispatch_ids if i not in by_id]
        if others:
            exist = set(session.scalars(select(Dispatch.id).where(Dispatch.id.in_(others))))
            outcomes.update({i: "noop" if i in exist else "missing" for i in others})
        if not taken:
            return []
        tickets = {
            t.id: t
            for t in session.scalars(
                select(Ticket).where(Ticket.id.in_({d.ticket_id for d in taken}))
            )
        }
        busy = set() if sinks_done else _in_flight(rt, session, taken)
        ready: list[Dispatch] = []
        for dispatch in taken:
            ticket = tickets.get(dispatch.ticket_id)
            if ticket is None or ticket.generation != dispatch.generation:
                outcomes[dispatch.id] = "superseded"
            elif ticket.state not in (S.ROUTED, S.NEEDS_REVIEW):
                outcomes[dispatch.id] = "noop"
            elif dispatch.ticket_id in busy:
                # Another worker is delivering it right now (a sweeper's or a redelivered copy
                # of the message): sending too would deliver it twice. If that worker dies,
                # the sweeper sends it again once the lease is over.
                outcomes[dispatch.id] = "in_flight"
            else:
                ready.append(dispatch)
        skipped = [d.id for d in taken if d.id in outcomes]
        if skipped:
            # Not ours to deliver: the attempt count goes back as it was.
            session.execute(
                update(Dispatch)
                .where(Dispatch.id.in_(skipped))
                .values(delivery_attempts=Dispatch.delivery_attempts - 1)
                .execution_options(synchronize_session=False)
            )
        if not ready:
            return []
        # Before the markers' `started_at`: each delivery's requests end by its deadline, and
        # so before the lease another copy of its message counts from that marker.
        began = time.monotonic()
        marker_ids = insert_rows(
            session,
            Attempt,
            [
                {
                    "ticket_id": d.ticket_id,
                    "stage": "deliver",
                    "number": d.delivery_attempts,
                    "outcome": STARTED,
                    "started_at": utcnow(),
                }
                for d in ready
            ],
        )
        label_ids = {d.classification_id for d in ready if d.classification_id}
        labels = {
            c.id: c
            for c in session.scalars(select(Classification).where(Classification.id.in_(label_ids)))
        }
        now = utcnow()
        jobs = []
        for dispatch, marker_id in zip(ready, marker_ids, strict=True):
            ticket = tickets[dispatch.ticket_id]
            label = labels.get(dispatch.classification_id or 0)
            delivery = Delivery(
                ticket_id=ticket.id,
                dispatch_id=dispatch.id,
                source=ticket.source,
                external_id=ticket.external_id,
                route=dispatch.route,
                department=dispatch.department,
                needs_review=ticket.state == S.NEEDS_REVIEW,
                review_reason=ticket.review_reason,
                label={**label.label_fields(), "model": label.model} if label else {},
                # What the source sent; which updates were applied is triage's own record.
                metadata={k: v for k, v in (ticket.extra or {}).items() if k != APPLIED_UPDATES},
                routed_at=dispatch.created_at,
                deadline=began + _delivery_seconds(rt, dispatch.department),
            )
            jobs.append(
                _Job(
                    delivery=delivery,
                    attempt=dispatch.delivery_attempts,
                    age_seconds=(now - dispatch.created_at).total_seconds(),
                    attempt_id=marker_id,
                    generation=dispatch.generation,
                    sinks_done=frozenset(dispatch.sinks_done or ()),
                )
            )
        order = {dispatch_id: i for i, dispatch_id in enumerate(dispatch_ids)}
        return sorted(jobs, key=lambda job: order[job.delivery.dispatch_id])


def _delivery_seconds(rt: Runtime, department: str | None) -> float:
    """How long a delivery to this department may spend on its requests: its deadline."""
    return deliver_seconds(rt.sinks.requests_for(department), rt.sinks.timeout_seconds)


def _lease_seconds(rt: Runtime, department: str | None) -> float:
    """How long a delivery to this department holds its dispatch: every request its sinks
    may make timing out, and the grace for the database work."""
    return deliver_lease_seconds(
        rt.sinks.requests_for(department), rt.sinks.timeout_seconds, rt.settings
    )


def _in_flight(rt: Runtime, session: Session, dispatches: Sequence[Dispatch]) -> set[int]:
    """The tickets among these dispatches' that a live delivery attempt holds."""
    leases = {d.ticket_id: _lease_seconds(rt, d.department) for d in dispatches}
    since = utcnow() - timedelta(seconds=max(leases.values()))
    rows = session.execute(
        select(Attempt.ticket_id, Attempt.started_at).where(
            Attempt.ticket_id.in_(leases),
            Attempt.stage == "deliver",
            Attempt.outcome == STARTED,
            Attempt.started_at > since,
        )
    ).all()
    now = utcnow()
    return {
        ticket_id
        for ticket_id, started in rows
        if started > now - timedelta(seconds=leases[ticket_id])
    }


def _failure(job: _Job, accepted: Sequence[str] = ()) -> StageFailure:
    return StageFailure(
        ticket_id=job.delivery.ticket_id,
        stage="deliver",
        attempt=job.attempt,
        age_seconds=job.age_seconds,
        task=DELIVER_TASK,
        queue=job.delivery.route,
        args={"dispatch_id": job.delivery.dispatch_id},
        dead_from=frozenset({S.ROUTED, S.NEEDS_REVIEW}),
        attempt_id=job.attempt_id,
        # A dispatch of an earlier generation failing (its sink was slow, and the ticket was
        # re-triaged and routed again meanwhile) must not dead-letter the new routing.
        generation=job.generation,
        # Only what this attempt added: nothing to write when its first sink to run failed.
        progress=_keep_done(job.delivery.dispatch_id, list(accepted)) if accepted else None,
    )

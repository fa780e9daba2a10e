"""Stage 2: a dispatched ticket is handed to its department's sinks.

Consumed from `dept.<department>` (or `triage.review`). With no sinks configured the queue
message itself is the delivery, and this stage only records that it was consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from triage.db.models import Attempt, Classification, Dispatch, Ticket, TicketState, utcnow
from triage.db.session import session_scope
from triage.pipeline.relay import DELIVER_TASK
from triage.pipeline.runtime import Runtime
from triage.reliability.guard import StageFailure, handle_failure
from triage.reliability.retry import deliver_lease_seconds, is_database_outage
from triage.sinks.base import Delivery

S = TicketState
# The outcome of a delivery attempt in progress: the marker another copy of the message sees.
STARTED = "started"


@dataclass(frozen=True, slots=True)
class _Job:
    delivery: Delivery
    attempt: int
    age_seconds: float
    attempt_id: int


class SinksDone(Exception):
    """The sinks accepted the delivery but the database could not record it. Retry the
    recording only: sending again would deliver twice what a live worker knows it sent."""

    def __init__(self, dispatch_id: int) -> None:
        super().__init__(f"dispatch {dispatch_id} delivered, not yet recorded")
        self.dispatch_id = dispatch_id


def deliver_stage(rt: Runtime, dispatch_id: int, *, sinks_done: bool = False) -> str:
    job = _begin(rt, dispatch_id, sinks_done=sinks_done)
    if isinstance(job, str):
        return job
    if not sinks_done:
        try:
            for sink in rt.sinks_for(job.delivery.department):
                sink.deliver(job.delivery)
        except Exception as exc:  # noqa: BLE001 - the guard names and decides every failure
            return handle_failure(rt, _failure(job), exc)
    try:
        _record_delivered(rt, job)
    except Exception as exc:
        if is_database_outage(exc):
            raise SinksDone(dispatch_id) from exc
        raise
    return "delivered"


def _record_delivered(rt: Runtime, job: _Job) -> None:
    now = utcnow()
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Dispatch)
            .where(Dispatch.id == job.delivery.dispatch_id, Dispatch.delivered_at.is_(None))
            .values(delivered_at=now)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            update(Attempt)
            .where(Attempt.id == job.attempt_id)
            .values(outcome="ok", finished_at=now)
            .execution_options(synchronize_session=False)
        )
        # Attempts whose worker died (or lost its database) never finished: say so.
        session.execute(
            update(Attempt)
            .where(
                Attempt.ticket_id == job.delivery.ticket_id,
                Attempt.stage == "deliver",
                Attempt.outcome == STARTED,
            )
            .values(outcome="lost", finished_at=now)
            .execution_options(synchronize_session=False)
        )


def _begin(rt: Runtime, dispatch_id: int, *, sinks_done: bool) -> _Job | str:
    with session_scope(rt.sessions) as session:
        # Take the dispatch row first (a row lock on PostgreSQL, the write lock on SQLite), so
        # two copies of the message cannot both miss each other's "started" attempt below.
        took = session.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id, Dispatch.delivered_at.is_(None))
            .values(delivery_attempts=Dispatch.delivery_attempts + 1)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if took != 1:
            return "noop" if session.get(Dispatch, dispatch_id) else "missing"
        dispatch = session.get(Dispatch, dispatch_id)
        assert dispatch is not None
        ticket = session.get(Ticket, dispatch.ticket_id)
        if ticket is None or ticket.generation != dispatch.generation:
            session.rollback()
            return "superseded"
        if ticket.state not in (S.ROUTED, S.NEEDS_REVIEW):
            session.rollback()
            return "noop"
        if not sinks_done and _in_flight(rt, session, dispatch):
            # Another worker is delivering it right now (a sweeper's or a redelivered copy of
            # the message): sending too would deliver it twice. If that worker dies, the
            # sweeper sends it again once the lease is over.
            session.rollback()
            return "in_flight"
        marker = Attempt(
            ticket_id=ticket.id,
            stage="deliver",
            number=dispatch.delivery_attempts,
            outcome=STARTED,
        )
        session.add(marker)
        session.flush()
        label = (
            session.get(Classification, dispatch.classification_id)
            if dispatch.classification_id
            else None
        )
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
            metadata=dict(ticket.extra or {}),
        )
        return _Job(
            delivery=delivery,
            attempt=dispatch.delivery_attempts,
            age_seconds=(utcnow() - dispatch.created_at).total_seconds(),
            attempt_id=marker.id,
        )


def _in_flight(rt: Runtime, session: Session, dispatch: Dispatch) -> bool:
    sinks = rt.sinks_for(dispatch.department)
    lease = deliver_lease_seconds(len(sinks), rt.sinks.timeout_seconds)
    since = utcnow() - timedelta(seconds=lease)
    started = session.scalar(
        select(Attempt.id)
        .where(
            Attempt.ticket_id == dispatch.ticket_id,
            Attempt.stage == "deliver",
            Attempt.outcome == STARTED,
            Attempt.started_at > since,
        )
        .limit(1)
    )
    return started is not None


def _failure(job: _Job) -> StageFailure:
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
    )

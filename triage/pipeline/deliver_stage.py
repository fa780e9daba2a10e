"""Stage 2: a dispatched ticket is handed to its department's sinks.

Consumed from `dept.<department>` (or `triage.review`). With no sinks configured the queue
message itself is the delivery, and this stage only records that it was consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update

from triage.db.models import Attempt, Classification, Dispatch, Ticket, TicketState, utcnow
from triage.db.session import session_scope
from triage.pipeline.relay import DELIVER_TASK
from triage.pipeline.runtime import Runtime
from triage.reliability.guard import StageFailure, handle_failure
from triage.sinks.base import Delivery

S = TicketState


@dataclass(frozen=True, slots=True)
class _Job:
    delivery: Delivery
    attempt: int
    age_seconds: float


def deliver_stage(rt: Runtime, dispatch_id: int) -> str:
    job = _begin(rt, dispatch_id)
    if isinstance(job, str):
        return job
    try:
        for sink in rt.sinks_for(job.delivery.department):
            sink.deliver(job.delivery)
    except Exception as exc:  # noqa: BLE001 - the guard names and decides every failure
        return handle_failure(rt, _failure(job), exc)
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id, Dispatch.delivered_at.is_(None))
            .values(delivered_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.add(
            Attempt(
                ticket_id=job.delivery.ticket_id,
                stage="deliver",
                number=job.attempt,
                finished_at=utcnow(),
                outcome="ok",
            )
        )
    return "delivered"


def _begin(rt: Runtime, dispatch_id: int) -> _Job | str:
    with session_scope(rt.sessions) as session:
        dispatch = session.get(Dispatch, dispatch_id)
        if dispatch is None:
            return "missing"
        if dispatch.delivered_at is not None:
            return "noop"
        ticket = session.get(Ticket, dispatch.ticket_id)
        if ticket is None or ticket.generation != dispatch.generation:
            return "superseded"
        if ticket.state not in (S.ROUTED, S.NEEDS_REVIEW):
            return "noop"
        dispatch.delivery_attempts += 1
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
        )


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
    )

"""Recovery for work the broker lost or never got: outbox rows not yet published, tickets
stuck in a non-terminal state, dispatches never delivered.

Safe with many sweepers at once: each re-enqueue is a compare-and-set on `state_changed_at`
(or on the dispatch row), so only one sweeper wins a given stuck ticket per pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import exists, select, update

from triage.db.models import Dispatch, OutboxMessage, Ticket, TicketState, utcnow
from triage.db.session import session_scope
from triage.pipeline.relay import enqueue_classify, enqueue_delivery
from triage.pipeline.runtime import Runtime

log = logging.getLogger(__name__)
S = TicketState
STUCK_STATES = (S.RECEIVED.value, S.QUEUED.value, S.CLASSIFYING.value)


@dataclass(frozen=True, slots=True)
class SweepReport:
    relayed: int
    requeued_tickets: int
    requeued_deliveries: int


def _no_pending_outbox(ticket_id_col: object) -> object:
    return ~exists().where(
        OutboxMessage.ticket_id == ticket_id_col, OutboxMessage.sent_at.is_(None)
    )


def sweep_once(rt: Runtime, *, stuck_after: float | None = None, limit: int = 500) -> SweepReport:
    relayed = rt.publisher.relay_pending()
    cutoff = utcnow() - timedelta(seconds=stuck_after or rt.settings.stuck_after_seconds)
    outbox_ids: list[int] = []
    tickets = deliveries = 0
    with session_scope(rt.sessions) as session:
        stuck = session.execute(
            select(Ticket.id, Ticket.state_changed_at)
            .where(
                Ticket.state.in_(STUCK_STATES),
                Ticket.state_changed_at < cutoff,
                _no_pending_outbox(Ticket.id),  # type: ignore[arg-type]
            )
            .limit(limit)
        ).all()
        for ticket_id, changed_at in stuck:
            won = session.execute(
                update(Ticket)
                .where(Ticket.id == ticket_id, Ticket.state_changed_at == changed_at)
                .values(state_changed_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if won:
                outbox_ids.append(enqueue_classify(session, ticket_id).id)
                tickets += 1
        undelivered = session.execute(
            select(Dispatch.id, Dispatch.ticket_id, Dispatch.route, Dispatch.created_at)
            .join(Ticket, Ticket.id == Dispatch.ticket_id)
            .where(
                Dispatch.delivered_at.is_(None),
                Dispatch.created_at < cutoff,
                Ticket.generation == Dispatch.generation,
                Ticket.state.in_([S.ROUTED.value, S.NEEDS_REVIEW.value]),
                _no_pending_outbox(Dispatch.ticket_id),  # type: ignore[arg-type]
            )
            .limit(limit)
        ).all()
        for dispatch_id, ticket_id, route, created_at in undelivered:
            # Moving created_at forward is this dispatch's "claimed by a sweeper" marker.
            won = session.execute(
                update(Dispatch)
                .where(Dispatch.id == dispatch_id, Dispatch.created_at == created_at)
                .values(created_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if won:
                msg = enqueue_delivery(
                    session, ticket_id=ticket_id, dispatch_id=dispatch_id, route=route
                )
                outbox_ids.append(msg.id)
                deliveries += 1
    if outbox_ids:
        log.warning("sweeper re-enqueued %d tickets, %d deliveries", tickets, deliveries)
        rt.publisher.publish(outbox_ids)
    return SweepReport(relayed=relayed, requeued_tickets=tickets, requeued_deliveries=deliveries)


class Periodic:
    """Calls `fn` every `interval` seconds on a daemon thread until stopped. Used for the
    worker's sweeper and the API's outbox relay."""

    def __init__(self, name: str, interval: float, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except Exception:
                log.exception("%s pass failed", self._thread.name)

"""Recovery for work the broker lost or never got: outbox rows not yet published, tickets
stuck in a non-terminal state, dispatches never delivered.

Safe with many sweepers at once (every worker runs one). On PostgreSQL each pass locks the rows
it takes with `FOR UPDATE SKIP LOCKED`, so concurrent sweepers share the work instead of
colliding; on every database a stuck ticket is taken with a compare-and-set on its
`state_changed_at` (through the state module), so one sweeper wins it, and a dispatch is only
re-sent when no delivery message for its ticket was enqueued within the deadline. A duplicate
that still slips through costs a message, not an effect: every handler is idempotent.

A dispatch to a queue no department owns any more (the department was removed from the
taxonomy while tickets waited for it) would wait for ever: no worker consumes that queue. It
is dead-lettered instead, visible in `dlq list`; replaying it classifies the ticket again,
under the current taxonomy. Only after an hour (STRANDED_AFTER_SECONDS): a sweeper on an
older config, mid-deploy, must not dead-letter a newly added department's dispatches.

Deadlines: `received`/`queued` tickets and undelivered dispatches after `stuck_after_seconds`
with nothing waiting in the outbox (a retry delayed in the outbox is not stuck), and only when
their queue holds fewer messages than there are such tickets: a backlog (workers down, the
circuit open) is not a loss, and re-sending every waiting ticket would flood the broker with
copies. `classifying` tickets after the classify lease too, the longest a live worker may hold
one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from triage.db.models import Dispatch, OutboxMessage, Ticket, TicketState, utcnow
from triage.db.session import session_scope
from triage.errors import PermanentError, loggable_traceback
from triage.metrics import DEAD_NOTICES_DROPPED, STAGE_FAILURES
from triage.pipeline.broker import queue_depth, trim_queue
from triage.pipeline.celery_app import all_queues
from triage.pipeline.relay import CLASSIFY_TASK, DELIVER_TASK, enqueue_classify, enqueue_delivery
from triage.pipeline.routing import CLASSIFY_QUEUE, DEAD_QUEUE
from triage.pipeline.runtime import Runtime
from triage.pipeline.states import transition
from triage.reliability.deadletter import dead_letter
from triage.reliability.retry import classify_lease_seconds

log = logging.getLogger(__name__)
S = TicketState
STUCK_STATES = (S.RECEIVED.value, S.QUEUED.value, S.CLASSIFYING.value)
# A dispatch to a queue this sweeper's taxonomy does not know is dead-lettered only after this
# long (or the stuck deadline, if longer). During a rolling deploy that adds a department, a
# sweeper still on the old config sees the new department's dispatches as stranded, while the
# new workers consume them; an hour outlasts a deploy. A department really removed keeps its
# waiting tickets out of `dlq list` for an hour more.
STRANDED_AFTER_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class SweepReport:
    relayed: int
    requeued_tickets: int
    requeued_deliveries: int
    # Dispatches to a queue no department owns any more, dead-lettered.
    stranded_deliveries: int = 0
    # Sent outbox rows past TRIAGE_OUTBOX_RETENTION_HOURS, deleted.
    pruned_outbox: int = 0
    # Oldest triage.dead messages past TRIAGE_DEAD_QUEUE_MAX_LENGTH, dropped.
    dropped_dead_notices: int = 0


def _no_pending_outbox(ticket_id_col: Any) -> Any:
    return ~exists().where(
        OutboxMessage.ticket_id == ticket_id_col, OutboxMessage.sent_at.is_(None)
    )


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


class BrokerDepths:
    """How many ids may be waiting on each queue (messages x the batch size), asked once per
    pass. None when the broker cannot say (it is down: then nothing published now would get
    there either)."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._per_message = rt.settings.batch_size
        self._known: dict[str, int | None] = {}

    def __call__(self, queue: str) -> int | None:
        if queue not in self._known:
            messages = queue_depth(self._rt.celery, queue)
            self._known[queue] = None if messages is None else messages * self._per_message
        return self._known[queue]


def _not_all_on_broker(depth: int | None, candidates: int) -> bool:
    """Whether `candidates` tickets waiting for `stuck_after` on a queue that may hold `depth`
    of them cannot all be there: a backlog is not a loss. The broker cannot be asked for one
    message, so a queue that may hold the candidates is given the benefit of the doubt until
    it drains below them (a lost message then waits for the backlog, never for ever)."""
    return depth is not None and depth < candidates


def sweep_once(rt: Runtime, *, stuck_after: float | None = None, limit: int = 500) -> SweepReport:
    relayed = rt.publisher.relay_pending()
    now = utcnow()
    deadline = stuck_after or rt.settings.stuck_after_seconds
    cutoff = now - timedelta(seconds=deadline)
    lease_cutoff = now - timedelta(seconds=max(deadline, classify_lease_seconds(rt.settings)))
    outbox_ids: list[int] = []
    depth = BrokerDepths(rt)
    queues = set(all_queues(rt.config))
    with session_scope(rt.sessions) as session:
        tickets = _requeue_tickets(session, cutoff, lease_cutoff, limit, depth, outbox_ids)
    with session_scope(rt.sessions) as session:
        stranded_cutoff = now - timedelta(seconds=max(deadline, STRANDED_AFTER_SECONDS))
        stranded = _dead_letter_stranded(session, stranded_cutoff, limit, queues, outbox_ids)
    if stranded:
        # Counted once committed, as the guard counts the stages' dead letters.
        STAGE_FAILURES.labels(
            stage="classify", outcome="dead", error_type=PermanentError.__name__
        ).inc(stranded)
    with session_scope(rt.sessions) as session:
        deliveries = _requeue_deliveries(session, cutoff, limit, depth, queues, outbox_ids)
    if outbox_ids:
        log.warning("sweeper re-enqueued %d tickets, %d deliveries", tickets, deliveries)
        rt.publisher.publish(outbox_ids)
    # Never sooner than the deadlines above look back: "a delivery message sent lately"
    # must still find the row.
    keep = max(rt.settings.outbox_retention_hours * 3600, 2 * deadline)
    with session_scope(rt.sessions) as session:
        pruned = prune_outbox(session, now - timedelta(seconds=keep), PRUNE_BATCH)
    return SweepReport(
        relayed=relayed,
        requeued_tickets=tickets,
        requeued_deliveries=deliveries,
        stranded_deliveries=stranded,
        pruned_outbox=pruned,
        dropped_dead_notices=_bound_dead_queue(rt),
    )


def _bound_dead_queue(rt: Runtime) -> int:
    """Keep triage.dead to its configured length on Redis (the only consumer may be none)."""
    keep = rt.settings.dead_queue_max_length
    if not keep:
        return 0
    dropped = trim_queue(rt.celery, DEAD_QUEUE, keep) or 0
    if dropped:
        DEAD_NOTICES_DROPPED.inc(dropped)
        log.warning(
            "dropped the %d oldest messages on %s to keep it to %d (TRIAGE_DEAD_QUEUE_MAX_LENGTH);"
            " their dead letters are in the database: triage dlq list",
            dropped,
            DEAD_QUEUE,
            keep,
        )
    return dropped


# Rows deleted per pass, at most: every worker sweeps every few seconds, so this keeps up with
# thousands of tickets a second while each pass stays short.
PRUNE_BATCH = 5000


def prune_outbox(session: Session, sent_before: datetime, limit: int) -> int:
    """Delete up to `limit` outbox rows sent before `sent_before` (found through the pending
    index, whose first column is sent_at). Rows not yet sent are never touched."""
    chosen = (
        select(OutboxMessage.id)
        .where(OutboxMessage.sent_at < sent_before)
        .order_by(OutboxMessage.sent_at)
        .limit(limit)
    )
    if _postgres(session):
        # Concurrent sweepers take different rows instead of waiting on each other's.
        chosen = chosen.with_for_update(skip_locked=True)
    result = session.execute(
        delete(OutboxMessage)
        .where(OutboxMessage.id.in_(chosen.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _requeue_tickets(
    session: Session,
    cutoff: datetime,
    lease_cutoff: datetime,
    limit: int,
    depth: Callable[[str], int | None],
    out: list[int],
) -> int:
    query = (
        select(Ticket.id, Ticket.state, Ticket.state_changed_at)
        .where(
            or_(
                and_(
                    Ticket.state.in_([S.RECEIVED.value, S.QUEUED.value]),
                    Ticket.state_changed_at < cutoff,
                ),
                and_(
                    Ticket.state == S.CLASSIFYING.value,
                    Ticket.state_changed_at < lease_cutoff,
                ),
            ),
            _no_pending_outbox(Ticket.id),
        )
        .order_by(Ticket.state_changed_at)
        .limit(limit)
    )
    if _postgres(session):
        query = query.with_for_update(skip_locked=True, of=Ticket)
    stuck = session.execute(query).all()
    waiting = sum(1 for _id, state, _at in stuck if state != S.CLASSIFYING.value)
    if waiting and not _not_all_on_broker(depth(CLASSIFY_QUEUE), waiting):
        stuck = [row for row in stuck if row[1] == S.CLASSIFYING.value]
    requeued = 0
    for ticket_id, state, changed_at in stuck:
        # Back to queued: a classifying ticket's holder is past its lease (presumed dead), so
        # the new message may claim it at once. The compare-and-set on state_changed_at lets
        # one sweeper win.
        won = transition(
            session,
            ticket_id,
            S.QUEUED,
            only_from=frozenset({S(state)}),
            where=[Ticket.state_changed_at == changed_at],
        )
        if won:
            out.append(enqueue_classify(session, ticket_id))
            requeued += 1
    return requeued


def _undelivered(cutoff: datetime) -> Select[int, int, str, int]:
    """Dispatches of the tickets' current routing, undelivered since before `cutoff`."""
    return (
        select(Dispatch.id, Dispatch.ticket_id, Dispatch.route, Dispatch.generation)
        .join(Ticket, Ticket.id == Dispatch.ticket_id)
        .where(
            Dispatch.delivered_at.is_(None),
            Dispatch.created_at < cutoff,
            Ticket.generation == Dispatch.generation,
            Ticket.state.in_([S.ROUTED.value, S.NEEDS_REVIEW.value]),
        )
        .order_by(Dispatch.id)
    )


def _dead_letter_stranded(
    session: Session, cutoff: datetime, limit: int, consumed: set[str], out: list[int]
) -> int:
    query = _undelivered(cutoff).where(Dispatch.route.not_in(sorted(consumed))).limit(limit)
    if _postgres(session):
        query = query.with_for_update(skip_locked=True, of=Dispatch)
    stranded = 0
    for _dispatch_id, ticket_id, route, generation in session.execute(query).all():
        error = PermanentError(
            f"routed to {route}, which no department owns any more (removed from the "
            "taxonomy?): replaying classifies the ticket again under the current taxonomy",
            ticket_id=ticket_id,
        )
        lettered = dead_letter(
            session,
            ticket_id=ticket_id,
            stage="classify",
            error=error,
            attempts=0,
            only_from=frozenset({S.ROUTED, S.NEEDS_REVIEW}),
            generation=generation,
            payload={
                "task": CLASSIFY_TASK,
                "queue": CLASSIFY_QUEUE,
                "args": {"ticket_id": ticket_id},
                "reason": f"no consumer for {route}",
            },
        )
        if lettered is not None:
            log.error("ticket %s dead-lettered: %s", ticket_id, error)
            out.append(lettered[1])
            stranded += 1
    return stranded


def _requeue_deliveries(
    session: Session,
    cutoff: datetime,
    limit: int,
    depth: Callable[[str], int | None],
    consumed: set[str],
    out: list[int],
) -> int:
    """Re-send undelivered dispatches whose queue lost their messages. Only to queues this
    sweeper's taxonomy knows: another queue is a department removed (the stranded rule takes
    it) or, mid-deploy, one added that sweepers on the new config look after."""
    recent_delivery_message = exists().where(
        OutboxMessage.ticket_id == Dispatch.ticket_id,
        OutboxMessage.task == DELIVER_TASK,
        or_(OutboxMessage.sent_at.is_(None), OutboxMessage.created_at >= cutoff),
    )
    query = (
        _undelivered(cutoff)
        .where(~recent_delivery_message, Dispatch.route.in_(sorted(consumed)))
        .limit(limit)
    )
    if _postgres(session):
        query = query.with_for_update(skip_locked=True, of=Dispatch)
    undelivered = session.execute(query).all()
    per_route = Counter(route for _d, _t, route, _g in undelivered)
    lost = {route for route, n in per_route.items() if _not_all_on_broker(depth(route), n)}
    requeued = 0
    for dispatch_id, ticket_id, route, _generation in undelivered:
        if route in lost:
            out.append(
                enqueue_delivery(session, ticket_id=ticket_id, dispatch_id=dispatch_id, route=route)
            )
            requeued += 1
    return requeued


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
            except Exception as exc:  # noqa: BLE001 - logged; the next pass runs
                log.error("%s pass failed\n%s", self._thread.name, loggable_traceback(exc))

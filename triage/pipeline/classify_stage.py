"""Stage 1: a stored ticket becomes a stored label and a dispatch.

Three short transactions, none held across the model call:
  begin   claim the ticket (state -> classifying) and look for a reusable label
  call    reuse, or redact and ask the backend
  finish  store the Classification, route, write the Dispatch and its outbox message
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from triage.classify.backends.base import ClassificationRequest, ClassificationResult, Usage
from triage.classify.prompt import estimate_input_tokens
from triage.classify.redact import redact
from triage.classify.schema import TicketLabel
from triage.db.models import (
    Attempt,
    Classification,
    DeadLetter,
    Dispatch,
    Ticket,
    TicketState,
    utcnow,
)
from triage.db.session import session_scope
from triage.errors import RateLimited, TransientError, TriageError
from triage.metrics import CLASSIFICATIONS, CLASSIFY_COST, CLASSIFY_LATENCY, CLASSIFY_TOKENS
from triage.pipeline.relay import CLASSIFY_TASK, enqueue_classify, enqueue_delivery
from triage.pipeline.routing import CLASSIFY_QUEUE, Route, decide_route
from triage.pipeline.runtime import Runtime
from triage.pipeline.states import transition
from triage.reliability.guard import StageFailure, handle_failure
from triage.reliability.limits import Admission
from triage.reliability.retry import classify_lease_seconds, policy_for

log = logging.getLogger(__name__)
S = TicketState
CLAIMABLE = frozenset({S.RECEIVED, S.QUEUED, S.CLASSIFYING})


@dataclass(frozen=True, slots=True)
class _Claim:
    ticket_id: int
    attempt: int
    generation: int
    received_at: datetime
    request: ClassificationRequest
    reuse: Classification | None


# Waits up to this long are slept through on the worker thread; longer ones put the ticket
# back on the queue so the thread can serve tickets that may go now.
MAX_INLINE_WAIT = 1.0


def classify_ticket_stage(
    rt: Runtime,
    ticket_id: int,
    *,
    reuse: bool = True,
    max_inline_wait: float = MAX_INLINE_WAIT,
) -> str:
    """Claim, label, route and dispatch one ticket. `reuse=False` always asks the backend
    (reprocessing wants a fresh label); `max_inline_wait` is how long this thread may sleep for
    the shared API budget before the ticket goes back on the queue instead (the CLI, which has
    nothing else to do, waits as long as it takes)."""
    claim = _begin(rt, ticket_id, reuse=reuse)
    if isinstance(claim, str):
        return claim
    max_attempts = policy_for("classify", rt.settings).max_attempts
    if claim.attempt > max_attempts:
        # Earlier attempts ended without an outcome (the worker died mid-call, say, every
        # time): the attempt bound holds for those too, or a ticket that crashes its worker
        # would be redelivered for ever.
        lost = TransientError(
            f"{claim.attempt - 1} attempts started, none finished with an outcome "
            "(worker lost mid-attempt?)"
        )
        return handle_failure(rt, _failure(rt, claim, 0), lost)
    if claim.reuse is None:
        wait = _admission_wait(rt, claim, max_inline_wait)
        if wait > 0:
            return _defer(rt, claim, wait)
    try:
        result = _reuse(claim.reuse) if claim.reuse else rt.backend.classify(claim.request)
    except Exception as exc:  # noqa: BLE001 - the guard names and decides every failure
        if isinstance(exc, RateLimited) and rt.admission is not None:
            _record_overload(rt.admission, exc)
        calls = exc.api_calls if isinstance(exc, TriageError) else 0
        return handle_failure(rt, _failure(rt, claim, calls), exc)
    if result.calls and rt.admission is not None:
        _record_success(rt.admission)
    _observe(result)
    return _finish(rt, claim, result)


def _record_success(admission: Admission) -> None:
    try:
        admission.breaker.record_success()
    except Exception as exc:  # noqa: BLE001 - the label is good; a lost count must not undo it
        log.warning("circuit breaker not updated: %s", exc)


def _record_overload(admission: Admission, exc: RateLimited) -> None:
    try:
        admission.breaker.record_overload(exc.retry_after)
    except Exception as err:  # noqa: BLE001 - the retry decision must not depend on Redis
        log.warning("circuit breaker not updated: %s", err)


def _admission_wait(rt: Runtime, claim: _Claim, max_inline_wait: float) -> float:
    """Seconds this call must still wait for the shared budget or an open circuit after
    sleeping up to `max_inline_wait` (0: go now)."""
    if rt.admission is None:
        return 0.0
    tokens = estimate_input_tokens(rt.config.taxonomy, claim.request)
    try:
        wait = rt.admission.wait_seconds(tokens)
        slept = 0.0
        while wait > 0 and slept + wait <= max_inline_wait:
            time.sleep(wait)
            slept += wait
            wait = rt.admission.wait_seconds(tokens)
    except Exception as exc:  # noqa: BLE001 - see below
        # The shared budget lives in Redis. Without it, call anyway: the API's own 429s are
        # the retry policy's to handle, while refusing would stall every ticket on Redis.
        log.warning("API budget unavailable (%s); calling without it", exc)
        return 0.0
    return wait


def _defer(rt: Runtime, claim: _Claim, wait: float) -> str:
    """Back on the queue for later, without spending an attempt: waiting for our own budget
    or for the API to recover is not the ticket's failure."""
    with session_scope(rt.sessions) as session:
        transition(
            session,
            claim.ticket_id,
            S.QUEUED,
            only_from=frozenset({S.CLASSIFYING}),
            attempts=Ticket.attempts - 1,
        )
        # Jitter, so tickets deferred together do not all come back in the same instant.
        jitter = random.uniform(0, min(wait, 5.0))
        outbox_id = enqueue_classify(session, claim.ticket_id, countdown=wait + jitter).id
    rt.publisher.publish([outbox_id])
    return "deferred"


def _begin(rt: Runtime, ticket_id: int, *, reuse: bool = True) -> _Claim | str:
    settings = rt.settings
    # A ticket another worker is classifying right now is left alone for this long; after it,
    # the holder is presumed dead (the message came back) and the ticket is taken over.
    lease = timedelta(seconds=classify_lease_seconds(settings))
    with session_scope(rt.sessions) as session:
        ticket = session.get(Ticket, ticket_id)
        if ticket is None:
            log.error("classify: ticket %s does not exist", ticket_id)
            return "missing"
        if ticket.state not in CLAIMABLE:
            return "noop"
        now = utcnow()
        fresh_holder = ticket.state == S.CLASSIFYING and ticket.state_changed_at > now - lease
        if fresh_holder:
            _reschedule(session, ticket, lease - (now - ticket.state_changed_at))
            return "deferred"
        moved = transition(
            session,
            ticket_id,
            S.CLASSIFYING,
            only_from=CLAIMABLE,
            # The lease in the same atomic check, not the timestamp we read: the relay may
            # move received -> queued between our read and this update, which must not cost
            # the claim (the message is already in our hands).
            where=[
                or_(
                    Ticket.state != S.CLASSIFYING.value,
                    Ticket.state_changed_at <= now - lease,
                )
            ],
            attempts=Ticket.attempts + 1,
        )
        if not moved:
            return "noop"
        return _Claim(
            ticket_id=ticket.id,
            attempt=ticket.attempts + 1,
            generation=ticket.generation,
            received_at=ticket.received_at,
            request=build_request(rt, ticket),
            reuse=_find_reusable(rt, session, ticket) if reuse else None,
        )


def _age_seconds(rt: Runtime, claim: _Claim) -> float:
    """The classify stage's age, for the retry decision: from receipt, or from the latest
    replay of a dead letter (a replay is a fresh run, not an old one already too old to
    retry). Asked only when an attempt fails, not on every claim."""
    with rt.sessions() as session:
        replayed = session.scalar(
            select(func.max(DeadLetter.replayed_at)).where(DeadLetter.ticket_id == claim.ticket_id)
        )
    started = max(claim.received_at, replayed) if replayed else claim.received_at
    return (utcnow() - started).total_seconds()


def _reschedule(session: Session, ticket: Ticket, wait: timedelta) -> None:
    enqueue_classify(session, ticket.id, countdown=max(1.0, wait.total_seconds()))


def build_request(rt: Runtime, ticket: Ticket) -> ClassificationRequest:
    """What the backend may see of a ticket: cleaned text, personal data redacted."""
    subject, body = ticket.subject, ticket.clean_text or ticket.body
    if rt.settings.redact_personal_data:
        names = [n for n in (ticket.requester_name,) if n]
        emails = [e for e in (ticket.requester_email,) if e]
        subject = redact(subject, names=names, emails=emails)
        body = redact(body, names=names, emails=emails)
    return ClassificationRequest(
        ticket_id=ticket.id, subject=subject, body=body, channel=ticket.channel
    )


def _find_reusable(rt: Runtime, session: Session, ticket: Ticket) -> Classification | None:
    window = rt.settings.reuse_window_hours
    if window <= 0:
        return None
    since = utcnow() - timedelta(hours=window)
    return session.scalar(
        select(Classification)
        .join(Ticket, Ticket.id == Classification.ticket_id)
        .where(
            Ticket.content_hash == ticket.content_hash,
            Ticket.id != ticket.id,
            Classification.taxonomy_version == rt.config.taxonomy.version,
            Classification.backend == rt.backend.name,
            Classification.reused_from_id.is_(None),
            Classification.created_at >= since,
        )
        .order_by(Classification.id.desc())
        .limit(1)
    )


def _reuse(source: Classification) -> ClassificationResult:
    return ClassificationResult(
        label=TicketLabel(**source.label_fields()),
        backend=source.backend,
        model=source.model,
        prompt_version=source.prompt_version,
        latency_ms=0.0,
        usage=Usage(),
        calls=0,
        reused_from_id=source.id,
    )


def _failure(rt: Runtime, claim: _Claim, api_calls: int) -> StageFailure:
    def back_to_queued(session: Session) -> None:
        transition(session, claim.ticket_id, S.QUEUED, only_from=frozenset({S.CLASSIFYING}))

    return StageFailure(
        ticket_id=claim.ticket_id,
        stage="classify",
        attempt=claim.attempt,
        age_seconds=_age_seconds(rt, claim),
        task=CLASSIFY_TASK,
        queue=CLASSIFY_QUEUE,
        args={"ticket_id": claim.ticket_id},
        on_retry=back_to_queued,
        api_calls=api_calls,
        dead_from=CLAIMABLE,
    )


def _finish(rt: Runtime, claim: _Claim, result: ClassificationResult) -> str:
    with session_scope(rt.sessions) as session:
        recorded = _record(rt, session, claim, result)
        if recorded is None:
            # Another worker finished this ticket first; its label stands and this one is
            # dropped with the transaction.
            session.rollback()
            return "superseded"
        outcome, _, outbox_id = recorded
    rt.publisher.publish([outbox_id])
    return outcome


def _record(
    rt: Runtime, session: Session, claim: _Claim, result: ClassificationResult
) -> tuple[str, int, int] | None:
    """Store the label, route and dispatch in the caller's transaction. Returns the outcome,
    the new Classification's id and the delivery message to publish, or None when the ticket
    is no longer ours."""
    route = decide_route(rt.config.taxonomy, result.label)
    row = _classification_row(rt, claim, result)
    session.add(row)
    session.flush()
    moved = transition(
        session,
        claim.ticket_id,
        S.CLASSIFIED,
        only_from=frozenset({S.CLASSIFYING}),
        current_classification_id=row.id,
        last_error=None,
    )
    if not moved:
        return None
    outbox_id = _dispatch(session, claim, row, route)
    session.add(
        Attempt(
            ticket_id=claim.ticket_id,
            stage="classify",
            number=claim.attempt,
            finished_at=utcnow(),
            outcome="reused" if result.reused_from_id else "ok",
            request_id=result.request_id,
            api_calls=result.calls,
            latency_ms=result.latency_ms,
        )
    )
    return ("review" if route.needs_review else "routed"), row.id, outbox_id


# A ticket that has finished (or failed) classification may be classified again.
REOPENABLE = frozenset({S.ROUTED, S.NEEDS_REVIEW, S.DEAD_LETTERED})


def reopen(session: Session, ticket_id: int, generation: int) -> bool:
    """Send a finished ticket back to classification as generation `generation + 1` (for
    reprocessing). Earlier labels and dispatches stay as history. Compare-and-set on the
    generation, so two reprocessors cannot both reopen it. The caller enqueues or classifies."""
    moved = transition(
        session,
        ticket_id,
        S.QUEUED,
        only_from=REOPENABLE,
        where=[Ticket.generation == generation],
        generation=generation + 1,
        attempts=0,
        department=None,
        review_reason=None,
    )
    if moved:
        # A dead-lettered ticket classified again is, in effect, replayed: its open letters
        # must not stay in `dlq list` as if it still needed an operator.
        session.execute(
            update(DeadLetter)
            .where(DeadLetter.ticket_id == ticket_id, DeadLetter.replayed_at.is_(None))
            .values(replayed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return moved


def record_label(
    rt: Runtime, session: Session, ticket: Ticket, result: ClassificationResult
) -> tuple[str, int, int] | None:
    """Give a finished ticket a label produced outside the queue (a Message Batches result):
    a new generation, the Classification row, route and dispatch, all in the caller's
    transaction. Returns (outcome, classification id, delivery outbox id to publish after
    commit), or None when the ticket is not in a finished state any more."""
    generation = ticket.generation
    if not reopen(session, ticket.id, generation):
        return None
    transition(
        session,
        ticket.id,
        S.CLASSIFYING,
        only_from=frozenset({S.QUEUED}),
        attempts=Ticket.attempts + 1,
    )
    claim = _Claim(
        ticket_id=ticket.id,
        attempt=1,
        generation=generation + 1,
        received_at=ticket.received_at,
        request=build_request(rt, ticket),
        reuse=None,
    )
    return _record(rt, session, claim, result)


def _dispatch(session: Session, claim: _Claim, row: Classification, route: Route) -> int:
    target = S.NEEDS_REVIEW if route.needs_review else S.ROUTED
    transition(
        session,
        claim.ticket_id,
        target,
        only_from=frozenset({S.CLASSIFIED}),
        department=route.department,
        review_reason=route.reason,
    )
    dispatch = Dispatch(
        ticket_id=claim.ticket_id,
        classification_id=row.id,
        generation=claim.generation,
        route=route.queue,
        department=route.department,
        rule=route.rule,
    )
    session.add(dispatch)
    session.flush()
    return enqueue_delivery(
        session, ticket_id=claim.ticket_id, dispatch_id=dispatch.id, route=route.queue
    ).id


def _classification_row(rt: Runtime, claim: _Claim, result: ClassificationResult) -> Classification:
    label, usage = result.label, result.usage
    return Classification(
        ticket_id=claim.ticket_id,
        generation=claim.generation,
        intent=label.intent,
        department=label.department,
        priority=label.priority,
        language=label.language,
        sentiment=label.sentiment,
        confidence=label.confidence,
        summary=label.summary,
        backend=result.backend,
        model=result.model,
        taxonomy_version=rt.config.taxonomy.version,
        prompt_version=result.prompt_version,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cost_usd=usage.cost_usd,
        latency_ms=result.latency_ms,
        attempt=claim.attempt,
        calls=result.calls,
        request_id=result.request_id,
        reused_from_id=result.reused_from_id,
    )


def _observe(result: ClassificationResult) -> None:
    outcome = "reused" if result.reused_from_id else "labelled"
    CLASSIFICATIONS.labels(backend=result.backend, outcome=outcome).inc()
    if result.reused_from_id:
        return
    CLASSIFY_LATENCY.labels(backend=result.backend).observe(result.latency_ms / 1000)
    CLASSIFY_TOKENS.labels(model=result.model, kind="input").inc(result.usage.input_tokens)
    CLASSIFY_TOKENS.labels(model=result.model, kind="output").inc(result.usage.output_tokens)
    CLASSIFY_COST.labels(model=result.model).inc(float(result.usage.cost_usd))

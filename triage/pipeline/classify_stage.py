"""Stage 1: stored tickets become stored labels and dispatches.

A task message carries one ticket or a batch of them (see relay.Publisher). Per chunk of the
batch that this process has call slots for, three short transactions, none held across the
model calls:
  begin   claim the tickets (state -> classifying) and look for reusable labels
  call    reuse, or redact and ask the backend; the chunk's calls run side by side
  finish  store the Classifications, route, write the Dispatches and their outbox messages
Failures are per ticket: each goes to the guard on its own, and the rest of the chunk goes on.
Answers that arrive while the database is unreachable were paid for: they go back on the
broker with the task's retry (`AnswersNotRecorded`) and are recorded when it comes back.
A cascade's first answer whose escalation failed transiently is kept in the database instead,
on the failed attempt's row (the database is up then): the retry finds it there however it
comes back (outbox, sweeper, another worker after this one died) and pays only for the
escalation (`_first_answer`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import ColumnElement, bindparam, delete, func, select
from sqlalchemy.orm import Session

from triage.classify.backends.base import (
    ClassificationRequest,
    ClassificationResult,
    FirstAnswer,
    Usage,
)
from triage.classify.prompt import estimate_input_tokens
from triage.classify.redact import Redactor
from triage.classify.schema import TicketLabel, validate_label
from triage.db.models import (
    Attempt,
    Classification,
    Dispatch,
    Ticket,
    TicketState,
    utcnow,
)
from triage.db.session import insert_rows, session_scope
from triage.errors import (
    RateLimited,
    RequestNotPrepared,
    TransientError,
    TriageError,
    loggable_traceback,
)
from triage.metrics import CLASSIFICATIONS, CLASSIFY_LATENCY, TICKETS_CLASSIFIED
from triage.pipeline.fanout import SLOT_PATIENCE_SECONDS, HeldSlots
from triage.pipeline.relay import (
    CLASSIFY_TASK,
    Pending,
    delivery_values,
    enqueue_classify,
    write_outbox,
)
from triage.pipeline.routing import CLASSIFY_QUEUE, Route, decide_route
from triage.pipeline.runtime import Runtime
from triage.pipeline.states import claim_for_classification, transition, transition_each
from triage.reliability.deadletter import close_open_letters
from triage.reliability.guard import StageFailure, handle_failure, usage_values
from triage.reliability.limits import Admission
from triage.reliability.retry import classify_lease_seconds, is_database_outage, policy_for

log = logging.getLogger(__name__)
S = TicketState
CLAIMABLE = frozenset({S.RECEIVED, S.QUEUED, S.CLASSIFYING})


class _Holder(Protocol):
    """Whose answer a label is: the ticket, and the generation and attempt of its claim."""

    @property
    def ticket_id(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def generation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class _Carried:
    ticket_id: int
    attempt: int
    generation: int


@dataclass(frozen=True, slots=True)
class _Claim:
    ticket_id: int
    attempt: int
    generation: int
    received_at: datetime
    request: ClassificationRequest
    # Another ticket's label to reuse instead of a call.
    reuse: ClassificationResult | None
    content_hash: str


@dataclass(frozen=True, slots=True)
class _Unprepared:
    """A claimed ticket whose request could not be prepared: a failed attempt of its own."""

    ticket_id: int
    attempt: int
    generation: int
    received_at: datetime
    error: Exception


_RESULT: TypeAdapter[ClassificationResult] = TypeAdapter(ClassificationResult)


class AnswersNotRecorded(Exception):
    """Answers the model gave, and was paid for, that the database could not take. `carried`
    is them in JSON, for the task's retry message: asked again, each would be paid twice, and
    would wait for its claim's lease to run out first."""

    def __init__(self, carried: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(carried)} answers not yet recorded (database unavailable)")
        self.carried = carried


def _carry(answers: Sequence[tuple[_Holder, ClassificationResult]]) -> list[dict[str, Any]]:
    return [
        {
            "ticket_id": holder.ticket_id,
            "attempt": holder.attempt,
            "generation": holder.generation,
            "result": _RESULT.dump_python(result, mode="json"),
        }
        for holder, result in answers
    ]


def _uncarry(carried: list[dict[str, Any]]) -> list[tuple[_Holder, ClassificationResult]]:
    return [
        (
            _Carried(int(c["ticket_id"]), int(c["attempt"]), int(c["generation"])),
            _RESULT.validate_python(c["result"]),
        )
        for c in carried
    ]


# Waits up to this long are slept through on the worker thread; longer ones put the ticket
# back on the queue so the thread can serve tickets that may go now.
MAX_INLINE_WAIT = 1.0
# A ticket with the same text as another of its batch comes back after this long (plus
# jitter), by when the other's label is usually recorded for it to reuse.
SAME_TEXT_WAIT = 3.0


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
    outcomes = classify_tickets_stage(rt, [ticket_id], reuse=reuse, max_inline_wait=max_inline_wait)
    return outcomes[ticket_id]


def classify_tickets_stage(
    rt: Runtime,
    ticket_ids: Sequence[int],
    *,
    reuse: bool = True,
    max_inline_wait: float = MAX_INLINE_WAIT,
    carried: list[dict[str, Any]] | None = None,
) -> dict[int, str]:
    """`classify_ticket_stage` for a batch; returns each ticket's outcome. `carried` are
    answers an earlier run of the message could not record (`AnswersNotRecorded.carried`):
    they are recorded first, with no call.

    A batch larger than the free call slots goes in parts, each claiming only the tickets it
    has slots for. A part that leaves tickets behind runs beside the next ones, which start
    as slots come back, so one slow call does not hold up the tickets after it. Every part
    has finished before this returns (or raises): the message is acknowledged only then."""
    outcomes: dict[int, str] = {}
    if carried:
        outcomes.update(_record_carried(rt, carried))
    pending = [i for i in dict.fromkeys(ticket_ids) if i not in outcomes]
    beside: list[Future[dict[int, str]]] = []
    errors: list[Exception] = []
    slots = rt.calls.slots
    # Until they have slots, these tickets count against what the consumer fetches next.
    slots.expect(len(pending))
    try:
        while pending:
            taken = slots.take(len(pending), SLOT_PATIENCE_SECONDS)
            slots.expect(-taken)
            held = HeldSlots(slots, taken)
            chunk, pending = pending[:taken], pending[taken:]
            if pending:
                part = partial(_run_chunk, rt, chunk, reuse, max_inline_wait, held)
                beside.append(rt.calls.beside(part))
            else:
                try:
                    outcomes.update(_run_chunk(rt, chunk, reuse, max_inline_wait, held))
                except Exception as exc:  # noqa: BLE001 - raised below, once every part is done
                    errors.append(exc)
    finally:
        slots.expect(-len(pending))
        wait(beside)
    for finished in beside:
        try:
            outcomes.update(finished.result())
        except Exception as exc:  # noqa: BLE001 - raised below
            errors.append(exc)
    if errors:
        raise _first_or_carried(errors)
    return outcomes


def _first_or_carried(errors: list[Exception]) -> Exception:
    """The error to fail the message with: every part's unrecorded answers together, so
    the retry carries them all; otherwise the first failure."""
    unrecorded = [e for e in errors if isinstance(e, AnswersNotRecorded)]
    if not unrecorded:
        return errors[0]
    for other in errors:
        if not isinstance(other, AnswersNotRecorded) and not is_database_outage(other):
            log.error("classify: a part of the batch failed\n%s", loggable_traceback(other))
    merged = AnswersNotRecorded([answer for e in unrecorded for answer in e.carried])
    merged.__cause__ = unrecorded[0].__cause__
    return merged


def _record_carried(rt: Runtime, carried: list[dict[str, Any]]) -> dict[int, str]:
    """Record answers brought back by a retried message. A ticket still under the claim
    they answered takes its label as if it had just arrived. One that has moved on keeps its
    own course, and the answer is kept as superseded: new text, another worker's label or
    claim (the outage outlasted the lease), or a claim the database lost with its last
    commits (a failover to a lagging replica), after which the ticket is asked again.

    An answer whose intent the taxonomy no longer has (a worker with a newer taxonomy took
    the retry) cannot be routed: it is dropped, and its ticket is asked again once its claim's
    lease is over, as if the answer had never come."""
    answers = _uncarry(carried)
    intents = set(rt.config.taxonomy.intent_names)
    routable = [(holder, result) for holder, result in answers if result.label.intent in intents]
    if len(routable) < len(answers):
        log.warning(
            "classify: %d carried answers name an intent the taxonomy no longer has; their "
            "tickets will be asked again",
            len(answers) - len(routable),
        )
    try:
        return _finish(rt, routable)
    except Exception as exc:
        if is_database_outage(exc):
            raise AnswersNotRecorded(carried) from exc
        raise


def _run_chunk(
    rt: Runtime, ticket_ids: list[int], reuse: bool, max_inline_wait: float, held: HeldSlots
) -> dict[int, str]:
    try:
        return _classify_chunk(rt, ticket_ids, reuse, max_inline_wait, held)
    finally:
        held.give_rest()


def _classify_chunk(
    rt: Runtime, ticket_ids: list[int], reuse: bool, max_inline_wait: float, held: HeldSlots
) -> dict[int, str]:
    outcomes: dict[int, str] = {}
    claims = _begin(rt, ticket_ids, reuse, outcomes)
    max_attempts = policy_for("classify", rt.settings).max_attempts
    going: list[_Claim] = []
    for claim in claims:
        if claim.attempt > max_attempts:
            # Earlier attempts ended without an outcome (the worker died mid-call, say, every
            # time): the attempt bound holds for those too, or a ticket that crashes its
            # worker would be redelivered for ever.
            lost = TransientError(
                f"{claim.attempt - 1} attempts started, none finished with an outcome "
                "(worker lost mid-attempt?)"
            )
            outcomes[claim.ticket_id] = handle_failure(rt, _failure(rt, claim), lost)
        else:
            going.append(claim)
    if reuse:
        going = _one_call_per_text(rt, going, outcomes)
    waits = _admission_waits(rt, [c for c in going if c.reuse is None], max_inline_wait)
    calling: list[_Claim] = []
    for claim in going:
        wait = waits.get(claim.ticket_id, 0.0)
        if wait > 0:
            outcomes[claim.ticket_id] = _defer(rt, claim, wait)
        else:
            calling.append(claim)
    # Slots are for calls: tickets that make none (not claimed, deferred, out of attempts)
    # free theirs now, and each call's slot is freed when its answer is in, so another task's
    # tickets can start while this batch's slowest calls are still out.
    held.give(held.count - len(calling))
    # With the database gone, the later waves' answers are paid for too: take them all
    # before failing, so the retry carries every one.
    outages: list[Exception] = []
    for wave in rt.calls.waves([_call_for(rt, claim) for claim in calling]):
        held.give(len(wave))
        try:
            outcomes.update(_settle(rt, [(calling[i], result) for i, result in wave]))
        except Exception as exc:
            if not (isinstance(exc, AnswersNotRecorded) or is_database_outage(exc)):
                raise
            outages.append(exc)
    if outages:
        raise _first_or_carried(outages)
    return outcomes


def _one_call_per_text(rt: Runtime, claims: list[_Claim], outcomes: dict[int, str]) -> list[_Claim]:
    """One call per text in a batch: the others with the same text are deferred (no attempt
    spent) and reuse that label when they come back. An outage brings bursts of identical
    tickets, often into one batch, where the reuse lookup (recorded labels only) found none
    and each paid for the same answer. If the first call fails, the others call themselves."""
    if rt.settings.reuse_window_hours <= 0:
        return claims
    calling: set[str] = set()
    kept: list[_Claim] = []
    for claim in claims:
        if claim.reuse is None:
            if claim.content_hash in calling:
                outcomes[claim.ticket_id] = _defer(rt, claim, SAME_TEXT_WAIT)
                continue
            calling.add(claim.content_hash)
        kept.append(claim)
    return kept


def _settle(
    rt: Runtime, answers: list[tuple[_Claim, ClassificationResult | Exception]]
) -> dict[int, str]:
    """Outcomes for the calls that have finished: labels recorded together, failures to the
    guard one by one. Labels go first: if the database is gone, they are what was paid for
    (`AnswersNotRecorded`); an unrecorded failure is retried once its claim's lease is over."""
    outcomes: dict[int, str] = {}
    done: list[tuple[_Claim, ClassificationResult]] = []
    failed: list[tuple[_Claim, Exception]] = []
    answered = 0
    for claim, result in answers:
        if isinstance(result, Exception):
            if isinstance(result, RateLimited) and rt.admission is not None:
                _record_overload(rt.admission, result)
            failed.append((claim, result))
            continue
        answered += 1 if result.paid_now()[0] else 0
        _observe(result)
        done.append((claim, result))
    if answered and rt.admission is not None:
        _record_success(rt.admission, answered)
    if rt.admission is not None and rt.admission.limiter.enabled:
        _charge_unadmitted(rt, rt.admission, answers)
    try:
        outcomes.update(_finish(rt, done))
    except Exception as exc:
        if is_database_outage(exc):
            raise AnswersNotRecorded(_carry(done)) from exc
        raise
    for claim, error in failed:
        paid = error if isinstance(error, TriageError) else None
        outcomes[claim.ticket_id] = handle_failure(rt, _failure(rt, claim, paid), error)
    return outcomes


def _charge_unadmitted(
    rt: Runtime,
    admission: Admission,
    answers: list[tuple[_Claim, ClassificationResult | Exception]],
) -> None:
    """Charge the shared budget for what went without asking it: each ticket was admitted for
    one call of its estimated size, but a repair call or an escalation makes more, and a
    ticket may read more tokens than estimated. Later calls then wait for the account's real
    spend instead of drawing 429s. One Redis call for the whole wave."""
    calls = tokens = 0
    for claim, result in answers:
        usage: Usage | None
        if isinstance(result, ClassificationResult):
            made, usage = result.paid_now()
        elif isinstance(result, TriageError):
            made, usage = result.api_calls, result.usage
        else:
            continue
        if made == 0:
            continue  # a reused label: nothing was admitted or spent
        calls += made - 1
        if usage is not None:
            # Cache reads do not count against the input-token rate limit; cache writes do.
            spent = usage.input_tokens + usage.cache_write_tokens
            tokens += max(0, spent - estimate_input_tokens(rt.config.taxonomy, claim.request))
    if calls or tokens:
        try:
            admission.limiter.charge(calls, tokens)
        except Exception as exc:  # noqa: BLE001 - the labels are good; a lost charge must not undo them
            log.warning("API budget not charged for %s calls, %s tokens: %s", calls, tokens, exc)


def _call_for(rt: Runtime, claim: _Claim) -> Any:
    if claim.reuse is not None:
        reused = claim.reuse
        return lambda: reused
    return lambda: rt.backend.classify(claim.request)


def _record_success(admission: Admission, count: int) -> None:
    try:
        admission.breaker.record_success(count)
    except Exception as exc:  # noqa: BLE001 - the label is good; a lost count must not undo it
        log.warning("circuit breaker not updated: %s", exc)


def _record_overload(admission: Admission, exc: RateLimited) -> None:
    try:
        admission.breaker.record_overload(exc.retry_after)
    except Exception as err:  # noqa: BLE001 - the retry decision must not depend on Redis
        log.warning("circuit breaker not updated: %s", err)


def _admission_waits(rt: Runtime, claims: list[_Claim], max_inline_wait: float) -> dict[int, float]:
    """Per ticket, the seconds its call must still wait for the shared budget or an open
    circuit after sleeping up to `max_inline_wait` (absent or 0: go now)."""
    if rt.admission is None or not claims:
        return {}
    tokens = [estimate_input_tokens(rt.config.taxonomy, c.request) for c in claims]
    try:
        waits = rt.admission.admit(tokens)
        slept = 0.0
        while True:
            waiting = [i for i, wait in enumerate(waits) if wait > 0]
            if not waiting:
                break
            shortest = min(waits[i] for i in waiting)
            if slept + shortest > max_inline_wait:
                break
            time.sleep(shortest)
            slept += shortest
            for i, wait in zip(
                waiting, rt.admission.admit([tokens[i] for i in waiting]), strict=True
            ):
                waits[i] = wait
    except Exception as exc:  # noqa: BLE001 - see below
        # The shared budget lives in Redis. Without it, call anyway: the API's own 429s are
        # the retry policy's to handle, while refusing would stall every ticket on Redis.
        log.warning("API budget unavailable (%s); calling without it", exc)
        return {}
    return {claim.ticket_id: wait for claim, wait in zip(claims, waits, strict=True)}


def _defer(rt: Runtime, claim: _Claim, wait: float) -> str:
    """Back on the queue for later, without spending an attempt: waiting for our own budget
    or for the API to recover is not the ticket's failure."""
    with session_scope(rt.sessions) as session:
        _unclaim(session, claim, attempts=Ticket.attempts - 1)
        # Jitter, so tickets deferred together do not all come back in the same instant.
        jitter = random.uniform(0, min(wait, 5.0))
        outbox_id = enqueue_classify(session, claim.ticket_id, countdown=wait + jitter)
    rt.publisher.publish([outbox_id])
    return "deferred"


def _begin(
    rt: Runtime, ticket_ids: list[int], reuse: bool, outcomes: dict[int, str]
) -> list[_Claim]:
    """Claim the tickets that are ours to classify; note an outcome for the others. A ticket
    whose request cannot be prepared fails alone, as an attempt of its own (its claim, and the
    attempt it counts, are committed with the others'), and the guard dead-letters it: were
    the claim rolled back instead, it would come back from the sweeper for ever."""
    # A ticket another worker is classifying right now is left alone for this long; after it,
    # the holder is presumed dead (the message came back) and the ticket is taken over.
    lease = timedelta(seconds=classify_lease_seconds(rt.settings))
    claims: list[_Claim] = []
    unprepared: list[_Unprepared] = []
    with session_scope(rt.sessions) as session:
        now = utcnow()
        claimed = claim_for_classification(
            session, ticket_ids, only_from=CLAIMABLE, stale_before=now - lease
        )
        taken = {ticket.id for ticket in claimed}
        others = [i for i in ticket_ids if i not in taken]
        if others:
            _not_claimed(session, others, now, lease, outcomes)
        reusable = _find_reusable(rt, session, claimed) if reuse else {}
        firsts = _stored_first_answers(session, claimed)
        for ticket in sorted(claimed, key=lambda t: ticket_ids.index(t.id)):
            try:
                claims.append(
                    _prepare(rt, ticket, reusable.get(ticket.id), firsts.get(ticket.id, []))
                )
            except Exception as exc:  # this ticket's failure alone, handled below
                if is_database_outage(exc):
                    raise
                unprepared.append(
                    _Unprepared(
                        ticket.id, ticket.attempts, ticket.generation, ticket.received_at, exc
                    )
                )
    for item in unprepared:
        # What preparing raised may quote the ticket's text it was working on.
        error = RequestNotPrepared(
            f"could not prepare the request: {item.error.__class__.__name__}",
            quoted=str(item.error),
            ticket_id=item.ticket_id,
        )
        error.__cause__ = item.error
        log.error("classify: ticket %s\n%s", error, loggable_traceback(item.error))
        outcomes[item.ticket_id] = handle_failure(rt, _failure(rt, item), error)
    return claims


def _prepare(
    rt: Runtime, ticket: Any, reusable: Classification | None, firsts: list[tuple[int, Any]]
) -> _Claim:
    """One claimed ticket's request: its text redacted, a label to reuse, a first answer."""
    return _Claim(
        ticket_id=ticket.id,
        attempt=ticket.attempts,
        generation=ticket.generation,
        received_at=ticket.received_at,
        request=_with_first_answer(build_request(rt, ticket), _first_answer(rt, ticket, firsts)),
        reuse=_reuse(reusable) if reusable is not None else None,
        content_hash=ticket.content_hash,
    )


def _stored_first_answers(
    session: Session, tickets: Sequence[Any]
) -> dict[int, list[tuple[int, Any]]]:
    """For each ticket on a retry, the first answers (`Attempt.answer`) its earlier attempts
    stored, oldest first, as stored: each is read for its own ticket (`_first_answer`)."""
    retried = sorted(t.id for t in tickets if t.attempts > 1)
    if not retried:
        return {}
    rows = session.execute(
        select(Attempt.id, Attempt.ticket_id, Attempt.answer)
        .where(
            Attempt.ticket_id.in_(retried),
            Attempt.stage == "classify",
            Attempt.answer.is_not(None),
        )
        .order_by(Attempt.id)
    ).all()
    stored: dict[int, list[tuple[int, Any]]] = {}
    for row in rows:
        stored.setdefault(row.ticket_id, []).append((row.id, row.answer))
    return stored


def _first_answer(rt: Runtime, ticket: Any, stored: list[tuple[int, Any]]) -> FirstAnswer | None:
    """The newest first answer an earlier attempt of this ticket's generation paid for, for
    the cascade to reuse. Another generation's is never reused: re-triaged text, a reprocess
    and a replayed dead letter all ask afresh. An answer the taxonomy no longer accepts (its
    intent was dropped, say) is asked again."""
    newest = [
        (attempt_id, answer["result"])
        for attempt_id, answer in stored
        if answer.get("generation") == ticket.generation
    ]
    if not newest:
        return None
    attempt_id, data = newest[-1]
    try:
        result = _RESULT.validate_python(data)
        validate_label(rt.config.taxonomy, result.label.model_dump())
    except ValidationError as exc:
        log.warning(
            "classify: ticket %s: the first answer of attempt row %s no longer validates "
            "(%s); asking again",
            ticket.id,
            attempt_id,
            # The field, not the message: a value error's message quotes the stored answer.
            ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else "(root)",
        )
        return None
    return FirstAnswer(attempt_id, result)


def _with_first_answer(
    request: ClassificationRequest, first: FirstAnswer | None
) -> ClassificationRequest:
    # Most tickets are on their first attempt: no copy for them.
    return request if first is None else replace(request, first_answer=first)


def _first_answer_record(generation: int, result: ClassificationResult) -> dict[str, Any]:
    """What `Attempt.answer` holds: a paid first answer and the generation it answered."""
    return {"generation": generation, "result": _RESULT.dump_python(result, mode="json")}


def _not_claimed(
    session: Session,
    ticket_ids: list[int],
    now: datetime,
    lease: timedelta,
    outcomes: dict[int, str],
) -> None:
    rows = session.execute(
        select(Ticket.id, Ticket.state, Ticket.state_changed_at).where(Ticket.id.in_(ticket_ids))
    ).all()
    known = {row.id: row for row in rows}
    for ticket_id in ticket_ids:
        row = known.get(ticket_id)
        if row is None:
            log.error("classify: ticket %s does not exist", ticket_id)
            outcomes[ticket_id] = "missing"
        elif row.state == S.CLASSIFYING and row.state_changed_at > now - lease:
            # Held by a live worker (or one not yet presumed dead): look again when its lease
            # is over, in case it never finishes.
            remaining = lease - (now - row.state_changed_at)
            enqueue_classify(session, ticket_id, countdown=max(1.0, remaining.total_seconds()))
            outcomes[ticket_id] = "deferred"
        else:
            outcomes[ticket_id] = "noop"


def _age_seconds(rt: Runtime, claim: _Claim | _Unprepared) -> float:
    """The classify stage's age, for the retry decision: from receipt, or from the start of
    the ticket's current generation (new text, a reprocess, a replayed dead letter: each a
    fresh run, not an old one already too old to retry). Asked only when an attempt fails,
    not on every claim."""
    with rt.sessions() as session:
        began = session.scalar(
            select(Ticket.generation_started_at).where(Ticket.id == claim.ticket_id)
        )
    started = max(claim.received_at, began) if began else claim.received_at
    return (utcnow() - started).total_seconds()


class TicketText(Protocol):
    """What a classification request is built from: a Ticket, or a row of its columns."""

    @property
    def id(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def clean_text(self) -> str: ...
    @property
    def channel(self) -> str | None: ...
    @property
    def requester_name(self) -> str | None: ...
    @property
    def requester_email(self) -> str | None: ...


# How far past the cut the redactor reads, so that nothing personal is cut in half.
CUT_SLACK = 200


def build_request(rt: Runtime, ticket: TicketText) -> ClassificationRequest:
    """What the backend may see of a ticket: cleaned text, at most `max_ticket_chars` of it,
    personal data redacted."""
    limit = rt.settings.max_ticket_chars
    subject, body = ticket.subject, ticket.clean_text or ticket.body
    whole = len(body)
    # Redacting a megabyte costs more than the call, so cut first, reading CUT_SLACK past
    # the cut: an email or phone number across it is whole when the redactor sees it. Only
    # what the slack cut could have split is dropped, from the end, after redaction.
    if whole > limit:
        body = body[: limit + CUT_SLACK]
    if rt.settings.redact_personal_data:
        redactor = Redactor(
            names=[n for n in (ticket.requester_name,) if n],
            emails=[e for e in (ticket.requester_email,) if e],
        )
        subject, body = redactor(subject), redactor(body)
    if whole > limit:
        sliced = whole > limit + CUT_SLACK
        body = body[: min(limit, len(body) - CUT_SLACK) if sliced else limit]
        body += f"\n[... about {whole - limit} more characters of this ticket are not shown]"
    return ClassificationRequest(
        ticket_id=ticket.id, subject=subject, body=body, channel=ticket.channel
    )


def _find_reusable(
    rt: Runtime, session: Session, tickets: Sequence[Any]
) -> dict[int, Classification]:
    """For each ticket, the newest first-hand label of another ticket with the same text,
    within the reuse window, from this taxonomy, backend and its configured models."""
    window = rt.settings.reuse_window_hours
    if window <= 0 or not tickets:
        return {}
    rows = session.execute(
        _REUSABLE,
        {
            "hashes": sorted({t.content_hash for t in tickets}),
            "ids": [t.id for t in tickets],
            "taxonomy": rt.config.taxonomy.version,
            "backend": rt.backend.name,
            "models": sorted(rt.backend.models),
            "since": utcnow() - timedelta(hours=window),
        },
    ).all()
    by_hash = {content_hash: label for label, content_hash in rows}
    return {t.id: by_hash[t.content_hash] for t in tickets if t.content_hash in by_hash}


# Built once (every value is a parameter). Driven from the tickets with these hashes (their
# index), each one's newest label found through the classifications' ticket index (a
# correlated subquery, which SQLite runs too). A join that left the order to the planner
# scanned every label in the window for each claim on PostgreSQL, whose statistics lag a
# fast-growing table: 7.7 ms against 0.1 ms at 4,000 labels.
_NEWEST_LABEL = (
    select(Classification.id)
    .where(
        Classification.ticket_id == Ticket.id,
        Classification.taxonomy_version == bindparam("taxonomy"),
        Classification.backend == bindparam("backend"),
        Classification.model.in_(bindparam("models", expanding=True)),
        Classification.reused_from_id.is_(None),
        Classification.created_at >= bindparam("since"),
    )
    .order_by(Classification.id.desc())
    .limit(1)
    .scalar_subquery()
)
_NEWEST_PER_HASH = (
    select(func.max(_NEWEST_LABEL).label("id"))
    .where(
        Ticket.content_hash.in_(bindparam("hashes", expanding=True)),
        Ticket.id.not_in(bindparam("ids", expanding=True)),
    )
    .group_by(Ticket.content_hash)
    .subquery("per_hash")
)
_REUSABLE = (
    select(Classification, Ticket.content_hash)
    .select_from(_NEWEST_PER_HASH)
    .join(Classification, Classification.id == _NEWEST_PER_HASH.c.id)
    .join(Ticket, Ticket.id == Classification.ticket_id)
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


def _held(claim: _Holder) -> tuple[ColumnElement[bool], ...]:
    """The ticket row is still under this attempt's claim (with state `classifying`): same
    generation, and the attempt count this claim set. Every claim counts one, and only the
    claim's own deferral takes it back, so another worker's claim since (after the lease, the
    sweeper handed the ticket over) or new text fails the check. Recording a label checks the
    same (`transition_each` with `attempts`)."""
    return (Ticket.generation == claim.generation, Ticket.attempts == claim.attempt)


def _unclaim(session: Session, claim: _Claim | _Unprepared, **fields: Any) -> bool:
    """Put a claimed ticket back to queued. Only this attempt's claim (`_held`): another
    worker may be classifying it now, and that claim is not ours to undo."""
    return transition(
        session,
        claim.ticket_id,
        S.QUEUED,
        only_from=frozenset({S.CLASSIFYING}),
        where=_held(claim),
        **fields,
    )


def _failure(
    rt: Runtime, claim: _Claim | _Unprepared, paid: TriageError | None = None
) -> StageFailure:
    """`paid`: the error the attempt's calls ended with, which counts them and their cost."""

    def back_to_queued(session: Session) -> bool:
        return _unclaim(session, claim)

    return StageFailure(
        ticket_id=claim.ticket_id,
        stage="classify",
        attempt=claim.attempt,
        age_seconds=_age_seconds(rt, claim),
        task=CLASSIFY_TASK,
        queue=CLASSIFY_QUEUE,
        args={"ticket_id": claim.ticket_id},
        on_retry=back_to_queued,
        api_calls=paid.api_calls if paid else 0,
        usage=paid.usage if paid else None,
        # Only from this attempt's claim: a ticket the sweeper put back to queued, or that
        # another worker holds now, is no longer this attempt's to dead-letter.
        dead_from=frozenset({S.CLASSIFYING}),
        generation=claim.generation,
        claim=_held(claim),
        answer=(
            _first_answer_record(claim.generation, paid.first_answer)
            if paid is not None and paid.first_answer is not None
            else None
        ),
    )


def _finish(rt: Runtime, done: Sequence[tuple[_Holder, ClassificationResult]]) -> dict[int, str]:
    if not done:
        return {}
    with session_scope(rt.sessions) as session:
        recorded = _record(rt, session, done, write=rt.publisher.write)
    for outcome in recorded.outcomes.values():
        TICKETS_CLASSIFIED.labels(outcome=outcome).inc()
    rt.publish_after_commit(recorded.outbox)
    return recorded.outcomes


def _unclaimed(session: Session, rows: list[dict[str, Any]]) -> list[Pending]:
    return write_outbox(session, rows, claimed=False)


@dataclass(slots=True)
class _Recorded:
    # Per ticket: routed | review | superseded (another worker finished it first).
    outcomes: dict[int, str]
    label_ids: dict[int, int]
    # Delivery messages to publish after commit.
    outbox: list[Pending]


def _record(
    rt: Runtime,
    session: Session,
    done: Sequence[tuple[_Holder, ClassificationResult]],
    *,
    write: Callable[[Session, list[dict[str, Any]]], list[Pending]] = _unclaimed,
) -> _Recorded:
    """Store the labels, route and dispatch in the caller's transaction, a statement per
    table for the whole batch. `write` writes the delivery messages (`Publisher.write` when
    the caller publishes them itself after the commit)."""
    # In ticket order: each INSERT locks the tickets its rows reference (the foreign key
    # check), and every other batch locks tickets in id order, so any other order here can
    # deadlock with, say, the relay marking the same tickets queued.
    done = sorted(done, key=lambda answer: answer[0].ticket_id)
    label_ids = insert_rows(
        session,
        Classification,
        [_classification_values(rt, claim, result) for claim, result in done],
    )
    recorded = _Recorded(outcomes={}, label_ids={}, outbox=[])
    routes = {
        claim.ticket_id: decide_route(rt.config.taxonomy, r.label, r.review_reason)
        for claim, r in done
    }
    labels = {
        claim.ticket_id: label_id for (claim, _), label_id in zip(done, label_ids, strict=True)
    }
    moved = transition_each(
        session,
        {i: S.NEEDS_REVIEW if route.needs_review else S.ROUTED for i, route in routes.items()},
        only_from=frozenset({S.CLASSIFYING}),
        generations={claim.ticket_id: claim.generation for claim, _ in done},
        attempts={claim.ticket_id: claim.attempt for claim, _ in done},
        each={
            "current_classification_id": labels,
            "department": {i: route.department for i, route in routes.items()},
            "review_reason": {i: route.reason for i, route in routes.items()},
        },
        last_error=None,
    )
    kept: list[tuple[_Holder, ClassificationResult, Route, int]] = []
    dropped: list[int] = []
    for claim, result in done:
        ticket_id, route = claim.ticket_id, routes[claim.ticket_id]
        if ticket_id in moved:
            kept.append((claim, result, route, labels[ticket_id]))
            recorded.label_ids[ticket_id] = labels[ticket_id]
            recorded.outcomes[ticket_id] = "review" if route.needs_review else "routed"
        else:
            # Another worker finished this ticket first or holds it now (our lease ran out),
            # or it has new text (a re-triage or reprocess since our claim): the other label
            # stands, or is yet to come; ours goes.
            dropped.append(labels[ticket_id])
            recorded.outcomes[ticket_id] = "superseded"
    if dropped:
        session.execute(delete(Classification).where(Classification.id.in_(dropped)))
    # Every attempt that got an answer is on record, a superseded one too: its call was paid
    # for, and the ticket's attempt count includes it.
    finished = utcnow()
    insert_rows(
        session,
        Attempt,
        [
            {
                "ticket_id": claim.ticket_id,
                "stage": "classify",
                "number": claim.attempt,
                "finished_at": finished,
                "outcome": (
                    "superseded"
                    if recorded.outcomes[claim.ticket_id] == "superseded"
                    else "reused"
                    if result.reused_from_id
                    else "ok"
                ),
                "request_id": result.request_id,
                # Only this attempt's calls: a reused first answer is on its own attempt's row.
                "api_calls": result.paid_now()[0],
                "latency_ms": result.latency_ms,
                **usage_values(result.paid_now()[1]),
            }
            for claim, result in done
        ],
        returning=None,
    )
    if not kept:
        return recorded
    dispatch_ids = insert_rows(
        session,
        Dispatch,
        [
            {
                "ticket_id": claim.ticket_id,
                "classification_id": label_id,
                "generation": claim.generation,
                "route": route.queue,
                "department": route.department,
                "rule": route.rule,
            }
            for claim, _result, route, label_id in kept
        ],
    )
    recorded.outbox = write(
        session,
        [
            delivery_values(claim.ticket_id, dispatch_id, route.queue)
            for (claim, _result, route, _label), dispatch_id in zip(kept, dispatch_ids, strict=True)
        ],
    )
    return recorded


# A ticket that has finished (or failed) classification may be classified again.
REOPENABLE = frozenset({S.ROUTED, S.NEEDS_REVIEW, S.DEAD_LETTERED})


def reopen(session: Session, ticket_id: int, generation: int) -> bool:
    """Send a finished ticket back to classification as generation `generation + 1` (for
    reprocessing). Earlier labels and dispatches stay as history. Compare-and-set on the
    generation, so two reprocessors cannot both reopen it. The caller enqueues or classifies.
    A ticket whose personal data was erased has no text to classify: it stays as it is."""
    moved = transition(
        session,
        ticket_id,
        S.QUEUED,
        only_from=REOPENABLE,
        where=[Ticket.generation == generation, Ticket.erased_at.is_(None)],
        generation=generation + 1,
        generation_started_at=utcnow(),
        attempts=0,
        department=None,
        review_reason=None,
    )
    if moved:
        close_open_letters(session, ticket_id)
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
        # The answer was paid for: on record, as a label recorded too late is (see _record).
        session.add(unkept_answer(ticket.id, result.request_id, result.usage, "superseded"))
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
        content_hash=ticket.content_hash,
    )
    recorded = _record(rt, session, [(claim, result)])
    if ticket.id not in recorded.label_ids:
        return None
    outbox = recorded.outbox[0].id
    return recorded.outcomes[ticket.id], recorded.label_ids[ticket.id], outbox


def unkept_answer(
    ticket_id: int,
    request_id: str | None,
    usage: Usage,
    outcome: str,
    *,
    error: Exception | None = None,
    why: str | None = None,
) -> Attempt:
    """The attempt row of an answer from outside the queue (a Message Batches result) that no
    label came of: it was billed all the same."""
    return Attempt(
        ticket_id=ticket_id,
        stage="classify",
        number=0,
        finished_at=utcnow(),
        outcome=outcome,
        error_type=None if error is None else error.__class__.__name__,
        error=None if why is None else why[:4000],
        request_id=request_id,
        api_calls=1,
        **usage_values(usage),
    )


def _classification_values(
    rt: Runtime, claim: _Holder, result: ClassificationResult
) -> dict[str, Any]:
    label, usage = result.label, result.usage
    return {
        "ticket_id": claim.ticket_id,
        "generation": claim.generation,
        **label.model_dump(),
        "backend": result.backend,
        "model": result.model,
        "taxonomy_version": rt.config.taxonomy.version,
        "prompt_version": result.prompt_version,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cost_usd": usage.cost_usd,
        "latency_ms": result.latency_ms,
        "attempt": claim.attempt,
        "calls": result.calls,
        "request_id": result.request_id,
        "reused_from_id": result.reused_from_id,
        "first_answer_attempt_id": (
            result.paid_earlier.attempt_id if result.paid_earlier is not None else None
        ),
        "created_at": utcnow(),
    }


def _observe(result: ClassificationResult) -> None:
    outcome = "reused" if result.reused_from_id else "labelled"
    CLASSIFICATIONS.labels(backend=result.backend, outcome=outcome).inc()
    if result.reused_from_id:
        return
    # Tokens and spend are counted per answer, as each arrives (messages.usage_of).
    CLASSIFY_LATENCY.labels(backend=result.backend, model=result.model).observe(
        result.latency_ms / 1000
    )

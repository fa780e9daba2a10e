"""Stage 1: stored tickets become stored labels and dispatches.

A task message carries one ticket or a batch of them (see relay.Publisher). Per chunk of the
batch that this process has call slots for, three short transactions, none held across the
model calls:
  begin   claim the tickets (state -> classifying) and look for reusable labels
          (classify_claims; what the backend sees of each: classify_requests)
  call    reuse, or redact and ask the backend; the chunk's calls run side by side
          (here; the shared API budget and what the calls cost: classify_calls)
  finish  store the Classifications, route, write the Dispatches and their outbox messages
          (classify_labels)
Failures are per ticket: each goes to the guard on its own, and the rest of the chunk goes on.
Answers that arrive while the database is unreachable were paid for: they go back on the
broker with the task's retry (`AnswersNotRecorded`) and are recorded when it comes back.
A cascade's first answer whose escalation failed transiently is kept in the database instead
(see classify_requests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, wait
from functools import partial
from typing import Any

from triage.classify.backends.base import ClassificationResult
from triage.errors import (
    CallNotStarted,
    TransientError,
    TriageError,
    loggable_traceback,
)
from triage.pipeline.classify_calls import (
    admission_waits,
    call_for,
    charge_unadmitted,
    count_answer,
    one_call_per_text,
    report_success,
)
from triage.pipeline.classify_claims import Claim, claim_chunk, defer_claim, failure_of
from triage.pipeline.classify_labels import (
    AnswersNotRecorded,
    carry_answers,
    commit_labels,
    record_carried,
)
from triage.pipeline.fanout import SLOT_PATIENCE_SECONDS, HeldSlots
from triage.pipeline.runtime import Runtime
from triage.reliability.guard import handle_failure
from triage.reliability.retry import is_database_outage, policy_for

log = logging.getLogger(__name__)


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

    A batch larger than the free claim slots goes in parts, each claiming only the tickets it
    has slots for. A part that leaves tickets behind runs beside the next ones, which start
    as slots come back, so one slow call does not hold up the tickets after it. Every part
    has finished before this returns (or raises): the message is acknowledged only then."""
    outcomes: dict[int, str] = {}
    if carried:
        outcomes.update(record_carried(rt, carried))
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
    claims = claim_chunk(rt, ticket_ids, reuse, outcomes)
    max_attempts = policy_for("classify", rt.settings).max_attempts
    going: list[Claim] = []
    for claim in claims:
        if claim.attempt > max_attempts:
            # Earlier attempts ended without an outcome (the worker died mid-call, say, every
            # time): the attempt bound holds for those too, or a ticket that crashes its
            # worker would be redelivered for ever.
            lost = TransientError(
                f"{claim.attempt - 1} attempts started, none finished with an outcome "
                "(worker lost mid-attempt?)"
            )
            outcomes[claim.ticket_id] = handle_failure(rt, failure_of(rt, claim), lost)
        else:
            going.append(claim)
    if reuse:
        going = one_call_per_text(rt, going, outcomes)
    waits = admission_waits(rt, [c for c in going if c.reuse is None], max_inline_wait)
    calling: list[Claim] = []
    for claim in going:
        wait = waits.get(claim.ticket_id, 0.0)
        if wait > 0:
            outcomes[claim.ticket_id] = defer_claim(rt, claim, wait)
        else:
            calling.append(claim)
    # Slots are for calls: tickets that make none (not claimed, deferred, out of attempts)
    # free theirs now, and each call's slot is freed when its answer is in, so another task's
    # tickets can start while this batch's slowest calls are still out.
    held.give(held.count - len(calling))
    # With the database gone, the later waves' answers are paid for too: take them all
    # before failing, so the retry carries every one.
    outages: list[Exception] = []
    for wave in rt.calls.waves([held.released(call_for(rt, claim)) for claim in calling]):
        try:
            outcomes.update(_settle(rt, [(calling[i], result) for i, result in wave]))
        except Exception as exc:
            if not (isinstance(exc, AnswersNotRecorded) or is_database_outage(exc)):
                raise
            outages.append(exc)
    if outages:
        raise _first_or_carried(outages)
    return outcomes


def _settle(
    rt: Runtime, answers: list[tuple[Claim, ClassificationResult | Exception]]
) -> dict[int, str]:
    """Outcomes for the calls that have finished: labels recorded together, failures to the
    guard one by one. Labels go first: if the database is gone, they are what was paid for
    (`AnswersNotRecorded`); an unrecorded failure is retried once its claim's lease is over."""
    outcomes: dict[int, str] = {}
    done: list[tuple[Claim, ClassificationResult]] = []
    failed: list[tuple[Claim, Exception]] = []
    answered = 0
    for claim, result in answers:
        if isinstance(result, CallNotStarted):
            # Claimed ahead, then kept waiting for a call slot (the calls before it were
            # slow) or the circuit opened meanwhile: not the ticket's failure.
            outcomes[claim.ticket_id] = defer_claim(rt, claim, result.retry_in)
            continue
        if isinstance(result, Exception):
            failed.append((claim, result))
            continue
        answered += 1 if result.paid_now()[0] else 0
        count_answer(result)
        done.append((claim, result))
    if answered and rt.admission is not None:
        report_success(rt.admission, answered)
    if rt.admission is not None and rt.admission.limiter.enabled:
        charge_unadmitted(rt, rt.admission, answers)
    try:
        outcomes.update(commit_labels(rt, done))
    except Exception as exc:
        if is_database_outage(exc):
            raise AnswersNotRecorded(carry_answers(done)) from exc
        raise
    for claim, error in failed:
        paid = error if isinstance(error, TriageError) else None
        outcomes[claim.ticket_id] = handle_failure(rt, failure_of(rt, claim, paid), error)
    return outcomes

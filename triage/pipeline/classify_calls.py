"""The classify stage's calls: which of a chunk's claims call now, and what the calls cost.

Before the calls, the shared API budget and the circuit breaker (reliability.limits) say how
long each must wait (`admission_waits`), and a text that several tickets of a batch share is
asked once (`one_call_per_text`). Each call hands a 429 or 401 it meets to the breaker itself,
and is not made if the circuit is known to have opened since admission (`guarded_call`).
After them, the budget is charged for what it was not asked about, the breaker hears of
answers, and each answer is counted. Redis trouble here is logged and never fails a ticket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from triage.classify.backends.base import ClassificationResult, Usage
from triage.classify.prompt import estimate_input_tokens
from triage.errors import ApiKeyRejected, CallNotStarted, RateLimited, TriageError
from triage.metrics import CLASSIFICATIONS, CLASSIFY_LATENCY
from triage.pipeline.classify_claims import Claim, defer_claim
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.pipeline.runtime import Runtime
from triage.reliability.limits import Admission

log = logging.getLogger(__name__)
T = TypeVar("T")


# A ticket with the same text as another of its batch comes back after this long (plus
# jitter), by when the other's label is usually recorded for it to reuse.
SAME_TEXT_WAIT = 3.0


def one_call_per_text(rt: Runtime, claims: list[Claim], outcomes: dict[int, str]) -> list[Claim]:
    """One call per text in a batch: the others with the same text are deferred (no attempt
    spent) and reuse that label when they come back. An outage brings bursts of identical
    tickets, often into one batch, where the reuse lookup (recorded labels only) found none
    and each paid for the same answer. If the first call fails, the others call themselves."""
    if rt.settings.reuse_window_hours <= 0:
        return claims
    calling: set[str] = set()
    kept: list[Claim] = []
    for claim in claims:
        if claim.reuse is None:
            if claim.content_hash in calling:
                outcomes[claim.ticket_id] = defer_claim(rt, claim, SAME_TEXT_WAIT)
                continue
            calling.add(claim.content_hash)
        kept.append(claim)
    return kept


def admission_waits(rt: Runtime, claims: list[Claim], max_inline_wait: float) -> dict[int, float]:
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


def call_for(rt: Runtime, claim: Claim) -> Any:
    if claim.reuse is not None:
        reused = claim.reuse
        return lambda: reused
    return guarded_call(rt, lambda: rt.backend.classify(claim.request))


def guarded_call(rt: Runtime, call: Callable[[], T]) -> Callable[[], T]:
    """`call`, on its call thread: not made if the circuit is known to have opened since the
    ticket was admitted (it may have waited at the call gate meanwhile), and a 429 or 401 it
    meets reported to the breaker before the call's slot goes to the next ticket in line,
    which would otherwise start before the breaker heard."""
    admission = rt.admission
    if admission is None:
        return call

    def run() -> T:
        opened = admission.breaker.known_open_seconds()
        if opened > 0:
            raise CallNotStarted("the circuit opened while it waited", retry_in=opened)
        try:
            return call()
        except RateLimited as exc:
            report_overload(admission, exc)
            raise
        except ApiKeyRejected as exc:
            report_key_rejected(admission, exc)
            raise

    return run


def charge_unadmitted(
    rt: Runtime,
    admission: Admission,
    answers: list[tuple[Claim, ClassificationResult | Exception]],
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


def report_success(admission: Admission, count: int) -> None:
    try:
        admission.breaker.record_success(count)
    except Exception as exc:  # noqa: BLE001 - the label is good; a lost count must not undo it
        log.warning("circuit breaker not updated: %s", exc)


def report_overload(admission: Admission, exc: RateLimited) -> None:
    try:
        admission.breaker.record_overload(exc.retry_after)
    except Exception as err:  # noqa: BLE001 - the retry decision must not depend on Redis
        log.warning("circuit breaker not updated: %s", err)


def report_key_rejected(admission: Admission, exc: ApiKeyRejected) -> None:
    """A 401 opens the circuit at once. Said at ERROR by the one worker whose answer opened
    it, not per ticket: a fleet of workers would otherwise log every in-flight ticket's 401."""
    try:
        opened = admission.breaker.record_key_rejected()
    except Exception as err:  # noqa: BLE001 - the retry decision must not depend on Redis
        log.warning("circuit breaker not updated: %s", err)
        return
    if opened:
        log.error(
            "API key rejected (%s): circuit open, every worker stops taking %s for %.0fs; "
            "tickets wait on the broker. Check ANTHROPIC_API_KEY: a probe call after the "
            "cool-down resumes classification once the key works",
            exc.summary,
            CLASSIFY_QUEUE,
            admission.breaker.auth_cooldown,
        )


def count_answer(result: ClassificationResult) -> None:
    outcome = "reused" if result.reused_from_id else "labelled"
    CLASSIFICATIONS.labels(backend=result.backend, outcome=outcome).inc()
    if result.reused_from_id:
        return
    # Tokens and spend are counted per answer, as each arrives (messages.usage_of).
    CLASSIFY_LATENCY.labels(backend=result.backend, model=result.model).observe(
        result.latency_ms / 1000
    )

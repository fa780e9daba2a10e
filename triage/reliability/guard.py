"""The one place that turns a stage failure into "retry later" or "dead-letter now"."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from triage.classify.backends.base import Usage
from triage.db.models import Attempt, TicketState, utcnow
from triage.db.session import session_scope
from triage.errors import TriageError
from triage.metrics import STAGE_FAILURES
from triage.pipeline.relay import enqueue
from triage.pipeline.runtime import Runtime
from triage.reliability.deadletter import dead_letter
from triage.reliability.retry import as_triage_error, decide, policy_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageFailure:
    """What the stage knew when it failed: enough to retry or to dead-letter it."""

    ticket_id: int
    stage: str
    attempt: int
    age_seconds: float
    task: str
    queue: str
    args: dict[str, Any]
    # Runs in the failure transaction before a retry is scheduled (e.g. state back to queued);
    # False: the attempt no longer holds the ticket (see `claim`), and nothing is scheduled.
    on_retry: Callable[[Any], bool] | None = None
    api_calls: int = 0
    # What those calls cost (answers the attempt could not use are billed too).
    usage: Usage | None = None
    # The states this stage may dead-letter the ticket from. A stale attempt (its claim was
    # taken over and the ticket finished meanwhile) must not dead-letter a routed ticket.
    dead_from: frozenset[TicketState] | None = None
    # The stage's "started" Attempt row, finished here instead of adding another.
    attempt_id: int | None = None
    # The ticket generation the attempt worked on. A ticket re-triaged or reprocessed since
    # is another piece of work: this attempt's failure must not dead-letter it.
    generation: int | None = None
    # A paid answer the retry may use instead of paying again (see `Attempt.answer`).
    answer: dict[str, Any] | None = None
    # Conditions on the ticket row that hold while the attempt's claim is still the one it
    # took. A worker that outlived its lease (a VM pause, a hung call) and then fails must not
    # requeue or dead-letter a ticket another worker has claimed since: its outcome is
    # `superseded`, its calls still on record. Empty: the stage has no claim to check.
    claim: tuple[ColumnElement[bool], ...] = ()
    # Runs in the failure transaction whatever the outcome: what the attempt got done before
    # it failed, kept for the attempts after it (a delivery's sinks that accepted it). In the
    # transaction that records the failure, so the one is never kept without the other.
    progress: Callable[[Session], None] | None = None


def handle_failure(rt: Runtime, failure: StageFailure, exc: BaseException) -> str:
    """Schedule a retry through the outbox or dead-letter the ticket, and record the attempt.
    Returns the outcome: "retry", "dead", "noop" (the work was no longer current) or
    "superseded" (the attempt's claim was no longer its own, see `StageFailure.claim`)."""
    # When it failed: the attempt row is written last (once its outcome is known), but it
    # happened before the retry or dead letter it leads to, and a timeline shows it so.
    failed_at = utcnow()
    error = as_triage_error(exc)
    if error.ticket_id is None:
        error.ticket_id = failure.ticket_id
    error.stage = failure.stage
    decision = decide(
        policy_for(failure.stage, rt.settings),
        error,
        attempt=failure.attempt,
        age_seconds=failure.age_seconds,
    )
    outcome = "retry" if decision.retry else "dead"
    log.warning(
        "%s failed for ticket %s (attempt %s): %s -> %s (%s)",
        failure.stage,
        failure.ticket_id,
        failure.attempt,
        error,
        outcome,
        decision.reason,
    )
    with session_scope(rt.sessions) as session:
        if decision.retry:
            if failure.on_retry is None or failure.on_retry(session):
                outbox_id = enqueue(
                    session,
                    ticket_id=failure.ticket_id,
                    task=failure.task,
                    queue=failure.queue,
                    args=failure.args,
                    countdown=decision.delay,
                )
            else:
                outcome = "superseded"
        else:
            lettered = dead_letter(
                session,
                ticket_id=failure.ticket_id,
                stage=failure.stage,
                error=error,
                attempts=failure.attempt,
                only_from=failure.dead_from,
                generation=failure.generation,
                where=failure.claim,
                payload={
                    "task": failure.task,
                    "queue": failure.queue,
                    "args": failure.args,
                    "reason": decision.reason,
                },
            )
            if lettered is None:
                outcome = "superseded" if failure.claim else "noop"
            else:
                _letter, outbox_id = lettered
                log.error(
                    "ticket %s dead-lettered at %s: %s", failure.ticket_id, failure.stage, error
                )
        if outcome == "superseded":
            log.warning(
                "%s attempt %s of ticket %s no longer holds its claim (lease over, taken by "
                "another worker or given new text): its failure changes nothing",
                failure.stage,
                failure.attempt,
                failure.ticket_id,
            )
        if failure.progress is not None:
            failure.progress(session)
        # The attempt's row either way: its calls were paid for.
        _record_attempt(session, failure, error, outcome, failed_at)
    # Counted once the outcome is committed: a dead letter is what an operator alerts on.
    STAGE_FAILURES.labels(
        stage=failure.stage, outcome=outcome, error_type=error.__class__.__name__
    ).inc()
    if outcome in ("retry", "dead"):
        rt.publisher.publish([outbox_id])
    return outcome


def _record_attempt(
    session: Session, failure: StageFailure, error: TriageError, outcome: str, failed_at: datetime
) -> None:
    fields: dict[str, Any] = {
        "finished_at": failed_at,
        "outcome": outcome,
        "error_type": error.__class__.__name__,
        "error": error.message[:4000],
        "request_id": error.request_id,
        "api_calls": failure.api_calls,
        **usage_values(failure.usage or Usage()),
    }
    if failure.answer is not None:
        fields["answer"] = failure.answer
    if failure.attempt_id is not None:
        session.execute(
            update(Attempt)
            .where(Attempt.id == failure.attempt_id)
            .values(**fields)
            .execution_options(synchronize_session=False)
        )
        return
    session.add(
        Attempt(
            ticket_id=failure.ticket_id,
            stage=failure.stage,
            number=failure.attempt,
            started_at=failed_at,
            **fields,
        )
    )


def usage_values(usage: Usage) -> dict[str, Any]:
    """An attempt row's token and cost columns."""
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cost_usd": usage.cost_usd,
    }

"""The classify stage's finish: answers become labels, routes and dispatches.

`store_labels` stores a batch's labels, routes them and writes their dispatches and delivery
messages, a statement per table, in the caller's transaction; `commit_labels` records a wave for
the workers: that transaction on SQLite, the same rows in one statement on PostgreSQL
(`label_statement`). Answers the database could not take were paid for: they travel with the
task's retry (`AnswersNotRecorded`) and are recorded first when it comes back
(`record_carried`). Labels made outside the queue come in here too: reprocessing reopens a
finished ticket (`reopen`), and Message Batches results are recorded by `record_label`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from triage.classify.backends.base import ClassificationResult, Usage
from triage.db.models import Attempt, Classification, Dispatch, Ticket, TicketState, utcnow
from triage.db.session import engine_of, insert_rows, one_statement, session_scope
from triage.metrics import TICKETS_CLASSIFIED
from triage.pipeline.classify_claims import Claim, Holder
from triage.pipeline.classify_requests import RESULT_ADAPTER, build_request
from triage.pipeline.label_statement import record_wave
from triage.pipeline.relay import (
    Pending,
    as_written,
    delivery_values,
    pending_of,
    write_outbox,
)
from triage.pipeline.routing import Route, decide_route
from triage.pipeline.runtime import Runtime
from triage.pipeline.states import transition, transition_each
from triage.reliability.deadletter import close_open_letters
from triage.reliability.guard import usage_values
from triage.reliability.retry import is_database_outage

log = logging.getLogger(__name__)
S = TicketState


@dataclass(frozen=True, slots=True)
class _Carried:
    ticket_id: int
    attempt: int
    generation: int


class AnswersNotRecorded(Exception):
    """Answers the model gave, and was paid for, that the database could not take. `carried`
    is them in JSON, for the task's retry message: asked again, each would be paid twice, and
    would wait for its claim's lease to run out first."""

    def __init__(self, carried: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(carried)} answers not yet recorded (database unavailable)")
        self.carried = carried


def carry_answers(answers: Sequence[tuple[Holder, ClassificationResult]]) -> list[dict[str, Any]]:
    return [
        {
            "ticket_id": holder.ticket_id,
            "attempt": holder.attempt,
            "generation": holder.generation,
            "result": RESULT_ADAPTER.dump_python(result, mode="json"),
        }
        for holder, result in answers
    ]


def _uncarry(carried: list[dict[str, Any]]) -> list[tuple[Holder, ClassificationResult]]:
    return [
        (
            _Carried(int(c["ticket_id"]), int(c["attempt"]), int(c["generation"])),
            RESULT_ADAPTER.validate_python(c["result"]),
        )
        for c in carried
    ]


def record_carried(rt: Runtime, carried: list[dict[str, Any]]) -> dict[int, str]:
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
        return commit_labels(rt, routable)
    except Exception as exc:
        if is_database_outage(exc):
            raise AnswersNotRecorded(carried) from exc
        raise


def commit_labels(
    rt: Runtime, done: Sequence[tuple[Holder, ClassificationResult]]
) -> dict[int, str]:
    if not done:
        return {}
    if engine_of(rt.sessions).dialect.name == "postgresql":
        recorded = _record_in_one_statement(rt, done)
    else:
        with session_scope(rt.sessions) as session:
            recorded = store_labels(rt, session, done, write=rt.publisher.write)
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


def store_labels(
    rt: Runtime,
    session: Session,
    done: Sequence[tuple[Holder, ClassificationResult]],
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
    kept: list[tuple[Holder, ClassificationResult, Route, int]] = []
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
                **_attempt_values(result),
                **(
                    {"outcome": "superseded"}
                    if recorded.outcomes[claim.ticket_id] == "superseded"
                    else {}
                ),
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


def _record_in_one_statement(
    rt: Runtime, done: Sequence[tuple[Holder, ClassificationResult]]
) -> _Recorded:
    """`store_labels` with `rt.publisher.write`, as one statement on PostgreSQL
    (`label_statement`): the same rows, the same outcomes."""
    done = sorted(done, key=lambda answer: answer[0].ticket_id)
    now = utcnow()
    routes = {
        claim.ticket_id: decide_route(rt.config.taxonomy, r.label, r.review_reason)
        for claim, r in done
    }
    moves: list[dict[str, Any]] = []
    for claim, _ in done:
        route = routes[claim.ticket_id]
        moves.append(
            {
                "ticket_id": claim.ticket_id,
                "generation": claim.generation,
                "claim_attempts": claim.attempt,
                "to_state": (S.NEEDS_REVIEW if route.needs_review else S.ROUTED).value,
                "department": route.department,
                "review_reason": route.reason,
                "route": route.queue,
                "rule": route.rule,
            }
        )
    # The delivery messages' shared columns, as `Publisher.write` would write them.
    message = as_written(delivery_values(0, 0, ""), rt.publisher)
    with one_statement(rt.sessions) as connection:
        rows = record_wave(
            connection,
            [_classification_values(rt, claim, result) for claim, result in done],
            moves,
            [_attempt_values(result) for _, result in done],
            message,
            now,
        )
    recorded = _Recorded(outcomes={}, label_ids={}, outbox=[])
    for claim, _ in done:
        ticket_id, route = claim.ticket_id, routes[claim.ticket_id]
        if ticket_id not in rows:
            recorded.outcomes[ticket_id] = "superseded"
            continue
        label_id, dispatch_id, outbox_id = rows[ticket_id]
        recorded.label_ids[ticket_id] = label_id
        recorded.outcomes[ticket_id] = "review" if route.needs_review else "routed"
        # The row's own columns; the rest are the shared ones the statement wrote.
        row = {"ticket_id": ticket_id, "queue": route.queue, "args": {"dispatch_id": dispatch_id}}
        recorded.outbox.append(pending_of(outbox_id, {**message, **row}))
    return recorded


def _attempt_values(result: ClassificationResult) -> dict[str, Any]:
    """The columns of an answered attempt's row but its ticket, number and times; the outcome
    is the one it has if its ticket takes the label (else `superseded`)."""
    calls, usage = result.paid_now()
    return {
        "outcome": "reused" if result.reused_from_id else "ok",
        "request_id": result.request_id,
        # Only this attempt's calls: a reused first answer is on its own attempt's row.
        "api_calls": calls,
        "latency_ms": result.latency_ms,
        **usage_values(usage),
    }


def _classification_values(
    rt: Runtime, claim: Holder, result: ClassificationResult
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
        # The answer was paid for: on record, as a label recorded too late is (see store_labels).
        session.add(unkept_answer(ticket.id, result.request_id, result.usage, "superseded"))
        return None
    transition(
        session,
        ticket.id,
        S.CLASSIFYING,
        only_from=frozenset({S.QUEUED}),
        attempts=Ticket.attempts + 1,
    )
    claim = Claim(
        ticket_id=ticket.id,
        attempt=1,
        generation=generation + 1,
        received_at=ticket.received_at,
        request=build_request(rt, ticket),
        reuse=None,
        content_hash=ticket.content_hash,
    )
    recorded = store_labels(rt, session, [(claim, result)])
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

"""The classify stage's begin: claim a chunk's tickets, prepare their requests, and put a
claim back (deferred) or hand its failure to the guard.

A claim moves a ticket to `classifying` and counts an attempt; the chunk's claims commit
together, before any model call. Whatever is written later for the attempt (its label, its
deferral, its failure) checks that the ticket is still under that claim (`_held`): once the
lease is over, another worker may hold it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from triage.classify.backends.base import ClassificationRequest, ClassificationResult
from triage.db.models import Classification, Ticket, TicketState, utcnow
from triage.db.session import session_scope
from triage.errors import RequestNotPrepared, TriageError, loggable_traceback
from triage.pipeline.classify_requests import (
    build_request,
    first_answer_for,
    first_answer_record,
    reusable_labels,
    reused_result,
    stored_first_answers,
    with_first_answer,
)
from triage.pipeline.relay import CLASSIFY_TASK, enqueue_classify
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.pipeline.runtime import Runtime
from triage.pipeline.states import claim_for_classification, transition
from triage.reliability.guard import StageFailure, handle_failure
from triage.reliability.retry import classify_lease_seconds, is_database_outage

log = logging.getLogger(__name__)
S = TicketState
CLAIMABLE = frozenset({S.RECEIVED, S.QUEUED, S.CLASSIFYING})


class Holder(Protocol):
    """Whose answer a label is: the ticket, and the generation and attempt of its claim."""

    @property
    def ticket_id(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def generation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Claim:
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


def claim_chunk(
    rt: Runtime, ticket_ids: list[int], reuse: bool, outcomes: dict[int, str]
) -> list[Claim]:
    """Claim the tickets that are ours to classify; note an outcome for the others. A ticket
    whose request cannot be prepared fails alone, as an attempt of its own (its claim, and the
    attempt it counts, are committed with the others'), and the guard dead-letters it: were
    the claim rolled back instead, it would come back from the sweeper for ever."""
    # A ticket another worker is classifying right now is left alone for this long; after it,
    # the holder is presumed dead (the message came back) and the ticket is taken over.
    lease = timedelta(seconds=classify_lease_seconds(rt.settings))
    claims: list[Claim] = []
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
        reusable = reusable_labels(rt, session, claimed) if reuse else {}
        firsts = stored_first_answers(session, claimed)
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
        outcomes[item.ticket_id] = handle_failure(rt, failure_of(rt, item), error)
    return claims


def _prepare(
    rt: Runtime, ticket: Any, reusable: Classification | None, firsts: list[tuple[int, Any]]
) -> Claim:
    """One claimed ticket's request: its text redacted, a label to reuse, a first answer."""
    return Claim(
        ticket_id=ticket.id,
        attempt=ticket.attempts,
        generation=ticket.generation,
        received_at=ticket.received_at,
        request=with_first_answer(build_request(rt, ticket), first_answer_for(rt, ticket, firsts)),
        reuse=reused_result(reusable) if reusable is not None else None,
        content_hash=ticket.content_hash,
    )


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


def defer_claim(rt: Runtime, claim: Claim, wait: float) -> str:
    """Back on the queue for later, without spending an attempt: waiting for our own budget
    or for the API to recover is not the ticket's failure."""
    with session_scope(rt.sessions) as session:
        _unclaim(session, claim, attempts=Ticket.attempts - 1)
        # Jitter, so tickets deferred together do not all come back in the same instant.
        jitter = random.uniform(0, min(wait, 5.0))
        outbox_id = enqueue_classify(session, claim.ticket_id, countdown=wait + jitter)
    rt.publisher.publish([outbox_id])
    return "deferred"


def _held(claim: Holder) -> tuple[ColumnElement[bool], ...]:
    """The ticket row is still under this attempt's claim (with state `classifying`): same
    generation, and the attempt count this claim set. Every claim counts one, and only the
    claim's own deferral takes it back, so another worker's claim since (after the lease, the
    sweeper handed the ticket over) or new text fails the check. Recording a label checks the
    same (`transition_each` with `attempts`)."""
    return (Ticket.generation == claim.generation, Ticket.attempts == claim.attempt)


def _unclaim(session: Session, claim: Claim | _Unprepared, **fields: Any) -> bool:
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


def failure_of(
    rt: Runtime, claim: Claim | _Unprepared, paid: TriageError | None = None
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
            first_answer_record(claim.generation, paid.first_answer)
            if paid is not None and paid.first_answer is not None
            else None
        ),
    )


def _age_seconds(rt: Runtime, claim: Claim | _Unprepared) -> float:
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

"""Dead letters: what could not succeed, kept visible and replayable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from triage.db.models import (
    Attempt,
    DeadLetter,
    Dispatch,
    Ticket,
    TicketState,
    utcnow,
)
from triage.errors import TriageError
from triage.pipeline.relay import (
    DEAD_LETTER_TASK,
    enqueue,
    enqueue_classify,
    enqueue_delivery,
)
from triage.pipeline.routing import DEAD_QUEUE
from triage.pipeline.states import transition

S = TicketState

# Attempt outcomes that are not failures.
ANSWERED = ("ok", "reused", "superseded")


def dead_letter(
    session: Session,
    *,
    ticket_id: int,
    stage: str,
    error: TriageError,
    attempts: int,
    payload: dict[str, Any],
    only_from: frozenset[TicketState] | None = None,
    generation: int | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> tuple[DeadLetter, int] | None:
    """Record the failure, move the ticket to dead_lettered and announce it on triage.dead,
    all in the caller's transaction. Returns the letter and the announcement's outbox id to
    publish, or None when the ticket is already dead-lettered or finished (a redelivered copy
    of the message lost the race), or has moved past `generation`: one letter per failure,
    never two, and never one for work that is no longer current. `where`: further conditions
    on the ticket row (the failing attempt's claim still current, say)."""
    first_failed = session.scalar(
        select(func.min(Attempt.started_at)).where(
            Attempt.ticket_id == ticket_id,
            Attempt.stage == stage,
            Attempt.outcome.not_in(ANSWERED),
        )
    )
    now = utcnow()
    letter = DeadLetter(
        ticket_id=ticket_id,
        stage=stage,
        error_type=error.__class__.__name__,
        message=error.message[:4000],
        attempts=attempts,
        first_failed_at=first_failed or now,
        last_failed_at=now,
        request_id=error.request_id,
        payload=payload,
    )
    moved = transition(
        session,
        ticket_id,
        S.DEAD_LETTERED,
        only_from=only_from,
        where=[*where, *([] if generation is None else [Ticket.generation == generation])],
        last_error=error.detail[:4000],
    )
    if not moved:
        return None
    session.add(letter)
    session.flush()
    notice_id = enqueue(
        session,
        ticket_id=ticket_id,
        task=DEAD_LETTER_TASK,
        queue=DEAD_QUEUE,
        args={
            "dead_letter_id": letter.id,
            "ticket_id": ticket_id,
            "stage": stage,
            "error_type": letter.error_type,
            # Whoever consumes triage.dead need not see the ticket: the summary, not the
            # quoted text (a refusal, a sink's answer) the letter's row keeps.
            "message": error.summary[:4000],
            "request_id": letter.request_id,
        },
    )
    return letter, notice_id


def close_open_letters(session: Session, ticket_id: int) -> None:
    """A dead-lettered ticket sent back to classification for another reason (new customer
    text, reprocessing) is, in effect, replayed: its open letters must not stay in `dlq list`
    as if it still needed an operator, nor be replayable later over the newer work."""
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.ticket_id == ticket_id, DeadLetter.replayed_at.is_(None))
        .values(replayed_at=utcnow())
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True, slots=True)
class Replayed:
    ticket_id: int
    stage: str
    outbox_id: int


def replay(session: Session, dead_letter_id: int) -> Replayed | None:
    """Put a dead-lettered ticket back through the stage that failed, history kept.

    Returns None when the letter was already replayed, the ticket has moved on, or it would
    be classified again and its text was erased; the caller publishes `outbox_id` after
    commit.
    """
    letter = session.get(DeadLetter, dead_letter_id)
    if letter is None or letter.replayed_at is not None:
        return None
    ticket = session.get(Ticket, letter.ticket_id)
    if ticket is None:
        return None
    if ticket.erased_at is not None and not _delivery_replay(letter, ticket):
        return None  # its text was erased: there is nothing to classify again
    claimed = session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == dead_letter_id, DeadLetter.replayed_at.is_(None))
        .values(replayed_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if claimed != 1 or ticket.state != S.DEAD_LETTERED:
        return None
    newest = session.scalar(
        select(func.max(DeadLetter.id)).where(DeadLetter.ticket_id == ticket.id)
    )
    if newest != letter.id:
        # A letter from before the ticket's latest dead-lettering (it has been classified and
        # failed again since) describes work that is over: replaying its stage could label
        # or deliver the ticket twice. The newest letter is the one to replay.
        return None
    if _delivery_replay(letter, ticket):
        return _replay_delivery(session, ticket, letter)
    # A new generation, as for a reprocess: the dispatches of a routing before the failure
    # (a department since removed, say) belong to the past, not to what the replay decides.
    transition(
        session,
        ticket.id,
        S.QUEUED,
        only_from=frozenset({S.DEAD_LETTERED}),
        attempts=0,
        generation=ticket.generation + 1,
        # The age bound counts from here: a replay is a fresh run.
        generation_started_at=utcnow(),
    )
    outbox_id = enqueue_classify(session, ticket.id)
    return Replayed(ticket_id=ticket.id, stage="classify", outbox_id=outbox_id)


def _delivery_replay(letter: DeadLetter, ticket: Ticket) -> bool:
    """Replaying this letter delivers the ticket's label again (rather than classifying it)."""
    return letter.stage == "deliver" and ticket.current_classification_id is not None


def _replay_delivery(session: Session, ticket: Ticket, letter: DeadLetter) -> Replayed | None:
    dispatch = session.scalar(
        select(Dispatch)
        .where(Dispatch.ticket_id == ticket.id, Dispatch.generation == ticket.generation)
        .order_by(Dispatch.id.desc())
        .limit(1)
    )
    if dispatch is None:
        return None
    back_to = S.NEEDS_REVIEW if ticket.review_reason else S.ROUTED
    transition(session, ticket.id, back_to, only_from=frozenset({S.DEAD_LETTERED}))
    dispatch.delivery_attempts = 0
    # The deliver stage's age bound counts from here: a replay is a fresh run.
    dispatch.created_at = utcnow()
    outbox_id = enqueue_delivery(
        session, ticket_id=ticket.id, dispatch_id=dispatch.id, route=dispatch.route
    )
    return Replayed(ticket_id=ticket.id, stage="deliver", outbox_id=outbox_id)

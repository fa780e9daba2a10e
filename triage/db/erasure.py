"""Erasing what triage holds of a customer, for a data subject's request or a retention rule.

A ticket's text, its requester, the helpdesk's metadata, the model's summaries and the error
text that may quote any of them are overwritten. How the ticket was labelled, routed and what
it cost stay, so stats and the audit trail keep their counts. The helpdesk remains the system
of record for the ticket itself.

An erased ticket is never classified again: reprocessing, a dead letter's replay and a
helpdesk update all leave it alone (there is no text left to classify).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from triage.db.models import (
    Attempt,
    Classification,
    DeadLetter,
    ReprocessItem,
    Ticket,
    TicketState,
    utcnow,
)

ERASED = "(erased)"
# Why a command that classifies what it selects leaves an erased ticket out ("ticket 7 ...").
NOTHING_TO_CLASSIFY = "was erased: no text to classify"
# Still to be classified: its text is needed. Erase it once it has an outcome.
IN_FLIGHT = frozenset({TicketState.RECEIVED, TicketState.QUEUED, TicketState.CLASSIFYING})
# The ticket metadata key a helpdesk update's idempotency keys live under (db.repo); kept, so
# a redelivered old update is still known as one.
_KEPT_METADATA = ("triage_updates",)


@dataclass(slots=True)
class Erasure:
    erased: list[int] = field(default_factory=list)
    already: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def requester_ticket_ids(session: Session, email: str) -> list[int]:
    """The tickets whose requester has this address (case-insensitive), oldest first."""
    return list(
        session.scalars(
            select(Ticket.id)
            .where(func.lower(Ticket.requester_email) == email.strip().lower())
            .order_by(Ticket.id)
        )
    )


def erase_tickets(session: Session, ticket_ids: Sequence[int]) -> Erasure:
    """Erase these tickets' personal data in the caller's transaction; tickets still being
    classified are left as they are and reported."""
    report = Erasure()
    wanted = list(dict.fromkeys(ticket_ids))
    rows = {
        t.id: t
        for t in session.scalars(
            select(Ticket).where(Ticket.id.in_(wanted)).order_by(Ticket.id).with_for_update()
        )
    }
    for ticket_id in wanted:
        ticket = rows.get(ticket_id)
        if ticket is None:
            report.missing.append(ticket_id)
        elif ticket.erased_at is not None:
            report.already.append(ticket_id)
        elif ticket.state in IN_FLIGHT:
            report.in_flight.append(ticket_id)
        else:
            _erase(ticket)
            report.erased.append(ticket_id)
    if report.erased:
        ids = report.erased
        session.execute(
            update(Classification).where(Classification.ticket_id.in_(ids)).values(summary=ERASED)
        )
        session.execute(
            update(Attempt)
            .where(Attempt.ticket_id.in_(ids), Attempt.error.is_not(None))
            .values(error=ERASED)
        )
        _erase_answers(session, ids)
        session.execute(
            update(DeadLetter).where(DeadLetter.ticket_id.in_(ids)).values(message=ERASED)
        )
        session.execute(
            update(ReprocessItem)
            .where(ReprocessItem.ticket_id.in_(ids), ReprocessItem.error.is_not(None))
            .values(error=ERASED)
        )
    return report


def _erase_answers(session: Session, ticket_ids: list[int]) -> None:
    """The model's summary in a failed attempt's kept first answer (`Attempt.answer`). The
    answer itself stays: its calls and cost are counted in stats (db.stats)."""
    rows = session.execute(
        select(Attempt.id, Attempt.answer).where(
            Attempt.ticket_id.in_(ticket_ids), Attempt.answer.is_not(None)
        )
    ).all()
    for row in rows:
        answer = copy.deepcopy(row.answer)
        answer["result"]["label"]["summary"] = ERASED
        session.execute(update(Attempt).where(Attempt.id == row.id).values(answer=answer))


def _erase(ticket: Ticket) -> None:
    ticket.subject = ""
    ticket.body = ""
    ticket.clean_text = ""
    # Unique, so no other ticket's text ever matches it and reuses a label whose summary
    # is gone, nor is this ticket's label offered to one.
    ticket.content_hash = f"erased:{uuid.uuid4().hex}"
    ticket.requester_email = None
    ticket.requester_name = None
    extra = ticket.extra or {}
    ticket.extra = {k: extra[k] for k in _KEPT_METADATA if k in extra}
    if ticket.last_error is not None:
        ticket.last_error = ERASED
    ticket.erased_at = utcnow()

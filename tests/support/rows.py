"""Rows written straight into the database for tests that start from a ticket's history
(already labelled, claimed, dead-lettered) rather than from a webhook."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from triage.db.models import Classification, Ticket, TicketState, utcnow
from triage.db.repo import content_hash

_numbers = itertools.count(1)


def add_ticket(session: Session, body: str, *, subject: str = "Help", **fields: Any) -> Ticket:
    """A routed ticket from Jane Doe, unless `fields` say otherwise."""
    values: dict[str, Any] = {
        "source": "generic",
        "external_id": f"row-{next(_numbers)}-{abs(hash(body)) % 10**8}",
        "subject": subject,
        "body": body,
        "clean_text": body,
        "content_hash": content_hash(subject, body),
        "requester_email": "jane.doe@example.com",
        "requester_name": "Jane Doe",
        "channel": "email",
        "extra": {},
        "state": TicketState.ROUTED.value,
        **fields,
    }
    ticket = Ticket(**values)
    session.add(ticket)
    session.flush()
    return ticket


def add_label(session: Session, ticket: Ticket, **fields: Any) -> Classification:
    """A past Haiku label for `ticket`, made its current one."""
    values: dict[str, Any] = {
        "intent": "other",
        "department": ticket.department or "general",
        "priority": "normal",
        "language": "en",
        "sentiment": "neutral",
        "confidence": 0.9,
        "summary": "Old label.",
        "backend": "anthropic",
        "model": "claude-haiku-4-5",
        "taxonomy_version": "old-taxonomy",
        "prompt_version": "p-old",
        "input_tokens": 900,
        "output_tokens": 60,
        "cost_usd": Decimal("0.0012"),
        "latency_ms": 420.0,
        "created_at": utcnow(),
        **fields,
    }
    label = Classification(ticket_id=ticket.id, **values)
    session.add(label)
    session.flush()
    ticket.current_classification_id = label.id
    return label

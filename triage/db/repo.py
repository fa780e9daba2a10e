"""Repository functions: the queries the API and CLI share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from triage.classify.textclean import clean_ticket_text
from triage.db.models import Classification, DeadLetter, Dispatch, Ticket, TicketState, utcnow
from triage.ingest.models import InboundTicket
from triage.pipeline.relay import Pending, Publisher, classify_values, write_outbox
from triage.pipeline.states import transition
from triage.reliability.deadletter import close_open_letters

# Between the stored text and each update appended to it, so history stays readable.
UPDATE_SEPARATOR = "\n\n--- update {key} ---\n"
# Ticket.extra key listing the updates already applied (redeliveries must not append twice).
APPLIED_UPDATES = "triage_updates"


@dataclass(frozen=True, slots=True)
class Accepted:
    ticket_id: int
    duplicate: bool
    status: str
    # The classify message, to publish after the commit.
    outbox: Pending | None = None
    # New customer text on a known ticket, sent to classification again (`retriage`).
    updated: bool = False

    @property
    def outcome(self) -> str:
        """What the webhook did: new, duplicate or updated (the metrics' label)."""
        if self.duplicate:
            return "duplicate"
        return "updated" if self.updated else "new"

    @property
    def outbox_id(self) -> int | None:
        return None if self.outbox is None else self.outbox.id


def content_hash(subject: str, clean_text: str) -> str:
    """Equal for tickets whose meaningful text is equal, whatever the whitespace or case."""
    normalized = " ".join(f"{subject}\n{clean_text}".lower().split())
    return hashlib.sha256(normalized.encode()).hexdigest()


@lru_cache(maxsize=4)
def _accept_statement(dialect: str) -> Insert:
    """The ticket INSERT, built once per dialect (see session._insert_statement for why)."""
    if dialect == "postgresql":
        build: Any = postgresql.insert
    elif dialect == "sqlite":
        build = sqlite.insert
    else:
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    table = Ticket.__table__
    stmt: Insert = build(table).on_conflict_do_nothing(index_elements=["source", "external_id"])
    return stmt.returning(table.c.id)


def accept_ticket(
    session: Session,
    inbound: InboundTicket,
    *,
    update_policy: str = "ignore",
    publisher: Publisher | None = None,
    received_at: datetime | None = None,
) -> Accepted:
    """Store a new ticket and its classify message in the caller's transaction, or report the
    existing one. `ON CONFLICT DO NOTHING` makes concurrent duplicate deliveries safe.

    An update with new customer text for a stored ticket is ignored (a duplicate), or with
    `update_policy="retriage"` appended to the ticket and classified again. With `publisher`,
    the message is written for it to send after the commit (`Publisher.write`); without, it
    waits for the relay or an explicit publish. `received_at`: when the webhook arrived, for a
    ticket stored later than that (the spool, `triage.ingest.spool`); now when None."""
    values = ticket_values(inbound, received_at)
    connection = session.connection()
    ticket_id = connection.execute(_accept_statement(connection.dialect.name), values).scalar()
    if ticket_id is None:
        retriage = update_policy == "retriage" and inbound.update_key and inbound.update_text
        query = select(Ticket).where(
            Ticket.source == inbound.source, Ticket.external_id == inbound.external_id
        )
        if retriage:
            # Concurrent updates of one ticket take turns here, each appending to what the one
            # before it committed. Without the lock, two different comments arriving together
            # both read one generation, one lost the compare-and-set in `_retriage`, and was
            # answered as a duplicate: its text was never stored.
            query = query.with_for_update()
        existing = session.scalars(query.execution_options(populate_existing=True)).one()
        if retriage:
            retriaged = _retriage(session, existing, inbound, publisher)
            if retriaged is not None:
                return retriaged
        return Accepted(ticket_id=existing.id, duplicate=True, status=existing.state)
    return Accepted(
        ticket_id=ticket_id,
        duplicate=False,
        status=TicketState.RECEIVED,
        outbox=_classify_message(session, ticket_id, publisher),
    )


def ticket_values(inbound: InboundTicket, received_at: datetime | None = None) -> dict[str, Any]:
    """A new ticket's columns, as `accept_ticket` inserts them (see there for `received_at`)."""
    body = inbound.body
    if inbound.update_text:
        body = _appended(body, inbound.update_key, inbound.update_text)
    clean = clean_ticket_text(body)
    extra = dict(inbound.metadata)
    if inbound.update_key:
        extra[APPLIED_UPDATES] = [inbound.update_key]
    values: dict[str, Any] = {
        "source": inbound.source,
        "external_id": inbound.external_id,
        "subject": inbound.subject,
        "body": body,
        "clean_text": clean,
        "content_hash": content_hash(inbound.subject, clean),
        "requester_email": inbound.requester_email,
        "requester_name": inbound.requester_name,
        "channel": inbound.channel,
        "external_created_at": inbound.created_at,
        "metadata": extra,
        "state": TicketState.RECEIVED.value,
    }
    if received_at is not None:
        values["received_at"] = received_at
        # Its first run starts now, not at its arrival: the classify stage's age bound is for
        # a ticket failing too long, and this one could not start while the database was
        # down (a spooled webhook, triage.ingest.spool).
        values["generation_started_at"] = utcnow()
    return values


def _classify_message(session: Session, ticket_id: int, publisher: Publisher | None) -> Pending:
    values = classify_values(ticket_id)
    if publisher is None:
        return write_outbox(session, [values], claimed=False)[0]
    return publisher.write(session, [values])[0]


def _appended(body: str, key: str | None, text: str) -> str:
    return body + UPDATE_SEPARATOR.format(key=key or "") + text


def _retriage(
    session: Session, ticket: Ticket, inbound: InboundTicket, publisher: Publisher | None
) -> Accepted | None:
    """Append the update's text and send the ticket back to classification as a new
    generation; the earlier labels and dispatches stay as history. None when this update was
    applied already (a redelivery) or a concurrent delivery of it won the race."""
    applied = list((ticket.extra or {}).get(APPLIED_UPDATES, []))
    if inbound.update_key in applied or inbound.update_text is None:
        return None
    if ticket.erased_at is not None:
        # Its personal data was erased on request: storing new text would bring it back.
        return None
    body = _appended(ticket.body, inbound.update_key, inbound.update_text)
    clean = clean_ticket_text(body)
    moved = transition(
        session,
        ticket.id,
        TicketState.QUEUED,
        # Compare-and-set on the generation: of two deliveries of one update, one appends.
        where=[Ticket.generation == ticket.generation],
        body=body,
        clean_text=clean,
        content_hash=content_hash(ticket.subject, clean),
        # The fields as this webhook reports them: the new routing's write-back sets group
        # and priority only while they are still these (sinks.helpdesk.agent_wins).
        extra={
            **(ticket.extra or {}),
            **inbound.metadata,
            APPLIED_UPDATES: [*applied, inbound.update_key],
        },
        generation=ticket.generation + 1,
        # New text is new work: the attempt and age bounds start again, as for a reprocessed
        # ticket.
        generation_started_at=utcnow(),
        attempts=0,
        department=None,
        review_reason=None,
    )
    if not moved:
        return None
    close_open_letters(session, ticket.id)
    return Accepted(
        ticket_id=ticket.id,
        duplicate=False,
        status=TicketState.QUEUED,
        outbox=_classify_message(session, ticket.id, publisher),
        updated=True,
    )


def ticket_view(session: Session, ticket_id: int) -> dict[str, Any] | None:
    """What GET /tickets/{id} shows: state, current label, department, attempts."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        return None
    label = (
        session.get(Classification, ticket.current_classification_id)
        if ticket.current_classification_id
        else None
    )
    dispatches = session.scalars(
        select(Dispatch).where(Dispatch.ticket_id == ticket_id).order_by(Dispatch.id)
    ).all()
    letters = session.scalars(
        select(DeadLetter).where(DeadLetter.ticket_id == ticket_id).order_by(DeadLetter.id)
    ).all()
    return {
        "ticket_id": ticket.id,
        "source": ticket.source,
        "external_id": ticket.external_id,
        "state": ticket.state,
        "department": ticket.department,
        "review_reason": ticket.review_reason,
        "attempts": ticket.attempts,
        "generation": ticket.generation,
        "received_at": ticket.received_at.isoformat(),
        "state_changed_at": ticket.state_changed_at.isoformat(),
        "last_error": ticket.last_error,
        "labels": None if label is None else _label(label),
        "dispatches": [
            {
                "route": d.route,
                "department": d.department,
                "rule": d.rule,
                "generation": d.generation,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                "sinks_done": list(d.sinks_done or []),
            }
            for d in dispatches
        ],
        "dead_letters": [
            {
                "id": dl.id,
                "stage": dl.stage,
                "error_type": dl.error_type,
                "message": dl.message,
                "attempts": dl.attempts,
                "replayed_at": dl.replayed_at.isoformat() if dl.replayed_at else None,
            }
            for dl in letters
        ],
    }


def _label(row: Classification) -> dict[str, Any]:
    return {
        **row.label_fields(),
        "backend": row.backend,
        "model": row.model,
        "taxonomy_version": row.taxonomy_version,
        "prompt_version": row.prompt_version,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cost_usd": str(row.cost_usd),
        "latency_ms": round(row.latency_ms, 1),
        "reused_from_id": row.reused_from_id,
    }


def ticket_timeline(session: Session, ticket_id: int) -> list[dict[str, Any]]:
    """Everything that happened to a ticket, oldest first: received, each stage attempt with
    its error, each classification with its cost, dispatches and deliveries, dead letters,
    reprocessing."""
    from triage.db.models import Attempt, ReprocessItem

    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        return []
    events: list[dict[str, Any]] = [
        {"at": ticket.received_at, "event": "received", "detail": {"source": ticket.source}}
    ]
    for a in session.scalars(select(Attempt).where(Attempt.ticket_id == ticket_id)):
        events.append(
            {
                "at": a.started_at,
                "event": "attempt",
                "detail": {
                    "stage": a.stage,
                    "number": a.number,
                    "outcome": a.outcome,
                    "error_type": a.error_type,
                    "error": a.error,
                    "api_calls": a.api_calls,
                    "input_tokens": a.input_tokens,
                    "output_tokens": a.output_tokens,
                    "cost_usd": str(a.cost_usd),
                    "latency_ms": None if a.latency_ms is None else round(a.latency_ms, 1),
                },
            }
        )
    for c in session.scalars(select(Classification).where(Classification.ticket_id == ticket_id)):
        events.append(
            {
                "at": c.created_at,
                "event": "classification",
                "detail": {
                    "id": c.id,
                    "generation": c.generation,
                    "current": c.id == ticket.current_classification_id,
                    **_label(c),
                    "cache_read_tokens": c.cache_read_tokens,
                },
            }
        )
    for d in session.scalars(select(Dispatch).where(Dispatch.ticket_id == ticket_id)):
        events.append(
            {
                "at": d.created_at,
                "event": "dispatch",
                "detail": {
                    "route": d.route,
                    "department": d.department,
                    "rule": d.rule,
                    "generation": d.generation,
                    "delivery_attempts": d.delivery_attempts,
                    # Sinks that accepted it before a later one failed: not sent it again.
                    "sinks_done": list(d.sinks_done or []),
                },
            }
        )
        if d.delivered_at is not None:
            events.append(
                {"at": d.delivered_at, "event": "delivered", "detail": {"route": d.route}}
            )
    for dl in session.scalars(select(DeadLetter).where(DeadLetter.ticket_id == ticket_id)):
        events.append(
            {
                "at": dl.created_at,
                "event": "dead_letter",
                "detail": {
                    "id": dl.id,
                    "stage": dl.stage,
                    "error_type": dl.error_type,
                    "message": dl.message,
                    "attempts": dl.attempts,
                },
            }
        )
        if dl.replayed_at is not None:
            events.append({"at": dl.replayed_at, "event": "replayed", "detail": {"id": dl.id}})
    for item in session.scalars(select(ReprocessItem).where(ReprocessItem.ticket_id == ticket_id)):
        if item.done_at is not None:
            events.append(
                {
                    "at": item.done_at,
                    "event": "reprocessed",
                    "detail": {
                        "run_id": item.run_id,
                        "outcome": item.outcome,
                        "label_changed": item.label_changed,
                        "error": item.error,
                    },
                }
            )
    events.sort(key=lambda e: e["at"])
    for e in events:
        e["at"] = e["at"].isoformat()
    return events

"""A webhook's ticket stored: a new one with its classify message in a single statement.

Nearly every webhook brings a new ticket. On PostgreSQL its row and its outbox row go in one
`INSERT ... SELECT` over a data-modifying CTE, in autocommit (`session.one_statement`): one
round trip instead of four (BEGIN, two INSERTs, COMMIT), and no ORM session. A ticket already
stored (a duplicate delivery, an update) takes `repo.accept_ticket`, as does every webhook on
SQLite, which has no data-modifying CTEs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Insert, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, sessionmaker

from triage.db.models import OutboxMessage, Ticket, TicketState, utcnow
from triage.db.repo import Accepted, accept_ticket, ticket_values
from triage.db.session import engine_of, one_statement, session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.relay import Publisher, as_written, classify_values, pending_of

# The ticket columns the statement writes: what `ticket_values` gives, and when it arrived.
_TICKET_COLUMNS = (
    "source",
    "external_id",
    "subject",
    "body",
    "clean_text",
    "content_hash",
    "requester_email",
    "requester_name",
    "channel",
    "external_created_at",
    "metadata",
    "state",
    "received_at",
    "state_changed_at",
)
# The classify message's columns but its ticket and args, which come from the new row. Bound
# under names of their own: the ticket's parameters share the statement's namespace.
_MESSAGE_COLUMNS = ("task", "queue", "countdown", "created_at", "available_at", "publish_attempts")


def store_ticket(
    sessions: sessionmaker[Session],
    inbound: InboundTicket,
    *,
    update_policy: str = "ignore",
    publisher: Publisher | None = None,
) -> Accepted:
    """`repo.accept_ticket` in a transaction of its own, for a webhook that has just arrived;
    a new ticket on PostgreSQL in one statement (see the module)."""
    if engine_of(sessions).dialect.name == "postgresql":
        accepted = _insert_new(sessions, inbound, publisher)
        if accepted is not None:
            return accepted
    with session_scope(sessions) as session:
        return accept_ticket(session, inbound, update_policy=update_policy, publisher=publisher)


def _insert_new(
    sessions: sessionmaker[Session], inbound: InboundTicket, publisher: Publisher | None
) -> Accepted | None:
    """The ticket and its classify message, or None (and nothing written) when a ticket with
    this source and external id exists."""
    now = utcnow()
    ticket = {**ticket_values(inbound), "received_at": now, "state_changed_at": now}
    # The message as `accept_ticket` writes it (`Publisher.write`), its ticket id still unknown.
    message = as_written(classify_values(0), publisher)
    params: dict[str, Any] = {name: ticket[name] for name in _TICKET_COLUMNS}
    params.update({f"m_{name}": message[name] for name in _MESSAGE_COLUMNS})
    with one_statement(sessions) as connection:
        row = connection.execute(_accept_with_message(), params).first()
    if row is None:
        return None
    message_id, ticket_id = row
    written = {**message, "ticket_id": ticket_id, "args": classify_values(ticket_id)["args"]}
    return Accepted(
        ticket_id=ticket_id,
        duplicate=False,
        status=TicketState.RECEIVED,
        outbox=pending_of(message_id, written),
    )


@lru_cache(maxsize=1)
def _accept_with_message() -> Insert:
    """INSERT the ticket (nothing on a conflict), then its message from what that returned.
    The message's args are built in SQL from the new id: `{"ticket_id": id}`, as
    `relay.classify_values` has them (tests/integration/test_intake.py holds the two equal)."""
    tickets = Ticket.__table__
    outbox = OutboxMessage.__table__
    accepted = (
        postgresql.insert(Ticket)
        .values({name: bindparam(name, type_=tickets.c[name].type) for name in _TICKET_COLUMNS})
        .on_conflict_do_nothing(index_elements=["source", "external_id"])
        .returning(tickets.c.id)
        .cte("accepted")
    )
    message = select(
        accepted.c.id,
        func.json_build_object("ticket_id", accepted.c.id),
        *(bindparam(f"m_{name}", type_=outbox.c[name].type) for name in _MESSAGE_COLUMNS),
    )
    return (
        insert(OutboxMessage)
        .from_select(["ticket_id", "args", *_MESSAGE_COLUMNS], message)
        .returning(outbox.c.id, outbox.c.ticket_id)
    )

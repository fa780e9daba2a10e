"""The spool: a webhook that arrives while the database is down, kept on the broker until it
can be stored.

Answering such a webhook 503 leaves the ticket to the helpdesk's retries, and those run out
before a database restart of a few minutes is over (Freshdesk gives up after three, an hour
in; django-helpdesk never retries). The broker is a separate service, usually up when the
database is not. So the API publishes the verified, parsed ticket as a task message on
`triage.classify`, answers 202 "spooled", and a worker stores it with `accept_ticket` once the
database is back, exactly as the webhook would have: a duplicate stays a duplicate, an update
an update, and the classify message goes out through the outbox.

The spool is as durable as the broker: a Redis without persistence that restarts loses it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery
from pydantic import BaseModel, ConfigDict

from triage.db.repo import Accepted, accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket, UTCTime
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.pipeline.runtime import Runtime

log = logging.getLogger(__name__)

SPOOL_TASK = "triage.accept_spooled"


class SpooledTicket(BaseModel):
    """A spool message's arguments: the ticket as the webhook parsed it, and when the webhook
    arrived (the ticket's `received_at`, however long the spool held it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ticket: InboundTicket
    arrived_at: UTCTime


def spool_ticket(celery: Celery, inbound: InboundTicket, arrived_at: datetime) -> None:
    """Publish the ticket for a worker to store later. Raises when the broker cannot take it."""
    kwargs = SpooledTicket(ticket=inbound, arrived_at=arrived_at).model_dump(mode="json")
    with celery.producer_or_acquire() as producer:
        # One connection attempt: kombu's default, retried with backoff, kept a webhook 6 s
        # before its 503 when the broker was down too, holding one of the API's threads.
        producer.connection.ensure_connection(max_retries=0)
        celery.send_task(SPOOL_TASK, kwargs=kwargs, queue=CLASSIFY_QUEUE, producer=producer)


def store_spooled(rt: Runtime, message: dict[str, Any]) -> Accepted:
    """Store a spooled ticket as the webhook would have, keeping its arrival time; its classify
    message is published after the commit. Raises what storing raised (a database outage
    among them: the caller puts the message back on the broker)."""
    spooled = SpooledTicket.model_validate(message)
    with session_scope(rt.sessions) as session:
        accepted = accept_ticket(
            session,
            spooled.ticket,
            update_policy=rt.settings.update_policy,
            publisher=rt.publisher,
            received_at=spooled.arrived_at,
        )
    if accepted.outbox is not None:
        rt.publish_after_commit([accepted.outbox])
    log.info(
        "spooled %s ticket stored: ticket %d (%s)",
        spooled.ticket.source,
        accepted.ticket_id,
        accepted.outcome,
    )
    return accepted


def spooled_ticket_name(message: dict[str, Any]) -> str:
    """The helpdesk's name for a spooled ticket (source and external id), for an operator to
    find it there when it cannot be stored; read from the raw message, which may not validate."""
    ticket = message.get("ticket")
    if not isinstance(ticket, dict):
        return "unknown ticket"
    source, external_id = ticket.get("source"), ticket.get("external_id")
    return f"{str(source)[:32]} ticket {str(external_id)[:255]!r}"

"""A webhook's new ticket is stored in one statement on PostgreSQL (`triage.db.intake`): the
rows it writes are the rows `accept_ticket` writes, and everything but a new ticket takes
`accept_ticket` itself. Run on PostgreSQL and on SQLite (which always takes accept_ticket)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from tests.support.stack import empty_database
from triage.db.intake import store_ticket
from triage.db.models import OutboxMessage, Ticket
from triage.db.repo import accept_ticket
from triage.db.session import get_sessionmaker, session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.relay import CLAIM_LEASE, Publisher, classify_values


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request, pg_url, tmp_path):
    return get_sessionmaker(empty_database(request.param, pg_url, tmp_path), 4)


def inbound(external_id: str, **fields) -> InboundTicket:
    values = {
        "source": "generic",
        "external_id": external_id,
        "subject": "Charged twice",
        "body": "Hello,  I was charged TWICE for order 4417.\n\nThanks, Ana",
        "requester_email": "ana@example.com",
        "requester_name": "Ana Lima",
        "channel": "email",
        "created_at": datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
        "metadata": {"plan": "pro", "tags": ["billing"]},
        **fields,
    }
    return InboundTicket(**values)


def publisher(sessions) -> Publisher:
    return Publisher(sessions, send=lambda *args, **kwargs: None)


# Columns that differ between two stores of equal tickets by nature.
_OWN = {"id", "external_id", "received_at", "state_changed_at"}


def _ticket(sessions, ticket_id: int) -> dict:
    with sessions() as s:
        row = s.get(Ticket, ticket_id)
        return {c.key: getattr(row, c.key) for c in Ticket.__mapper__.column_attrs}


def _messages(sessions, ticket_id: int) -> list[OutboxMessage]:
    with sessions() as s:
        return list(s.scalars(select(OutboxMessage).where(OutboxMessage.ticket_id == ticket_id)))


@pytest.mark.parametrize("claims", [True, False], ids=["publisher", "relay"])
def test_new_ticket_rows_equal_what_accept_ticket_writes(sessions, claims):
    given = publisher(sessions) if claims else None
    before = datetime.now(UTC)
    fast = store_ticket(sessions, inbound("t-1"), publisher=given)
    with session_scope(sessions) as s:
        slow = accept_ticket(s, inbound("t-2"), publisher=given)
    after = datetime.now(UTC)

    assert (fast.duplicate, fast.status, fast.outcome) == (False, "received", "new")
    a, b = _ticket(sessions, fast.ticket_id), _ticket(sessions, slow.ticket_id)
    assert {k: v for k, v in a.items() if k not in _OWN} == {
        k: v for k, v in b.items() if k not in _OWN
    }
    assert before <= a["received_at"] <= after and before <= a["state_changed_at"] <= after
    assert a["attempts"] == 0 and a["generation"] == 0 and a["generation_started_at"] is None

    [mine] = _messages(sessions, fast.ticket_id)
    [theirs] = _messages(sessions, slow.ticket_id)
    assert mine.args == classify_values(fast.ticket_id)["args"] == {"ticket_id": fast.ticket_id}
    for column in ("task", "queue", "countdown", "publish_attempts", "sent_at"):
        assert getattr(mine, column) == getattr(theirs, column), column
    # Claimed as written for a publisher that sends it after the commit; due now for the relay.
    lease = mine.available_at - mine.created_at
    assert (lease > CLAIM_LEASE / 2) if claims else (lease.total_seconds() == 0)
    # What the API hands its publishing thread names the row it wrote.
    assert fast.outbox is not None
    assert (fast.outbox.id, fast.outbox.ticket_id, fast.outbox.args) == (
        mine.id,
        fast.ticket_id,
        mine.args,
    )
    assert (fast.outbox.task, fast.outbox.queue, fast.outbox.created_at) == (
        mine.task,
        mine.queue,
        mine.created_at,
    )


def test_a_duplicate_delivery_answers_the_stored_ticket_and_writes_nothing(sessions):
    first = store_ticket(sessions, inbound("t-1"), publisher=publisher(sessions))
    again = store_ticket(sessions, inbound("t-1", body="other text"), publisher=publisher(sessions))
    assert (again.ticket_id, again.duplicate, again.outbox) == (first.ticket_id, True, None)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert "charged TWICE" in s.get(Ticket, first.ticket_id).body


def test_an_update_to_a_stored_ticket_is_retriaged_as_before(sessions):
    first = store_ticket(sessions, inbound("t-1"), publisher=publisher(sessions))
    update = inbound("t-1", update_key="c-9", update_text="Still waiting for the refund.")
    again = store_ticket(sessions, update, update_policy="retriage", publisher=publisher(sessions))
    assert (again.ticket_id, again.duplicate, again.outcome) == (first.ticket_id, False, "updated")
    stored = _ticket(sessions, first.ticket_id)
    assert stored["body"].endswith("Still waiting for the refund.")
    assert stored["generation"] == 1
    assert len(_messages(sessions, first.ticket_id)) == 2


def test_a_new_ticket_that_carries_an_update_keeps_its_text_and_key(sessions):
    # A helpdesk's first webhook for a ticket can already be a comment on it.
    update = inbound("t-1", update_key="c-1", update_text="Also my invoice is wrong.")
    accepted = store_ticket(sessions, update, update_policy="retriage")
    stored = _ticket(sessions, accepted.ticket_id)
    assert stored["body"].endswith("Also my invoice is wrong.")
    assert stored["extra"]["triage_updates"] == ["c-1"]

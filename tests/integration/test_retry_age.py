"""The classify stage's age bound (`TRIAGE_CLASSIFY_MAX_AGE`) counts from when the current
run of the ticket began: its receipt, or the start of its newest generation (new customer
text, a reprocess, a replayed dead letter). A ticket received days ago and classified again
today is fresh work: a 529 on it is retried, not dead-lettered as "too old".

Real PostgreSQL and Redis, the real SDK against the fake Messages API.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial

import pytest
from sqlalchemy import select, update

from tests.fakeanthropic.faults import Fault
from triage.db.models import DeadLetter, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_labels import reopen
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.runtime import Runtime
from triage.reliability.deadletter import dead_letter, replay

BODY = "I was charged twice for order 5531. [[intent:billing]] [[confidence:0.95]]"


@pytest.fixture()
def runtime(runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    return partial(runtime, TRIAGE_UPDATE_POLICY="retriage", TRIAGE_CLASSIFY_MAX_AGE="3600")


def _post(rt: Runtime, *, key: str | None = None, text: str | None = None) -> int:
    inbound = InboundTicket(
        source="generic",
        external_id="age-1",
        subject="Charged twice",
        body=BODY,
        update_key=key,
        update_text=text,
    )
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound, update_policy=rt.settings.update_policy).ticket_id


def _routed_two_days_ago(rt: Runtime) -> int:
    tid = _post(rt)
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Ticket).where(Ticket.id == tid).values(received_at=utcnow() - timedelta(days=2))
        )
    return tid


def _retriage(rt: Runtime, tid: int) -> None:
    assert _post(rt, key="c1", text="Also, the app crashes when I open the invoice.") == tid


def _reprocess(rt: Runtime, tid: int) -> None:
    with session_scope(rt.sessions) as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        assert reopen(session, tid, ticket.generation)


def _replay(rt: Runtime, tid: int) -> None:
    with session_scope(rt.sessions) as session:
        lettered = dead_letter(
            session,
            ticket_id=tid,
            stage="classify",
            error=PermanentError("refused for the test"),
            attempts=1,
            payload={},
        )
        assert lettered is not None
        letter_id = lettered[0].id
    with session_scope(rt.sessions) as session:
        assert replay(session, letter_id) is not None


@pytest.mark.parametrize(
    "new_generation", [_retriage, _reprocess, _replay], ids=["retriage", "reprocess", "replay"]
)
def test_a_transient_failure_of_an_old_ticket_classified_again_is_retried_not_dead_lettered(
    runtime, fake, new_generation
):
    rt = runtime()
    tid = _routed_two_days_ago(rt)
    new_generation(rt, tid)
    fake.add_fault(Fault(kind="overloaded"))

    assert classify_tickets_stage(rt, [tid]) == {tid: "retry"}
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None and ticket.state == "queued" and ticket.generation == 1
        open_letters = select(DeadLetter).where(
            DeadLetter.ticket_id == tid, DeadLetter.replayed_at.is_(None)
        )
        assert session.scalars(open_letters).all() == []
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}


def test_a_ticket_failing_since_its_receipt_longer_than_the_max_age_is_still_dead_lettered(
    runtime, fake
):
    rt = runtime()
    tid = _post(rt)
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Ticket).where(Ticket.id == tid).values(received_at=utcnow() - timedelta(hours=2))
        )
    fake.add_fault(Fault(kind="overloaded"))

    assert classify_tickets_stage(rt, [tid]) == {tid: "dead"}


def test_a_ticket_spooled_through_a_database_outage_longer_than_the_max_age_is_retried(
    runtime, fake
):
    """A webhook spooled while the database was down is stored later with its arrival as
    `received_at` (stats count the outage). Its first run starts when it is stored: a
    transient failure then is retried, not dead-lettered as too old."""
    rt = runtime()
    inbound = InboundTicket(
        source="generic", external_id="spooled-1", subject="Charged twice", body=BODY
    )
    arrived = utcnow() - timedelta(hours=2)
    with session_scope(rt.sessions) as session:
        tid = accept_ticket(session, inbound, received_at=arrived).ticket_id
    fake.add_fault(Fault(kind="overloaded"))

    assert classify_tickets_stage(rt, [tid]) == {tid: "retry"}
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        assert ticket.received_at.replace(tzinfo=None) == arrived.replace(tzinfo=None)

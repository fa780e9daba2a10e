"""Erasing a customer's personal data (db.erasure) on real PostgreSQL: the text, requester,
metadata, summaries and error text go; labels, routing and cost stay; and nothing brings the
text back or classifies the ticket again."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select

from tests.support.rows import add_label, add_ticket
from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.erasure import ERASED, erase_tickets, requester_ticket_ids
from triage.db.models import (
    Attempt,
    Classification,
    DeadLetter,
    Dispatch,
    Ticket,
    TicketState,
    utcnow,
)
from triage.db.repo import APPLIED_UPDATES, accept_ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_labels import reopen
from triage.reliability.deadletter import dead_letter, replay


@pytest.fixture()
def rt(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(stack_env(pg_url, clean_redis))


def _ticket(
    rt, n: int, email: str, state: TicketState = TicketState.ROUTED, error: str | None = None
) -> int:
    body = f"Hi, I'm {email.split('@')[0]}, order {n} never came. Call me on +44 20 7946 0{n:03d}"
    with session_scope(rt.sessions) as s:
        ticket = add_ticket(
            s,
            body,
            subject="Where is my order",
            source="zendesk",
            external_id=f"erase-{n}",
            requester_email=email,
            requester_name=email.split("@")[0].title(),
            extra={"brand": "acme", "phone": "+44 20 7946 0000", APPLIED_UPDATES: ["comment:1"]},
            state=state.value,
            department="shipping",
            last_error=error,
        )
        add_label(
            s,
            ticket,
            intent="shipping",
            sentiment="negative",
            summary=f"{email} asks where order {n} is",
        )
        s.add(
            Attempt(
                ticket_id=ticket.id,
                stage="classify",
                number=1,
                finished_at=utcnow(),
                outcome="retry",
                error_type="InvalidOutput",
                error=f"the model said: {email} wants order {n}",
            )
        )
        return ticket.id


def test_a_requesters_tickets_lose_their_personal_data_and_keep_their_labels(rt):
    alice = [_ticket(rt, 1, "Alice@Example.com"), _ticket(rt, 2, "alice@example.com")]
    bob = _ticket(rt, 3, "bob@example.com")
    in_flight = _ticket(rt, 4, "alice@example.com", state=TicketState.QUEUED)
    with session_scope(rt.sessions) as s:
        ids = requester_ticket_ids(s, " ALICE@example.com ")
        assert ids == [*alice, in_flight]
        report = erase_tickets(s, [*ids, 999999])
    assert report.erased == alice and report.in_flight == [in_flight]
    assert report.missing == [999999] and report.already == []

    with rt.sessions() as s:
        for ticket_id in alice:
            t = s.get(Ticket, ticket_id)
            assert (t.subject, t.body, t.clean_text) == ("", "", "")
            assert t.requester_email is None and t.requester_name is None
            assert t.extra == {APPLIED_UPDATES: ["comment:1"]}
            assert t.erased_at is not None and t.content_hash.startswith("erased:")
            label = s.get(Classification, t.current_classification_id)
            assert label.summary == ERASED
            assert (label.intent, label.department, label.cost_usd) == (
                "shipping",
                "shipping",
                Decimal("0.0012"),
            )
            errors = s.scalars(select(Attempt.error).where(Attempt.ticket_id == ticket_id)).all()
            assert errors == [ERASED]
            assert t.state == TicketState.ROUTED
        for untouched in (bob, in_flight):
            t = s.get(Ticket, untouched)
            assert t.erased_at is None and t.requester_email.endswith("example.com")
            assert "order" in t.body and t.extra["phone"]
            assert s.get(Classification, t.current_classification_id).summary.endswith("is")

    with session_scope(rt.sessions) as s:
        again = erase_tickets(s, alice)
    assert again.already == alice and again.erased == []


def test_an_erased_ticket_is_never_classified_again_nor_given_text_back(rt):
    routed = _ticket(rt, 1, "carol@example.com")
    lettered = _ticket(rt, 2, "carol@example.com", state=TicketState.DEAD_LETTERED, error="boom")
    with session_scope(rt.sessions) as s:
        letter = DeadLetter(
            ticket_id=lettered,
            stage="classify",
            error_type="PermanentError",
            message="refused: carol@example.com",
            payload={"task": "triage.classify_ticket"},
        )
        s.add(letter)
        s.flush()
        letter_id = letter.id
        assert erase_tickets(s, [routed, lettered]).erased == [routed, lettered]
        assert s.get(Ticket, lettered).last_error == ERASED

    with session_scope(rt.sessions) as s:
        # Reprocessing (and a batch label) reopen a finished ticket: not an erased one.
        assert reopen(s, routed, s.get(Ticket, routed).generation) is False
        # A classify dead letter's replay would classify empty text: refused, letter kept open.
        assert replay(s, letter_id) is None
    with rt.sessions() as s:
        letter = s.get(DeadLetter, letter_id)
        assert letter.replayed_at is None and letter.message == ERASED

    # The customer writes again on the erased ticket: the update is not stored.
    update = InboundTicket(
        source="zendesk",
        external_id="erase-1",
        subject="Where is my order",
        body="",
        requester_email="carol@example.com",
        update_key="comment:2",
        update_text="Still nothing, carol@example.com",
    )
    with session_scope(rt.sessions) as s:
        accepted = accept_ticket(s, update, update_policy="retriage")
    assert accepted.duplicate is True
    with rt.sessions() as s:
        t = s.get(Ticket, routed)
        assert t.body == "" and t.state == TicketState.ROUTED and t.requester_email is None


def test_a_dead_letter_of_an_erased_ticket_made_after_erasure_is_not_replayed(rt):
    # Erased while routed, then its delivery failed for good: replaying the delivery is fine
    # (the label is kept), but nothing routes it through classification.
    ticket_id = _ticket(rt, 5, "dan@example.com")
    with session_scope(rt.sessions) as s:
        t = s.get(Ticket, ticket_id)
        s.add(
            Dispatch(
                ticket_id=ticket_id,
                classification_id=t.current_classification_id,
                generation=t.generation,
                route="dept.shipping",
                department="shipping",
            )
        )
    with session_scope(rt.sessions) as s:
        erase_tickets(s, [ticket_id])
    with session_scope(rt.sessions) as s:
        lettered = dead_letter(
            s,
            ticket_id=ticket_id,
            stage="deliver",
            error=PermanentError("sink said 400"),
            attempts=1,
            payload={},
        )
        assert lettered is not None
        letter_id = lettered[0].id
    with session_scope(rt.sessions) as s:
        replayed = replay(s, letter_id)
    assert replayed is not None and replayed.stage == "deliver"

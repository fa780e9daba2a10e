"""A claimed ticket whose request cannot be prepared (a stored row of a shape the code cannot
read) fails alone, as a counted attempt: dead-lettered with the error, shown by `triage dlq
list`, while the rest of its batch is classified. Rolled back with its claim instead, it
would come back from the sweeper every few minutes for ever.

Real PostgreSQL and Redis, the real SDK against the fake Messages API. The faulty rows are
written as an older version or a hand edit would leave them; nothing in triage is patched."""

from __future__ import annotations

from sqlalchemy import select, update

from triage.db.models import Attempt, Classification, DeadLetter, Ticket
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.runtime import Runtime


def _post(rt: Runtime, external_id: str, body: str) -> int:
    inbound = InboundTicket(source="generic", external_id=external_id, subject="Help", body=body)
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound).ticket_id


def _assert_dead_alone(cli, rt: Runtime, poison: int, healthy: int, outcomes: dict[int, str]):
    assert outcomes == {poison: "dead", healthy: "routed"}
    with rt.sessions() as session:
        ticket = session.get(Ticket, poison)
        assert ticket is not None and ticket.state == "dead_lettered"
        failed = session.scalars(
            select(Attempt).where(Attempt.ticket_id == poison, Attempt.outcome == "dead")
        ).all()
    # The attempt counts, and made no call.
    assert [(a.number, a.api_calls) for a in failed] == [(ticket.attempts, 0)]
    letters = cli.json("dlq", "list")
    assert [(r["ticket_id"], r["stage"], r["error_type"]) for r in letters] == [
        (poison, "classify", "RequestNotPrepared")
    ]
    return letters[0]


def test_a_stored_first_answer_it_cannot_read_dead_letters_that_ticket_alone(cli, rt, fake):
    poison = _post(rt, "p-1", "Where is my parcel? [[intent:shipping]]")
    healthy = _post(rt, "p-2", "I was charged twice [[intent:billing]]")
    with session_scope(rt.sessions) as session:
        # A retried ticket whose earlier attempt stored its first answer in another shape.
        session.execute(update(Ticket).where(Ticket.id == poison).values(attempts=1))
        session.add(
            Attempt(
                ticket_id=poison,
                stage="classify",
                number=1,
                outcome="retry",
                answer={"generation": 0, "label": {"intent": "shipping"}},
            )
        )
    outcomes = classify_tickets_stage(rt, [poison, healthy])
    letter = _assert_dead_alone(cli, rt, poison, healthy, outcomes)
    shown = cli.json("dlq", "show", str(letter["id"]))
    assert "could not prepare the request: KeyError" in shown["message"]


def test_a_reusable_label_it_cannot_read_dead_letters_that_ticket_alone(cli, rt, fake):
    text = "My parcel never arrived [[intent:shipping]]"
    first = _post(rt, "r-1", text)
    assert classify_tickets_stage(rt, [first]) == {first: "routed"}
    with session_scope(rt.sessions) as session:
        # Its label as a version that allowed an empty summary stored it.
        session.execute(
            update(Classification).where(Classification.ticket_id == first).values(summary="")
        )
    poison = _post(rt, "r-2", text)
    healthy = _post(rt, "r-3", "I was charged twice [[intent:billing]]")
    outcomes = classify_tickets_stage(rt, [poison, healthy])
    letter = _assert_dead_alone(cli, rt, poison, healthy, outcomes)
    shown = cli.json("dlq", "show", str(letter["id"]))
    assert "could not prepare the request: ValidationError" in shown["message"]
    with rt.sessions() as session:
        assert session.scalars(select(DeadLetter.ticket_id)).all() == [poison]

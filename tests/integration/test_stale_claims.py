"""A worker that outlives its claim's lease (a VM pause, a long GC, a hung call) and only then
finishes must not undo the claim another worker has taken since: its label, its retry and
its dead letter are all superseded, and its paid call stays on record.

Real PostgreSQL and Redis, the real SDK against the fake Messages API; the stage functions run
on threads, as a worker's task threads run them. The fake's `timeout` fault holds each call
open for a set time (or past its client's timeout), which sets the interleaving: A's call is
out, its lease is made to have run out (its claim moved back an hour, as a long stall would
leave it), worker B takes the ticket over and its call is out, then A's call ends.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.fakeanthropic.faults import Fault
from tests.support.stack import in_background, wait_until
from triage.db.models import Attempt, DeadLetter, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.runtime import Runtime

BODY = "I was charged twice for order 5531. [[intent:billing]] [[confidence:0.95]]"


def _post(rt: Runtime) -> int:
    inbound = InboundTicket(
        source="generic", external_id="stale-1", subject="Charged twice", body=BODY
    )
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound, update_policy=rt.settings.update_policy).ticket_id


def _lease_runs_out(rt: Runtime, tid: int) -> None:
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Ticket)
            .where(Ticket.id == tid)
            .values(state_changed_at=utcnow() - timedelta(hours=1))
        )


def _ticket(rt: Runtime, tid: int) -> Ticket:
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        return ticket


# (A's settings, A's call: seconds the fake holds it, A's outcome without the fix)
CASES = {
    # A's call times out (transient): it would put B's claim back to queued.
    "retry": ({"TRIAGE_API_TIMEOUT_SECONDS": "2"}, 30.0),
    # Out of attempts: A would dead-letter the ticket B is classifying.
    "dead": ({"TRIAGE_API_TIMEOUT_SECONDS": "2", "TRIAGE_CLASSIFY_MAX_ATTEMPTS": "1"}, 30.0),
    # A's answer comes: it would route the ticket under B's claim, and B's label be dropped.
    "label": ({"TRIAGE_API_TIMEOUT_SECONDS": "10"}, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stale_attempt_is_superseded_and_leaves_the_newer_claim_intact(runtime, fake, case):
    a_settings, a_call = CASES[case]
    worker_a = runtime(**a_settings)
    worker_b = runtime(TRIAGE_API_TIMEOUT_SECONDS="10")
    tid = _post(worker_a)
    fake.add_fault(Fault(kind="timeout", delay=a_call))
    a, a_out = in_background(lambda: classify_tickets_stage(worker_a, [tid]))
    wait_until(lambda: fake.in_flight() == 1, 10, what="A's call in flight")
    _lease_runs_out(worker_a, tid)
    # B's call answers after A's has ended (at 2 s in every case), within B's timeout.
    fake.add_fault(Fault(kind="timeout", delay=5.0))
    b, b_out = in_background(lambda: classify_tickets_stage(worker_b, [tid]))
    wait_until(lambda: fake.in_flight() == 2, 10, what="B's call in flight")
    b_claimed = _ticket(worker_b, tid)
    assert b_claimed.state == "classifying" and b_claimed.attempts == 2

    a.join(30)
    assert a_out["result"] == {tid: "superseded"}
    # B's claim, as B took it, while B's call is still out.
    now = _ticket(worker_b, tid)
    assert (now.state, now.attempts, now.state_changed_at) == (
        "classifying",
        2,
        b_claimed.state_changed_at,
    )
    b.join(30)
    assert b_out["result"] == {tid: "routed"}
    assert _ticket(worker_b, tid).state == "routed"
    with worker_b.sessions() as session:
        attempts = session.scalars(
            select(Attempt).where(Attempt.ticket_id == tid).order_by(Attempt.number)
        ).all()
        letters = session.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).all()
    assert [(r.number, r.outcome) for r in attempts] == [(1, "superseded"), (2, "ok")]
    # A's call is on record: counted, and billed when it answered.
    assert attempts[0].api_calls == 1
    assert (attempts[0].cost_usd > 0) == (case == "label")
    assert letters == []

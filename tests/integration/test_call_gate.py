"""Tickets claimed ahead of a free call slot (fanout.CallGate): they are called as slots
free, never more at once than the process's limit, and one kept waiting past the gate's
bound goes back on the queue without spending an attempt instead of being called late in its
lease. Real PostgreSQL and Redis, the real SDK against the fake Messages API."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from tests.fakeanthropic import FakeAnthropic
from tests.fakeanthropic.faults import Fault
from tests.support.stack import anthropic_env, make_runtime, truncate
from triage.db.models import Attempt, OutboxMessage, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.fanout import CallPool
from triage.pipeline.relay import CLASSIFY_TASK
from triage.pipeline.runtime import Runtime

BODIES = [
    "My invoice was charged twice this month. [[intent:billing]]",
    "The dashboard shows error 502 since this morning. [[intent:technical]]",
    "Please change the delivery address of my order. [[intent:shipping]]",
]


@pytest.fixture()
def fake():
    with FakeAnthropic(latency=0.3) as api:
        yield api


def _runtime(pg_url: str, redis_url: str, base_url: str, pool: CallPool) -> Runtime:
    truncate(pg_url)
    rt = make_runtime(anthropic_env(pg_url, redis_url, base_url))
    rt.calls = pool
    return rt


def _post(rt: Runtime, n: int) -> int:
    inbound = InboundTicket(
        source="generic", external_id=f"gate-{n}", subject="Help", body=BODIES[n % len(BODIES)]
    )
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound).ticket_id


def test_claimed_tickets_wait_for_a_call_slot_and_the_limit_holds(pg_url, clean_redis, fake):
    pool = CallPool(2)
    rt = _runtime(pg_url, clean_redis, fake.base_url, pool)
    ids = [_post(rt, n) for n in range(3)]

    # Two call slots and a claim slot more: the batch goes in one part, and the third call
    # waits at the gate for one of the first two.
    outcomes = classify_tickets_stage(rt, ids)

    assert outcomes == {i: "routed" for i in ids}
    assert fake.call_count() == 3
    assert fake.stats()["peak_in_flight"] == 2
    with rt.sessions() as s:
        assert s.scalars(select(Attempt.number).where(Attempt.ticket_id.in_(ids))).all() == [1] * 3
    pool.shutdown()


def test_a_ticket_kept_waiting_too_long_for_a_call_goes_back_without_spending_an_attempt(
    pg_url, clean_redis, fake
):
    # One call slot, and a claimed ticket may wait only 0.1 s for it: the second ticket's
    # wait behind the first's 0.3 s call is too long.
    pool = CallPool(1, max_wait=0.1)
    rt = _runtime(pg_url, clean_redis, fake.base_url, pool)
    first, second = _post(rt, 0), _post(rt, 1)

    outcomes = classify_tickets_stage(rt, [first, second])

    assert outcomes == {first: "routed", second: "deferred"}
    assert fake.call_count() == 1  # the second was never asked
    with rt.sessions() as s:
        ticket = s.get(Ticket, second)
        assert ticket is not None
        assert (ticket.state, ticket.attempts) == ("queued", 0)
        # Back on the queue: a classify message of its own beside the one that brought it.
        messages = s.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.ticket_id == second, OutboxMessage.task == CLASSIFY_TASK)
        )
        assert messages == 2

    with session_scope(rt.sessions) as session:
        session.execute(update(OutboxMessage).values(available_at=utcnow()))
    # Alone, it has the slot at once.
    assert classify_tickets_stage(rt, [second]) == {second: "routed"}
    assert fake.call_count() == 2
    pool.shutdown()


def test_a_ticket_waiting_for_a_call_when_the_circuit_opens_is_not_called(
    pg_url, clean_redis, fake
):
    # One call slot: the second ticket is claimed and admitted with the first, and waits for
    # its call. The first meets a 401, which opens the circuit before the slot is handed on.
    fake.add_fault(Fault("auth", times=1))
    pool = CallPool(1)
    rt = _runtime(pg_url, clean_redis, fake.base_url, pool)
    assert rt.admission is not None
    first, second = _post(rt, 0), _post(rt, 1)

    outcomes = classify_tickets_stage(rt, [first, second])

    assert outcomes == {first: "retry", second: "deferred"}
    assert fake.call_count() == 1
    assert rt.admission.breaker.open_reason() == "api_key_rejected"
    with rt.sessions() as s:
        waited = s.get(Ticket, second)
        assert waited is not None
        assert (waited.state, waited.attempts) == ("queued", 0)
        # It comes back once the cool-down is over, not at once.
        back_at = s.scalar(
            select(func.max(OutboxMessage.available_at)).where(OutboxMessage.ticket_id == second)
        )
    assert back_at is not None
    assert (back_at - utcnow()).total_seconds() > rt.admission.breaker.auth_cooldown - 30
    pool.shutdown()

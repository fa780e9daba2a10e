"""Tickets with the same text in one batch pay for one call: the others wait for its label and
reuse it. Real PostgreSQL and Redis, the real SDK against the fake Messages API."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from tests.fakeanthropic import FakeAnthropic
from tests.fakeanthropic.faults import Fault
from tests.support.stack import anthropic_env, make_runtime, truncate
from triage.db.models import Classification, OutboxMessage, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.runtime import Runtime

OUTAGE = "The dashboard shows error 502 since this morning. [[intent:technical]]"


@pytest.fixture()
def fake():
    with FakeAnthropic() as api:
        yield api


def _post(rt: Runtime, external_id: str, body: str = OUTAGE) -> int:
    inbound = InboundTicket(source="generic", external_id=external_id, subject="Down", body=body)
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound).ticket_id


def _due_now(rt: Runtime) -> None:
    # The deferred tickets' messages wait in the outbox; a test need not wait the seconds out.
    with session_scope(rt.sessions) as session:
        session.execute(update(OutboxMessage).values(available_at=utcnow()))


def test_identical_tickets_in_one_batch_make_one_call_and_share_its_label(
    pg_url, clean_redis, fake
):
    truncate(pg_url)
    rt = make_runtime(anthropic_env(pg_url, clean_redis, fake.base_url))
    same = [_post(rt, f"outage-{i}") for i in range(5)]
    other = _post(rt, "other", body="Please change my invoice address. [[intent:billing]]")

    outcomes = classify_tickets_stage(rt, [*same, other])
    assert outcomes == {same[0]: "routed", **{t: "deferred" for t in same[1:]}, other: "routed"}
    assert fake.call_count() == 2
    with rt.sessions() as s:
        assert {s.get(Ticket, t).state for t in same[1:]} == {"queued"}  # type: ignore[union-attr]
        assert {s.get(Ticket, t).attempts for t in same[1:]} == {0}  # type: ignore[union-attr]

    _due_now(rt)
    assert classify_tickets_stage(rt, same[1:]) == {t: "routed" for t in same[1:]}
    assert fake.call_count() == 2
    with rt.sessions() as s:
        labels = s.scalars(
            select(Classification).where(Classification.ticket_id.in_(same[1:]))
        ).all()
        first = s.scalars(select(Classification).where(Classification.ticket_id == same[0])).one()
    assert {label.reused_from_id for label in labels} == {first.id}


def test_if_the_first_call_fails_the_others_call_themselves(pg_url, clean_redis, fake):
    truncate(pg_url)
    rt = make_runtime(anthropic_env(pg_url, clean_redis, fake.base_url))
    first, second = _post(rt, "outage-a"), _post(rt, "outage-b")
    fake.add_fault(Fault("server_error"))
    assert classify_tickets_stage(rt, [first, second]) == {first: "retry", second: "deferred"}
    _due_now(rt)
    # No label to reuse: the deferred ticket makes its own call rather than wait for ever.
    assert classify_tickets_stage(rt, [second]) == {second: "routed"}
    assert fake.call_count() == 2

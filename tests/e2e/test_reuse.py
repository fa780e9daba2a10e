"""An identical ticket seen recently reuses the earlier label: no second paid call."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.fakeanthropic import FakeAnthropic
from tests.support.stack import (
    WorkerProcess,
    anthropic_env,
    make_runtime,
    post_ticket,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Classification, Ticket
from triage.ingest.app import create_app


@pytest.fixture()
def setup(pg_url, clean_redis):
    truncate(pg_url)
    with FakeAnthropic() as fake:
        env = anthropic_env(pg_url, clean_redis, fake.base_url)
        with WorkerProcess(env, concurrency=8) as worker:
            rt = make_runtime(env)
            with TestClient(create_app(rt)) as client:
                yield rt, client, fake, worker


def routed(rt, tid):
    with rt.sessions() as s:
        return s.get(Ticket, tid).state == "routed"


def test_identical_text_from_another_ticket_reuses_the_label_without_a_call(setup):
    rt, client, fake, _ = setup
    body = "I was charged twice for order 5531. [[intent:billing]] [[confidence:0.95]]"
    first = post_ticket(client, ticket_payload("same-1", body=body)).json()["ticket_id"]
    wait_until(lambda: routed(rt, first), 60, what="first ticket routed")
    # Different ticket, same words, different whitespace and signature: same content.
    second_body = body.replace(" ", "  ") + "\n\n-- \nJane Doe\nSent from my phone"
    second = post_ticket(client, ticket_payload("same-2", body=second_body)).json()["ticket_id"]
    wait_until(lambda: routed(rt, second), 60, what="second ticket routed")
    with rt.sessions() as s:
        a = s.scalars(select(Classification).where(Classification.ticket_id == first)).one()
        b = s.scalars(select(Classification).where(Classification.ticket_id == second)).one()
    assert b.reused_from_id == a.id and b.intent == a.intent == "billing"
    assert b.input_tokens == 0 and b.cost_usd == 0 and b.calls == 0
    assert fake.call_count() == 1

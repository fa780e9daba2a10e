"""A database that goes away while the model is answering: the answers were paid for, so the
worker keeps them on the broker until the database is back and records them then. Nothing is
asked twice, and nothing waits for the claim's lease to run out.

The outage is PostgreSQL's own: the test database stops taking connections and its sessions
are terminated, as a failover or a restart would do to them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.fakeanthropic import FakeAnthropic
from tests.support.services import bring_database_back, fresh_database, take_database_away
from tests.support.stack import (
    WorkerProcess,
    anthropic_env,
    make_runtime,
    post_ticket,
    ticket_payload,
    wait_until,
)
from triage.db.models import Attempt, Ticket
from triage.ingest.app import create_app
from triage.reliability.retry import classify_lease_seconds

LATENCY = 2.0
TICKETS = 3


@pytest.fixture()
def own_db() -> Iterator[tuple[str, str]]:
    """A database of this test's own, so taking it away touches nothing else."""
    with fresh_database("triage_outage") as db:
        yield db


def test_answers_that_arrive_during_an_outage_are_recorded_after_it_without_a_second_call(
    own_db: tuple[str, str], clean_redis: str
) -> None:
    url, name = own_db
    with FakeAnthropic(latency=LATENCY) as fake:
        env = anthropic_env(url, clean_redis, fake.base_url)
        rt = make_runtime(env)
        lease = classify_lease_seconds(rt.settings)
        with TestClient(create_app(rt, relay_interval=0.5)) as client:
            ids = [
                post_ticket(
                    client, ticket_payload(f"outage-{i}", body=f"My invoice {i} charged me twice")
                ).json()["ticket_id"]
                for i in range(TICKETS)
            ]
        with WorkerProcess(env, concurrency=10) as worker:
            wait_until(lambda: fake.in_flight() == TICKETS, 30, what="every call in flight")
            take_database_away(name)
            # The answers arrive meanwhile, with no database to record them in.
            wait_until(lambda: fake.in_flight() == 0, 10, what="the answers")
            time.sleep(2)
            bring_database_back(name)
            back = time.monotonic()
            try:
                wait_until(lambda: _terminal(rt, ids) == TICKETS, lease / 2, what="labels recorded")
            except AssertionError:
                raise AssertionError(worker.log()[-6000:]) from None
            recorded_after = time.monotonic() - back
            # A late second call would come with the lease; give nothing a chance to hide it.
            assert fake.call_count() == TICKETS, worker.log()[-6000:]
    with rt.sessions() as s:
        attempts = s.execute(
            select(Attempt.ticket_id, Attempt.outcome, Attempt.api_calls).where(
                Attempt.stage == "classify"
            )
        ).all()
    assert sorted(attempts) == [(i, "ok", 1) for i in sorted(ids)]
    assert recorded_after < lease / 2


def _terminal(rt, ids: list[int]) -> int:
    try:
        with rt.sessions() as s:
            return len(
                s.scalars(
                    select(Ticket.id).where(
                        Ticket.id.in_(ids), Ticket.state.in_(["routed", "needs_review"])
                    )
                ).all()
            )
    except Exception:  # the database may still be coming back
        return -1

"""Webhooks that arrive while the database is down are spooled on the broker and triaged once
it is back: real PostgreSQL (a database of the test's own, closed to connections for the
outage), real Redis, the real API and a real `triage worker`.

The helpdesk was answered 202, so the spool message is the ticket's only copy: it waits for
the database however long that takes, without the bound the other tasks' infrastructure
retries have (the sweeper recovers their tickets from the database; there is none here)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.support.services import bring_database_back, fresh_database, take_database_away
from tests.support.stack import (
    WorkerProcess,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    wait_until,
)
from triage.db.models import Classification, Ticket
from triage.ingest.app import create_app
from triage.ingest.models import InboundTicket
from triage.ingest.spool import SPOOL_TASK, SpooledTicket
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.pipeline.runtime import Runtime
from triage.reliability.retry import INFRASTRUCTURE_RETRIES

FINISHED = ("routed", "needs_review")


@pytest.fixture()
def own_db() -> Iterator[tuple[str, str]]:
    """A database of this test's own, so taking it away touches nothing else."""
    with fresh_database("triage_spool") as db:
        yield db


def _post_spooled(client: TestClient, external_id: str, body: str) -> tuple[datetime, datetime]:
    """Post a ticket while the database is down; when its webhook was sent and answered."""
    sent = datetime.now(UTC)
    resp = post_ticket(client, ticket_payload(external_id, body=body))
    answered = datetime.now(UTC)
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"ticket_id": None, "status": "spooled", "duplicate": False}
    return sent, answered


def _tickets(rt: Runtime) -> list[tuple[str, str, datetime]]:
    try:
        with rt.sessions() as s:
            rows = s.execute(select(Ticket.external_id, Ticket.state, Ticket.received_at)).all()
    except Exception:  # the database may still be coming back
        return []
    return sorted((r.external_id, r.state, r.received_at) for r in rows)


def _all_finished(rt: Runtime, external_ids: set[str]) -> bool:
    tickets = _tickets(rt)
    return {e for e, state, _ in tickets if state in FINISHED} == external_ids


def test_webhooks_spooled_while_the_database_is_down_are_triaged_once_it_is_back(
    own_db: tuple[str, str], clean_redis: str
) -> None:
    url, name = own_db
    env = stack_env(url, clean_redis)
    rt = make_runtime(env)
    arrivals: dict[str, list[datetime]] = {}
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        take_database_away(name)
        try:
            for i, external_id in enumerate(["spool-1", "spool-2", "spool-3"]):
                arrivals[external_id] = [*_post_spooled(client, external_id, f"Invoice {i} twice")]
            # The helpdesk sends one again (its own retry): one ticket all the same.
            arrivals["spool-1"][1] = _post_spooled(client, "spool-1", "Invoice 0 twice")[1]
            # Stored later than it arrived, measurably.
            time.sleep(1.5)
        finally:
            bring_database_back(name)
    back = datetime.now(UTC)
    with WorkerProcess(env, concurrency=4) as worker:
        try:
            wait_until(lambda: _all_finished(rt, set(arrivals)), 60, what="spooled tickets triaged")
        except AssertionError:
            raise AssertionError(worker.log()) from None
    tickets = _tickets(rt)
    assert [e for e, _, _ in tickets] == sorted(arrivals)
    for external_id, _state, received_at in tickets:
        sent, answered = arrivals[external_id]
        # The webhook's arrival, not the time the worker could store it.
        assert sent <= received_at <= answered < back, (external_id, received_at)
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Classification)) == len(arrivals)


def test_a_spooled_ticket_outwaits_the_other_tasks_retry_bound_and_is_stored_once_the_db_is_back(
    own_db: tuple[str, str], clean_redis: str
) -> None:
    url, name = own_db
    env = stack_env(url, clean_redis)
    rt = make_runtime(env)
    with WorkerProcess(env, concurrency=4) as worker:
        take_database_away(name)
        try:
            with TestClient(create_app(rt, relay_interval=3600)) as client:
                sent, answered = _post_spooled(client, "spool-webhook", "Where is my parcel?")
            # A spooled ticket that has already gone back on the broker as often as any other
            # task may: the others are left to the sweeper then, this one has no other copy.
            arrived_at = datetime.now(UTC)
            rt.celery.send_task(
                SPOOL_TASK,
                kwargs=SpooledTicket(
                    ticket=InboundTicket(
                        source="generic",
                        external_id="spool-long-outage",
                        subject="Refund",
                        body="Please refund my order",
                    ),
                    arrived_at=arrived_at,
                ).model_dump(mode="json"),
                queue=CLASSIFY_QUEUE,
                retries=INFRASTRUCTURE_RETRIES,
            )
            past_bound = f"(retry {INFRASTRUCTURE_RETRIES + 2})"
            try:
                # Twice past the bound: it ran again, found the database still down, went back.
                wait_until(
                    lambda: past_bound in worker.full_log(), 45, what="a retry past the bound"
                )
            except AssertionError:
                raise AssertionError(worker.log()) from None
            assert _tickets(rt) == []
        finally:
            bring_database_back(name)
        try:
            wait_until(
                lambda: _all_finished(rt, {"spool-webhook", "spool-long-outage"}),
                60,
                what="spooled tickets stored and triaged",
            )
        except AssertionError:
            raise AssertionError(worker.log()) from None
        log = worker.full_log()
    received = {e: at for e, _, at in _tickets(rt)}
    assert sent <= received["spool-webhook"] <= answered
    assert received["spool-long-outage"] == arrived_at
    retried = re.findall(r"triage\.accept_spooled: database unavailable \((\w+)\)", log)
    assert retried and set(retried) == {"OperationalError"}, log
    # The ticket's text is not in the worker's log.
    assert "parcel" not in log and "refund my order" not in log


def test_a_spooled_ticket_that_no_longer_validates_is_logged_and_rejected_not_dropped_silently(
    own_db: tuple[str, str], clean_redis: str
) -> None:
    url, _name = own_db
    env = stack_env(url, clean_redis)
    rt = make_runtime(env)
    with WorkerProcess(env, concurrency=2) as worker:
        # As a message written by an older triage whose ticket model differed might be.
        rt.celery.send_task(
            SPOOL_TASK,
            kwargs={
                "ticket": {"source": "zendesk", "external_id": "4711", "body": "My card was lost"},
                "arrived_at": datetime.now(UTC).isoformat(),
            },
            queue=CLASSIFY_QUEUE,
        )
        wait_until(lambda: "not stored" in worker.full_log(), 30, what="the ERROR line")
        wait_until(
            lambda: "raised unexpected" in worker.full_log(), 10, what="Celery's failure line"
        )
        log = worker.full_log()
    [line] = [line for line in log.splitlines() if "not stored" in line]
    assert "ERROR" in line and "zendesk ticket '4711'" in line and "ValidationError" in line
    assert "card" not in log
    assert _tickets(rt) == []

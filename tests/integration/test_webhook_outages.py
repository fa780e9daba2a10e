"""What the webhook API answers when the database behind it fails. Unreachable, with the
broker up, the ticket is spooled through the broker and answered 202 "spooled"; with the
broker down too, a problem+json 503 a helpdesk acts on. Real services only: a PostgreSQL or
Redis port nothing listens on is a service that is down, and a database that was never
migrated is an operator's mistake the API must not leak (nor spool)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text

from tests.support.services import PG_ADMIN_URL
from tests.support.stack import (
    make_runtime,
    post_ticket,
    signed_headers,
    stack_env,
    ticket_payload,
    truncate,
)
from triage.embedded import free_port
from triage.ingest.app import create_app
from triage.pipeline.routing import CLASSIFY_QUEUE


def _down_db() -> str:
    return PG_ADMIN_URL.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/test"


def _down_broker() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def spooled_messages(redis_url: str) -> list[tuple[str, dict[str, Any]]]:
    """The task name and kwargs of each message waiting on triage.classify, left in place."""
    messages = []
    for raw in redis.Redis.from_url(redis_url).lrange(CLASSIFY_QUEUE, 0, -1):
        envelope = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        messages.append((envelope["headers"]["task"], kwargs))
    return messages


def problem_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


@pytest.fixture()
def client_of(clean_redis) -> Iterator:
    """A TestClient for a runtime on `database_url`, answering as a served app would: an
    unexpected error becomes a response, not an exception in the test."""
    clients: list[TestClient] = []

    def make(database_url: str, broker_url: str = clean_redis) -> TestClient:
        rt = make_runtime(stack_env(database_url, broker_url))
        client = TestClient(create_app(rt, relay_interval=3600), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture()
def unmigrated_db() -> Iterator[str]:
    name = f"triage_unmigrated_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_database_down_spools_the_ticket_through_the_broker_and_answers_202(
    client_of, clean_redis, caplog
):
    # Helpdesks' retries of a 503 run out before a database restart of a few minutes is over
    # (Freshdesk's after an hour, django-helpdesk's at once): the broker keeps the ticket.
    client = client_of(_down_db())
    answered = counter("triage_webhooks_total", source="generic", status="202")
    spooled = counter("triage_tickets_received_total", source="generic", outcome="spooled")
    before = datetime.now(UTC)
    resp = post_ticket(client, ticket_payload("outage-1", body="My invoice is wrong"))
    after = datetime.now(UTC)
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"ticket_id": None, "status": "spooled", "duplicate": False}
    [(task, kwargs)] = spooled_messages(clean_redis)
    assert task == "triage.accept_spooled"
    assert kwargs["ticket"]["source"] == "generic"
    assert kwargs["ticket"]["external_id"] == "outage-1"
    assert kwargs["ticket"]["body"] == "My invoice is wrong"
    assert kwargs["ticket"]["created_at"] == "2026-11-24T10:00:00Z"
    assert before <= datetime.fromisoformat(kwargs["arrived_at"]) <= after
    # Counted as what the helpdesk was told, and as a ticket received that is not stored yet.
    assert counter("triage_webhooks_total", source="generic", status="202") == answered + 1
    assert (
        counter("triage_tickets_received_total", source="generic", outcome="spooled") == spooled + 1
    )
    [warning] = [r for r in caplog.records if "spooled" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert "invoice" not in caplog.text and "jane" not in caplog.text.lower()


def test_a_bad_signature_is_still_401_and_spools_nothing(client_of, clean_redis):
    client = client_of(_down_db())
    body = json.dumps(ticket_payload("outage-forged")).encode()
    headers = signed_headers(body, "whsec_" + "bm90LXRoZS1yaWdodC1zZWNyZXQtYXQtYWxsLTAx")
    problem_of(client.post("/webhooks/generic", content=body, headers=headers), 401)
    malformed = b'{"external_id": "outage-bad", "body": '
    problem_of(
        client.post("/webhooks/generic", content=malformed, headers=signed_headers(malformed)), 400
    )
    assert spooled_messages(clean_redis) == []


def test_database_and_broker_down_is_503_with_retry_after_so_the_helpdesk_sends_it_again(
    client_of,
):
    # Zendesk resends a webhook answered 503 with a Retry-After under a minute, and never one
    # answered 500: a text/plain 500 here lost every ticket sent during a database restart.
    client = client_of(_down_db(), _down_broker())
    started = time.monotonic()
    resp = post_ticket(client, ticket_payload("outage-1"))
    # One connection attempt to the broker, not kombu's retries with backoff (6 s).
    assert time.monotonic() - started < 4
    body = problem_of(resp, 503)
    assert 0 < int(resp.headers["retry-after"]) < 60
    assert "database" in body["detail"] and "Connection refused" not in resp.text
    problem_of(client.get("/tickets/1"), 503)
    metrics = client.get("/metrics").text
    assert 'triage_webhooks_total{source="generic",status="503"}' in metrics


def test_database_back_after_an_outage_accepts_the_resent_ticket(client_of, pg_url):
    truncate(pg_url)
    problem_of(post_ticket(client_of(_down_db(), _down_broker()), ticket_payload("outage-2")), 503)
    resent = post_ticket(client_of(pg_url), ticket_payload("outage-2"))
    assert resent.status_code == 202 and resent.json()["duplicate"] is False
    with create_engine(pg_url).connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM tickets WHERE external_id = 'outage-2'")
        ).scalar()
    assert stored == 1


def test_an_unexpected_error_is_a_problem_json_500_that_leaks_no_sql(
    client_of, unmigrated_db, clean_redis
):
    # A database without triage's tables (`triage db upgrade` not run) fails every INSERT.
    resp = post_ticket(client_of(unmigrated_db), ticket_payload("unmigrated-1"))
    body = problem_of(resp, 500)
    assert "tickets" not in body["detail"] and "INSERT" not in resp.text
    # Not an outage: nothing is spooled to fail the same way later.
    assert spooled_messages(clean_redis) == []

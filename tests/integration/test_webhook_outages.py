"""What the webhook API answers when the database behind it fails: a problem+json a helpdesk
acts on. Real services only: a PostgreSQL port nothing listens on is a database that is down,
and a database that was never migrated is an operator's mistake the API must not leak."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.support.services import PG_ADMIN_URL
from tests.support.stack import make_runtime, post_ticket, stack_env, ticket_payload, truncate
from triage.embedded import _free_port
from triage.ingest.app import create_app


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

    def make(database_url: str) -> TestClient:
        rt = make_runtime(stack_env(database_url, clean_redis))
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


def test_database_down_is_503_with_retry_after_so_the_helpdesk_sends_it_again(client_of):
    # Zendesk resends a webhook answered 503 with a Retry-After under a minute, and never one
    # answered 500: a text/plain 500 here lost every ticket sent during a database restart.
    down = PG_ADMIN_URL.rsplit("@", 1)[0] + f"@127.0.0.1:{_free_port()}/test"
    client = client_of(down)
    resp = post_ticket(client, ticket_payload("outage-1"))
    body = problem_of(resp, 503)
    assert 0 < int(resp.headers["retry-after"]) < 60
    assert "database" in body["detail"] and "Connection refused" not in resp.text
    problem_of(client.get("/tickets/1"), 503)
    metrics = client.get("/metrics").text
    assert 'triage_webhooks_total{source="generic",status="503"}' in metrics


def test_database_back_after_an_outage_accepts_the_resent_ticket(client_of, pg_url):
    truncate(pg_url)
    down = PG_ADMIN_URL.rsplit("@", 1)[0] + f"@127.0.0.1:{_free_port()}/test"
    problem_of(post_ticket(client_of(down), ticket_payload("outage-2")), 503)
    resent = post_ticket(client_of(pg_url), ticket_payload("outage-2"))
    assert resent.status_code == 202 and resent.json()["duplicate"] is False
    with create_engine(pg_url).connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM tickets WHERE external_id = 'outage-2'")
        ).scalar()
    assert stored == 1


def test_an_unexpected_error_is_a_problem_json_500_that_leaks_no_sql(client_of, unmigrated_db):
    # A database without triage's tables (`triage db upgrade` not run) fails every INSERT.
    resp = post_ticket(client_of(unmigrated_db), ticket_payload("unmigrated-1"))
    body = problem_of(resp, 500)
    assert "tickets" not in body["detail"] and "INSERT" not in resp.text

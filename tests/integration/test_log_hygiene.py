"""What triage writes to its logs at INFO and above must hold no secret and no customer text:
logs are shipped to places with wider access than the database. Real PostgreSQL and Redis;
the database's connections are cut from the server side, as a restart or failover does."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.support.services import PG_ADMIN_URL
from tests.support.stack import make_runtime, served_api, stack_env, truncate
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.app import create_app
from triage.ingest.sources.django_helpdesk import DjangoHelpdeskSource

TOKEN = "dh-log-hygiene-token-5f0c2a"
APP_NAME = "triage-log-hygiene"
BODY = "My card 4000 0000 0000 0002 was declined, call me on my mobile"
EMAIL = "priya.loggable@example.com"


def _ticket(ext: int) -> dict:
    return {
        "ticket": {
            "id": ext,
            "queue": 2,
            "title": "Declined",
            "description": BODY,
            "submitter_email": EMAIL,
            "priority": 2,
            "followup_set": [],
        },
        "queue_slug": "accounts",
    }


@pytest.fixture()
def runtime(pg_url, clean_redis):
    truncate(pg_url)
    # Named, so the test cuts only this runtime's connections.
    url = f"{pg_url}?application_name={APP_NAME}"
    return make_runtime(stack_env(url, clean_redis, TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK=TOKEN))


@pytest.fixture()
def client(runtime):
    with TestClient(create_app(runtime, relay_interval=3600), raise_server_exceptions=False) as c:
        yield c


def _cut_connections() -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"
            ),
            {"n": APP_NAME},
        )
    admin.dispose()


@contextlib.contextmanager
def _database_down(url: str) -> Iterator[None]:
    """The database gone for a moment (a failover): its connections cut, no new ones taken."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        _cut_connections()
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_database_failover_during_a_webhook_logs_no_url_token_ticket_text_or_email(
    client, caplog, pg_url
):
    path = f"/webhooks/django-helpdesk/{TOKEN}"
    post = lambda ext: client.post(  # noqa: E731
        path, content=json.dumps(_ticket(ext)), headers={"content-type": "application/json"}
    )
    assert post(1).status_code == 202
    with _database_down(pg_url), caplog.at_level(logging.INFO):
        resp = post(2)
    # Spooled through the broker (Redis is up); the outage is logged all the same.
    assert resp.status_code == 202 and resp.json()["status"] == "spooled", resp.text
    logged = "\n".join(
        record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        for record in caplog.records
        # The test client's own request log is the test's, not triage's.
        if record.levelno >= logging.INFO and not record.name.startswith("httpx")
    )
    assert "database unavailable" in logged  # the outage itself is logged
    for secret in (TOKEN, BODY, EMAIL):
        assert secret not in logged, f"{secret!r} in the log:\n{logged}"


def test_a_database_error_names_the_statement_but_not_the_ticket_it_was_storing(runtime):
    # Workers log such errors (tasks: "database unavailable (...)") and store them on attempt
    # rows; SQLAlchemy's message carries the statement's parameters unless told not to.
    inbound = DjangoHelpdeskSource().parse(json.dumps(_ticket(7)).encode())
    with pytest.raises(OperationalError) as failed, session_scope(runtime.sessions) as session:
        # Cut while the session holds its connection: the INSERT is what meets the failover.
        session.execute(text("SELECT 1"))
        _cut_connections()
        accept_ticket(session, inbound)
    message = str(failed.value)
    assert "INSERT INTO tickets" in message
    assert BODY not in message and EMAIL not in message


def test_served_api_with_several_processes_logs_no_webhook_url_token(pg_url, clean_redis):
    # `triage serve --workers N` runs uvicorn's process manager, whose access log (INFO) would
    # print each request's path and query: the django-helpdesk secret with every ticket.
    truncate(pg_url)
    env = stack_env(pg_url, clean_redis, TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK=TOKEN)
    with served_api(env, workers=2) as api:
        headers = {"content-type": "application/json"}
        for n, url in enumerate(
            [
                f"{api.url}/webhooks/django-helpdesk/{TOKEN}",
                f"{api.url}/webhooks/django-helpdesk?token={TOKEN}",
            ]
        ):
            resp = httpx.post(url, content=json.dumps(_ticket(100 + n)), headers=headers)
            assert resp.status_code == 202, resp.text
    output = api.output
    assert TOKEN not in output, output

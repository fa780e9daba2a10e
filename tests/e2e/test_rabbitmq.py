"""The same pipeline with RabbitMQ as the broker (TRIAGE_BROKER_URL=amqp://…), on a private
virtual host so concurrent runs on one machine cannot take each other's messages."""

from __future__ import annotations

import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests.support.services import RABBITMQ_URL, require_service
from tests.support.stack import (
    WorkerProcess,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Ticket
from triage.embedded import free_port
from triage.ingest.app import create_app


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture()
def amqp_url():
    require_service("RabbitMQ", RABBITMQ_URL.replace("amqp://", "http://"))
    vhost = f"triage-test-{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", vhost)
    _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    # The vhost is the URL's path without its leading slash ("amqp://h:5672//" is vhost "/").
    parsed = urlsplit(RABBITMQ_URL)
    yield urlunsplit(parsed._replace(path="/" + vhost))
    _ctl("delete_vhost", vhost)


def test_tickets_flow_through_rabbitmq(pg_url, clean_redis, amqp_url):
    truncate(pg_url)
    env = stack_env(pg_url, clean_redis, TRIAGE_BROKER_URL=amqp_url)
    with WorkerProcess(env, concurrency=20):
        rt = make_runtime(env)
        assert rt.celery.conf.broker_url.startswith("amqp://")
        with TestClient(create_app(rt)) as client:
            ids = [
                post_ticket(client, ticket_payload(f"amqp-{i}", body="My parcel is lost")).json()[
                    "ticket_id"
                ]
                for i in range(30)
            ]

        def done() -> bool:
            with rt.sessions() as s:
                return all(s.get(Ticket, i).state in ("routed", "needs_review") for i in ids)

        wait_until(done, 90, what="30 tickets through RabbitMQ", every=0.3)
        with rt.sessions() as s:
            departments = {s.get(Ticket, i).department for i in ids}
        # One text, one label: every copy lands in the same department.
        assert len(departments) == 1 and None not in departments


def test_metrics_read_queue_depths_from_rabbitmq(pg_url, clean_redis, amqp_url):
    # A fresh vhost: only what the API publishes to exists. A passive declare of a queue
    # nobody declared closes its AMQP channel; the other queues must still be read.
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_BROKER_URL=amqp_url))
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        for i in range(3):
            post_ticket(client, ticket_payload(f"amqp-metrics-{i}"))
        rt.stop_batching()
        text = client.get("/metrics").text
    depths = {
        sample.labels["queue"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "triage_queue_messages"
        for sample in family.samples
    }
    assert depths["triage.classify"] >= 1
    assert depths["dept.billing"] == 0 and depths["triage.dead"] == 0


def test_a_webhook_spooled_on_rabbitmq_while_the_database_is_down_is_triaged_once_it_is_back(
    pg_url, clean_redis, amqp_url
):
    # A fresh vhost: the spool's publish must declare triage.classify itself, or RabbitMQ
    # drops the message as unroutable and the ticket answered 202 is lost.
    truncate(pg_url)
    down = pg_url.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/test"
    api_rt = make_runtime(stack_env(down, clean_redis, TRIAGE_BROKER_URL=amqp_url))
    with TestClient(create_app(api_rt, relay_interval=3600)) as client:
        resp = post_ticket(client, ticket_payload("amqp-spooled", body="My parcel is lost"))
    assert resp.json() == {"ticket_id": None, "status": "spooled", "duplicate": False}
    env = stack_env(pg_url, clean_redis, TRIAGE_BROKER_URL=amqp_url)
    rt = make_runtime(env)

    def triaged() -> bool:
        with rt.sessions() as s:
            ticket = s.scalars(select(Ticket).where(Ticket.external_id == "amqp-spooled")).first()
            return ticket is not None and ticket.state in ("routed", "needs_review")

    with WorkerProcess(env, concurrency=4) as worker:
        try:
            wait_until(triaged, 60, what="the spooled ticket triaged", every=0.3)
        except AssertionError:
            raise AssertionError(worker.log()) from None

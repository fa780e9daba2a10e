"""What a support-ops team reads off /metrics and /readyz, against real PostgreSQL and Redis:
tickets received by source and outcome, failures by stage, outcome and error type, the backlog
on each queue and in each unfinished state, the circuit breaker, and what is unreachable."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import PG_ADMIN_URL
from tests.support.stack import (
    anthropic_env,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    truncate,
)
from triage.embedded import free_port
from triage.errors import PermanentError, RateLimited
from triage.ingest.app import create_app
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.relay import CLASSIFY_TASK
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.reliability.guard import StageFailure, handle_failure


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
    }


@pytest.fixture()
def runtime(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(stack_env(pg_url, clean_redis))


@pytest.fixture()
def client(runtime):
    with TestClient(create_app(runtime, relay_interval=3600)) as c:
        yield c


def test_received_tickets_are_counted_by_source_and_outcome(client):
    before = {
        o: counter("triage_tickets_received_total", source="generic", outcome=o)
        for o in ("new", "duplicate")
    }
    post_ticket(client, ticket_payload("m-1"))
    post_ticket(client, ticket_payload("m-1"))
    post_ticket(client, ticket_payload("m-2"))
    assert (
        counter("triage_tickets_received_total", source="generic", outcome="new")
        == before["new"] + 2
    )
    assert (
        counter("triage_tickets_received_total", source="generic", outcome="duplicate")
        == before["duplicate"] + 1
    )


def test_retries_and_dead_letters_are_counted_by_stage_and_error_type(client, runtime):
    ticket_id = post_ticket(client, ticket_payload("m-fail")).json()["ticket_id"]

    def failure(attempt: int) -> StageFailure:
        return StageFailure(
            ticket_id=ticket_id,
            stage="classify",
            attempt=attempt,
            age_seconds=1.0,
            task=CLASSIFY_TASK,
            queue=CLASSIFY_QUEUE,
            args={"ticket_id": ticket_id},
        )

    labels = {"stage": "classify"}
    retried = counter(
        "triage_stage_failures_total", outcome="retry", error_type="RateLimited", **labels
    )
    dead = counter(
        "triage_stage_failures_total", outcome="dead", error_type="PermanentError", **labels
    )
    assert handle_failure(runtime, failure(1), RateLimited("429")) == "retry"
    assert handle_failure(runtime, failure(2), PermanentError("400")) == "dead"
    assert (
        counter("triage_stage_failures_total", outcome="retry", error_type="RateLimited", **labels)
        == retried + 1
    )
    assert (
        counter(
            "triage_stage_failures_total", outcome="dead", error_type="PermanentError", **labels
        )
        == dead + 1
    )


def test_metrics_show_backlog_by_queue_and_tickets_by_unfinished_state(client, runtime):
    for n in range(3):
        post_ticket(client, ticket_payload(f"m-backlog-{n}"))
    runtime.stop_batching()  # what the API has handed over is on the broker now
    seen = scrape(client)
    # Nothing consumes triage.classify in this test: the three tickets wait there, queued.
    assert seen[("triage_queue_messages", (("queue", CLASSIFY_QUEUE),))] >= 1
    assert ("triage_queue_messages", (("queue", "triage.review"),)) in seen
    assert seen[("triage_tickets", (("state", "queued"),))] == 3
    assert seen[("triage_tickets", (("state", "needs_review"),))] == 0
    assert not any(name.startswith("triage_circuit") for name, _ in seen)  # local: no breaker


def test_metrics_show_the_circuit_breaker_open(pg_url, clean_redis):
    truncate(pg_url)
    env = anthropic_env(pg_url, clean_redis, "http://127.0.0.1:9", TRIAGE_CIRCUIT_THRESHOLD="1")
    rt = make_runtime(env)
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        assert scrape(client)[("triage_circuit_open", ())] == 0
        assert rt.admission is not None
        rt.admission.breaker.record_overload(retry_after=60)
        seen = scrape(client)
    assert seen[("triage_circuit_open", ())] == 1
    assert 30 < seen[("triage_circuit_open_seconds", ())] <= 60
    assert seen[("triage_circuit_open_reason", (("reason", "overload"),))] == 1
    assert seen[("triage_circuit_open_reason", (("reason", "api_key_rejected"),))] == 0


def test_metrics_show_the_circuit_open_for_a_rejected_key(pg_url, clean_redis):
    truncate(pg_url)
    env = anthropic_env(pg_url, clean_redis, "http://127.0.0.1:9")
    rt = make_runtime(env)
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        closed = scrape(client)
        assert rt.admission is not None
        rt.admission.breaker.record_key_rejected()
        seen = scrape(client)
    assert closed[("triage_circuit_open_reason", (("reason", "api_key_rejected"),))] == 0
    assert closed[("triage_circuit_open_reason", (("reason", "overload"),))] == 0
    assert seen[("triage_circuit_open", ())] == 1
    assert 290 < seen[("triage_circuit_open_seconds", ())] <= 300  # the auth cool-down's default
    assert seen[("triage_circuit_open_reason", (("reason", "api_key_rejected"),))] == 1
    assert seen[("triage_circuit_open_reason", (("reason", "overload"),))] == 0


def test_labels_are_counted_by_outcome_and_timed_by_backend_and_model(client, runtime):
    # "[[...]]"-free, one-word text: the offline model is unsure of it and sends it to review.
    ticket_id = post_ticket(client, ticket_payload("m-label", subject="x", body="x")).json()[
        "ticket_id"
    ]
    model = runtime.backend.model
    review = counter("triage_tickets_classified_total", outcome="review")
    timed = counter("triage_classify_call_seconds_count", backend="local", model=model)
    assert classify_tickets_stage(runtime, [ticket_id]) == {ticket_id: "review"}
    assert counter("triage_tickets_classified_total", outcome="review") == review + 1
    assert counter("triage_classify_call_seconds_count", backend="local", model=model) == timed + 1


def test_a_scrape_with_the_broker_down_is_quick_and_still_reports_the_database(pg_url, clean_redis):
    # One question per queue, each on a new connection, made a scrape take 2 s per queue
    # (22 s with this taxonomy) when the broker was down: past any scrape timeout, so the
    # ticket gauges were lost with the queue ones.
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, f"redis://127.0.0.1:{free_port()}/0"))
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        started = time.monotonic()
        seen = scrape(client)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert not any(name == "triage_queue_messages" for name, _ in seen)  # unknown, not 0
    assert seen[("triage_tickets", (("state", "queued"),))] == 0


@pytest.mark.parametrize("down", ["database", "broker"])
def test_readyz_is_503_naming_what_is_unreachable_and_healthz_stays_200(pg_url, clean_redis, down):
    port = free_port()  # nothing listens there
    database = (
        PG_ADMIN_URL.rsplit("@", 1)[0] + f"@127.0.0.1:{port}/test" if down == "database" else pg_url
    )
    broker = f"redis://127.0.0.1:{port}/0" if down == "broker" else clean_redis
    rt = make_runtime(stack_env(database, broker))
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        ready = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
    assert ready.status_code == 503
    assert ready.headers["content-type"].startswith("application/problem+json")
    checks = ready.json()["checks"]
    assert checks[down].startswith("error: ")
    assert [v for k, v in checks.items() if k != down] == ["ok"]
    assert str(port) not in ready.text  # names the dependency, not its address


def test_readyz_is_200_when_database_and_broker_answer(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}

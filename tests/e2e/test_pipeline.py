"""The spine end to end: signed webhooks -> PostgreSQL -> Redis -> a real Celery worker
process -> the real SDK against the fake Messages API -> labels -> department queues."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.support.stack import (
    WorkerProcess,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.classify.schema import TicketLabel
from triage.db.models import (
    TERMINAL_STATES,
    Attempt,
    Classification,
    DeadLetter,
    Dispatch,
    Ticket,
)
from triage.ingest.app import create_app
from triage.pipeline.routing import decide_route

TERMINAL = [s.value for s in TERMINAL_STATES]


@pytest.fixture(scope="module")
def fake():
    with FakeAnthropic(latency=(0.01, 0.05)) as server:
        yield server


@pytest.fixture(scope="module")
def env(pg_url, redis_url, fake):
    return stack_env(
        pg_url,
        redis_url,
        TRIAGE_BACKEND="cascade",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=fake.base_url,
        TRIAGE_REUSE_WINDOW_HOURS="0",
    )


@pytest.fixture(scope="module")
def worker(env):
    with WorkerProcess(env, concurrency=100) as w:
        yield w


@pytest.fixture()
def stack(env, worker, fake, pg_url):
    truncate(pg_url)
    fake.clear_faults()
    fake.reset_stats()
    rt = make_runtime(env)
    with TestClient(create_app(rt)) as client:
        yield rt, client


def wait_terminal(rt, ids, worker, timeout=120):
    def done():
        with rt.sessions() as s:
            n = s.scalar(select(func.count()).where(Ticket.id.in_(ids), Ticket.state.in_(TERMINAL)))
        return n == len(ids)

    try:
        wait_until(done, timeout, what=f"{len(ids)} tickets to reach a terminal state")
    except AssertionError:
        print(worker.log())
        raise


INTENTS = ["billing", "refund", "technical", "account", "shipping", "sales", "feedback", "other"]


def test_200_tickets_are_each_routed_to_the_department_their_label_implies(stack, worker, fake):
    rt, client = stack
    rng = random.Random(42)
    ids = []
    for i in range(200):
        intent = rng.choice(INTENTS)
        priority = "urgent" if i % 17 == 0 else "normal"
        confidence = 0.3 if i % 23 == 0 else 0.92
        body = f"Ticket {i} [[intent:{intent}]] [[priority:{priority}]] [[confidence:{confidence}]]"
        resp = post_ticket(client, ticket_payload(f"e2e-{i}", body=body))
        assert resp.status_code == 202
        ids.append(resp.json()["ticket_id"])
    wait_terminal(rt, ids, worker)

    taxonomy = rt.config.taxonomy
    with rt.sessions() as s:
        for tid in ids:
            ticket = s.get(Ticket, tid)
            labels = s.scalars(select(Classification).where(Classification.ticket_id == tid)).all()
            dispatches = s.scalars(select(Dispatch).where(Dispatch.ticket_id == tid)).all()
            assert len(labels) == 1 and len(dispatches) == 1, tid
            row, dispatch = labels[0], dispatches[0]
            label = TicketLabel(
                intent=row.intent,
                department=row.department,
                priority=row.priority,
                language=row.language,
                sentiment=row.sentiment,
                confidence=row.confidence,
                summary=row.summary,
            )
            route = decide_route(taxonomy, label)
            assert dispatch.route == route.queue and ticket.department == route.department
            assert ticket.state == ("needs_review" if route.needs_review else "routed")
            assert dispatch.delivered_at is not None
            assert row.taxonomy_version == taxonomy.version and row.prompt_version.startswith("p-")
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 0
    # Confident tickets cost one call; unsure ones one more for the escalation model.
    unsure = sum(1 for i in range(200) if i % 23 == 0)
    assert fake.call_count() == 200 + unsure


def test_the_worker_logs_no_line_per_message_or_per_request_at_info(stack, worker, fake):
    rt, client = stack
    ids = [
        post_ticket(client, ticket_payload(f"quiet-{i}", body=f"Ticket {i}")).json()["ticket_id"]
        for i in range(5)
    ]
    wait_terminal(rt, ids, worker)
    assert fake.call_count() >= 5
    log = worker.log_path.read_text(errors="replace")
    assert " ready." in log
    # Celery's "Task ... received" / "succeeded in", httpx's and the SDK's "HTTP Request:".
    for line in ("] received", "succeeded in", "HTTP Request:"):
        assert line not in log, line


def test_duplicate_posts_cause_one_classification(stack, worker, fake):
    rt, client = stack
    payloads = [
        ticket_payload(f"dup-{i}", body=f"Refund please {i} [[intent:refund]]") for i in range(20)
    ]
    first = [post_ticket(client, p).json() for p in payloads]
    again = [post_ticket(client, p).json() for p in payloads]
    assert [a["ticket_id"] for a in again] == [f["ticket_id"] for f in first]
    assert all(a["duplicate"] for a in again)
    wait_terminal(rt, [f["ticket_id"] for f in first], worker)
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Classification)) == 20
    assert fake.call_count() == 20


def test_poison_ticket_is_dead_lettered_after_one_call(stack, worker, fake):
    rt, client = stack
    fake.add_fault(Fault("bad_request", times=-1, match="POISON"))
    tid = post_ticket(client, ticket_payload("poison", body="POISON [[intent:sales]]")).json()[
        "ticket_id"
    ]
    wait_terminal(rt, [tid], worker)
    with rt.sessions() as s:
        ticket = s.get(Ticket, tid)
        letter = s.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).one()
        assert ticket.state == "dead_lettered"
        assert letter.stage == "classify" and letter.error_type == "PermanentError"
        assert "400" in letter.message and letter.request_id
        assert letter.payload["args"] == {"ticket_id": tid}
    assert fake.call_count() == 1


def test_ticket_that_fails_once_is_retried_and_routed(stack, worker, fake):
    rt, client = stack
    fake.add_fault(Fault("overloaded", times=1, match="FLAKY"))
    tid = post_ticket(client, ticket_payload("flaky", body="FLAKY [[intent:technical]]")).json()[
        "ticket_id"
    ]
    wait_terminal(rt, [tid], worker)
    with rt.sessions() as s:
        ticket = s.get(Ticket, tid)
        outcomes = s.scalars(
            select(Attempt.outcome)
            .where(Attempt.ticket_id == tid, Attempt.stage == "classify")
            .order_by(Attempt.id)
        ).all()
    assert ticket.state == "routed" and ticket.department == "tech_support"
    assert outcomes == ["retry", "ok"] and ticket.attempts == 2
    assert fake.call_count() == 2


def test_unsure_after_escalation_waits_for_a_person(stack, worker, fake):
    rt, client = stack
    body = "Not sure what I need [[intent:other]] [[confidence:0.2]]"
    tid = post_ticket(client, ticket_payload("unsure", body=body)).json()["ticket_id"]
    wait_terminal(rt, [tid], worker)
    view = client.get(f"/tickets/{tid}").json()
    assert view["state"] == "needs_review" and "below" in view["review_reason"]
    assert view["dispatches"][0]["route"] == "triage.review"
    assert view["labels"]["model"] == "claude-sonnet-5"


def _models_asked(fake, marker):
    return [
        r.body["model"]
        for r in fake.requests
        if r.path == "/v1/messages" and marker in json.dumps(r.body["messages"])
    ]


@pytest.mark.parametrize("kind", ["overloaded", "server_error"])
def test_an_escalation_that_fails_once_is_retried_without_asking_the_cheap_model_again(
    stack, worker, fake, kind
):
    rt, client = stack
    marker = f"ESCALATE-{kind}"
    fake.add_fault(Fault(kind, times=1, match=marker, model="claude-sonnet-5"))
    # The cheap model is unsure of its label; the escalation model is sure of another.
    body = (
        f"{marker} maybe a quote? [[intent:sales]] [[confidence:0.4]] "
        "[[claude-sonnet-5/intent:billing]] [[claude-sonnet-5/confidence:0.95]]"
    )
    tid = post_ticket(client, ticket_payload(marker, body=body)).json()["ticket_id"]
    wait_terminal(rt, [tid], worker)

    assert _models_asked(fake, marker) == ["claude-haiku-4-5", "claude-sonnet-5", "claude-sonnet-5"]
    with rt.sessions() as s:
        ticket = s.get(Ticket, tid)
        label = s.scalars(select(Classification).where(Classification.ticket_id == tid)).one()
        attempts = s.scalars(
            select(Attempt)
            .where(Attempt.ticket_id == tid, Attempt.stage == "classify")
            .order_by(Attempt.id)
        ).all()
    assert ticket.state == "routed" and ticket.department == "billing"
    assert ticket.current_classification_id == label.id
    assert (label.model, label.backend, label.intent) == ("claude-sonnet-5", "cascade", "billing")
    assert label.confidence == 0.95
    failed, ok = attempts
    # Each paid call counted once, on the attempt that made it: the first attempt the cheap
    # call and the failed escalation, the retry only its escalation.
    assert (failed.outcome, failed.api_calls, ok.outcome, ok.api_calls) == ("retry", 2, "ok", 1)
    assert failed.cost_usd > 0 and ok.cost_usd > 0
    # The label's cost is what it cost in total: the cheap answer it was built on, and the
    # escalation's.
    assert label.calls == 2 and label.first_answer_attempt_id == failed.id
    assert label.cost_usd == failed.cost_usd + ok.cost_usd
    assert label.input_tokens == failed.input_tokens + ok.input_tokens

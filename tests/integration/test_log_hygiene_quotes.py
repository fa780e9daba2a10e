"""What the other side says about a ticket stays in the database, out of the logs and off
triage.dead: a model's refusal and a sink's error answer often quote the customer. A real
worker process, the fake Messages API, a real webhook receiver, PostgreSQL and Redis."""

from __future__ import annotations

import base64
import json
import logging

import pytest
import redis
from celery import Celery, states
from celery.app.trace import TraceInfo
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.support.fakehttp import Reply, running_api
from tests.support.stack import (
    SINK_SECRET,
    WorkerProcess,
    anthropic_env,
    config_with_webhook_sink,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Attempt, DeadLetter, Ticket
from triage.errors import PermanentError, loggable_traceback
from triage.ingest.app import create_app
from triage.pipeline.routing import DEAD_QUEUE
from triage.pipeline.worker_logs import content_free_task_failures

# What the customer wrote, as the other side would quote it back.
CUSTOMER = "Ines Quoted-Refund of Elm Row, Lisbon"


def _dead_notices(redis_url: str) -> list[dict]:
    """The triage.dead messages waiting on Redis (nothing consumes them here): their kwargs."""
    notices = []
    for raw in redis.Redis.from_url(redis_url).lrange(DEAD_QUEUE, 0, -1):
        _args, kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        notices.append(kwargs)
    return notices


def _state(rt, ticket_id: int) -> str | None:
    with rt.sessions() as s:
        return s.scalar(select(Ticket.state).where(Ticket.id == ticket_id))


def _assert_kept_in_the_database_only(rt, ticket_id, worker, caplog, redis_url, stage):
    with rt.sessions() as s:
        letter = s.scalars(select(DeadLetter).where(DeadLetter.ticket_id == ticket_id)).one()
        ticket = s.get(Ticket, ticket_id)
        errors = s.scalars(
            select(Attempt.error).where(Attempt.ticket_id == ticket_id, Attempt.stage == stage)
        ).all()
    # The record keeps the whole answer for the operator (`triage dlq show`, `tickets show`).
    assert letter.stage == stage and CUSTOMER in letter.message
    assert ticket.last_error is not None and CUSTOMER in ticket.last_error
    assert any(e and CUSTOMER in e for e in errors)

    worker_log = worker.log_path.read_text(errors="replace")
    assert f"dead-lettered at {stage}" in worker_log  # the failure itself is logged
    assert CUSTOMER not in worker_log, worker_log[-4000:]
    api_log = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert CUSTOMER not in api_log, api_log

    # The notice goes out after the dead letter's commit, from the worker's publishing thread.
    wait_until(
        lambda: any(n["ticket_id"] == ticket_id for n in _dead_notices(redis_url)),
        15,
        what="the triage.dead notice",
    )
    notices = [n for n in _dead_notices(redis_url) if n["ticket_id"] == ticket_id]
    assert len(notices) == 1
    assert notices[0]["dead_letter_id"] == letter.id and notices[0]["message"]
    assert CUSTOMER not in json.dumps(notices[0]), notices[0]


def test_a_refusal_quoting_the_ticket_is_stored_but_neither_logged_nor_on_triage_dead(
    pg_url, clean_redis, caplog
):
    truncate(pg_url)
    with FakeAnthropic() as fake:
        fake.add_fault(Fault("refusal", times=-1))
        env = anthropic_env(pg_url, clean_redis, fake.base_url)
        rt = make_runtime(env)
        with (
            WorkerProcess(env, concurrency=4) as worker,
            TestClient(create_app(rt)) as client,
            caplog.at_level(logging.INFO),
        ):
            payload = ticket_payload("refused-1", body="Please refund me.", subject=CUSTOMER)
            tid = post_ticket(client, payload).json()["ticket_id"]
            wait_until(lambda: _state(rt, tid) == "dead_lettered", 60, what="dead letter")
            _assert_kept_in_the_database_only(rt, tid, worker, caplog, clean_redis, "classify")


@pytest.mark.parametrize(
    "status",
    [
        422,  # refused at once: SinkRejected
        503,  # retried (a WARNING per retry), then dead-lettered
    ],
)
def test_a_sink_error_answer_quoting_the_ticket_is_stored_but_neither_logged_nor_on_triage_dead(
    pg_url, clean_redis, tmp_path, caplog, status
):
    truncate(pg_url)
    with running_api() as receiver:
        receiver.default = Reply(status=status, body={"error": f"comment rejected: {CUSTOMER}"})
        env = stack_env(
            pg_url,
            clean_redis,
            TRIAGE_CONFIG_DIR=str(config_with_webhook_sink(tmp_path, receiver.url)),
            TRIAGE_SINK_SECRET_RECEIVER=SINK_SECRET,
            TRIAGE_DELIVER_MAX_ATTEMPTS="2",
        )
        rt = make_runtime(env)
        with (
            WorkerProcess(env, concurrency=4) as worker,
            TestClient(create_app(rt)) as client,
            caplog.at_level(logging.INFO),
        ):
            payload = ticket_payload(f"sink-{status}", body=f"From {CUSTOMER}: charged twice.")
            tid = post_ticket(client, payload).json()["ticket_id"]
            wait_until(lambda: _state(rt, tid) == "dead_lettered", 60, what="dead letter")
            _assert_kept_in_the_database_only(rt, tid, worker, caplog, clean_redis, "deliver")


def test_celerys_failure_line_names_the_exception_without_its_text(caplog):
    # A task that raises past triage's guard (a bug) is logged by Celery itself, with the
    # exception's repr and a traceback: both would print whatever the exception was handed.
    app = Celery("log-hygiene", set_as_current=False)

    @app.task(name="log_hygiene.fails")
    def fails() -> None:
        try:
            raise ValueError(f"cannot parse {CUSTOMER}")
        except ValueError as exc:
            raise PermanentError("preparing failed", quoted=CUSTOMER) from exc

    content_free_task_failures()
    with caplog.at_level(logging.INFO):
        try:
            fails.run()
        except PermanentError as exc:
            TraceInfo(states.FAILURE, exc).handle_failure(
                fails, fails.request, store_errors=False, call_errbacks=False
            )
    failures = [r for r in caplog.records if r.name == "celery.app.trace"]
    assert failures
    handler = logging.StreamHandler()
    shown = "\n".join(handler.format(r) for r in failures)
    assert "PermanentError" in shown and "preparing failed" in shown and "ValueError" in shown
    assert CUSTOMER not in shown, shown


def test_a_logged_traceback_keeps_its_frames_and_drops_every_exceptions_text():
    try:
        try:
            int(CUSTOMER)  # ValueError: invalid literal for int() with base 10: 'Ines ...'
        except ValueError as exc:
            raise PermanentError("could not prepare the request", quoted=str(exc)) from exc
    except PermanentError as exc:
        shown = loggable_traceback(exc)
    assert "ValueError" in shown and "could not prepare the request" in shown
    assert "test_a_logged_traceback_keeps_its_frames" in shown  # the frames are there
    assert CUSTOMER not in shown

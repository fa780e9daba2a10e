"""A delivery's sink requests do not wait for model calls while their deadline runs.

A worker's deliver task sends a batch's first dispatch on its own thread and the others on
the process's call threads. Those threads were the model calls' too: with every one of them
held by a call (a slow API answers in tens of seconds), the other dispatches waited for a
call to end, their deadline (their sinks' timeouts, counted from the attempt's start) passed
before they were sent, and each was failed as "not sent" and retried, so a slow model API
made healthy sinks' deliveries fail, and in the end dead-letter.

Real PostgreSQL and Redis, the stage run in-process as a worker's task threads run it, and a
real HTTP server as the webhook's receiver.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from tests.support.fakehttp import running_api
from tests.support.stack import (
    SINK_SECRET,
    config_with_webhook_sink,
    in_background,
    make_runtime,
    routed_dispatch,
    stack_env,
    truncate,
)
from triage.db.models import Dispatch
from triage.pipeline.deliver_stage import deliver_many_stage

SINK_TIMEOUT = 1.0
# How long the model calls hold every call thread: well past a delivery's deadline.
CALLS_HOLD = 3.0 * SINK_TIMEOUT


@pytest.fixture()
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink table is read when first used, from this process's environment.
    monkeypatch.setenv("TRIAGE_SINK_SECRET_RECEIVER", SINK_SECRET)


def test_a_delivery_batch_is_not_held_behind_model_calls_past_its_deadline(
    pg_url, clean_redis, tmp_path, hook_secret
):
    truncate(pg_url)
    with running_api() as api:
        config = config_with_webhook_sink(tmp_path, api.url, timeout_seconds=SINK_TIMEOUT)
        rt = make_runtime(
            stack_env(
                pg_url,
                clean_redis,
                TRIAGE_CONFIG_DIR=str(config),
                TRIAGE_WORKER_CONCURRENCY="2",
            )
        )
        dispatch_ids = [
            routed_dispatch(
                rt,
                source="generic",
                external_id=f"t-{n}",
                body=f"I was charged twice for order {n}, please refund me",
            )[1]
            for n in range(3)
        ]
        assert all(rt.sinks_for(d.department) for d in _dispatches(rt, dispatch_ids))

        # Both of the process's call slots taken by model calls that take a while.
        started = threading.Barrier(3)
        release = threading.Event()

        def slow_call() -> None:
            started.wait(5)
            release.wait(CALLS_HOLD)

        calls, _ = in_background(lambda: list(rt.calls.waves([slow_call, slow_call])))
        started.wait(5)
        try:
            began = time.monotonic()
            outcomes = deliver_many_stage(rt, dispatch_ids)
            took = time.monotonic() - began
        finally:
            release.set()
            calls.join(10)

    assert outcomes == {d: "delivered" for d in dispatch_ids}, outcomes
    assert [c for c in api.calls() if c == ("POST", "/hook")] == [("POST", "/hook")] * 3
    # Sent while the calls still held their threads, not after them.
    assert took < CALLS_HOLD, took


def _dispatches(rt, ids: list[int]) -> list[Dispatch]:
    with rt.sessions() as session:
        return list(session.scalars(select(Dispatch).where(Dispatch.id.in_(ids))))

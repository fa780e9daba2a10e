"""A delivery whose every attempt was lost with its worker (killed mid-delivery, each time)
is dead-lettered once it has started more than `TRIAGE_DELIVER_MAX_ATTEMPTS` times, without
another request, as the classify stage does with lost attempts. Before, only a failure that
came back to the guard counted: a delivery that killed its worker was sent again by the
sweeper for ever.

Real PostgreSQL and Redis, a real HTTP receiver for the webhook sink. The lost attempts are
written as a killed worker leaves them: the dispatch's attempt count and a `started` attempt
row past its lease for each.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.support.fakehttp import running_api
from tests.support.stack import (
    SINK_SECRET,
    config_with_webhook_sink,
    make_runtime,
    routed_dispatch,
    stack_env,
    truncate,
)
from triage.db.models import Attempt, DeadLetter, Dispatch, Ticket, utcnow
from triage.db.session import session_scope
from triage.pipeline.deliver_stage import STARTED, deliver_many_stage
from triage.pipeline.runtime import Runtime

MAX_ATTEMPTS = 3


def _routed(rt: Runtime) -> tuple[int, int]:
    return routed_dispatch(rt, source="generic", external_id="lost-1", body="I want a refund")


def _lost_attempts(rt: Runtime, tid: int, dispatch_id: int, count: int) -> None:
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Dispatch).where(Dispatch.id == dispatch_id).values(delivery_attempts=count)
        )
        session.add_all(
            Attempt(ticket_id=tid, stage="deliver", number=n, outcome=STARTED, started_at=long_ago)
            for n in range(1, count + 1)
        )


@pytest.mark.parametrize(
    ("lost", "outcome"), [(MAX_ATTEMPTS, "dead"), (MAX_ATTEMPTS - 1, "delivered")]
)
def test_a_delivery_lost_with_its_worker_every_time_is_dead_lettered_not_sent_again(
    pg_url, clean_redis, tmp_path: Path, monkeypatch, lost, outcome
):
    truncate(pg_url)
    # The sink table is read when first used, from this process's environment.
    monkeypatch.setenv("TRIAGE_SINK_SECRET_RECEIVER", SINK_SECRET)
    with running_api() as receiver:
        rt = make_runtime(
            stack_env(
                pg_url,
                clean_redis,
                TRIAGE_CONFIG_DIR=str(config_with_webhook_sink(tmp_path, receiver.url)),
                TRIAGE_SINK_SECRET_RECEIVER=SINK_SECRET,
                TRIAGE_DELIVER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            )
        )
        tid, dispatch_id = _routed(rt)
        _lost_attempts(rt, tid, dispatch_id, lost)

        assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: outcome}
        sent = len(receiver.requests)
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        letters = session.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).all()
    assert ticket is not None
    if outcome == "dead":
        # No request for a delivery out of attempts; the ticket is visible in `dlq list`.
        assert sent == 0
        assert ticket.state == "dead_lettered"
        assert [(d.stage, d.attempts) for d in letters] == [("deliver", MAX_ATTEMPTS + 1)]
        assert "worker lost" in letters[0].message
    else:
        # The last attempt the bound allows still goes.
        assert sent == 1
        assert ticket.state in ("routed", "needs_review") and letters == []

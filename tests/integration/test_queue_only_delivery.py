"""A delivery to a department without sinks is the queue message itself: consuming it records
the dispatch delivered and a `deliver` attempt, once, for each dispatch of the batch (on
PostgreSQL in one statement, `deliver_stage._record_queue_only`). Real PostgreSQL and SQLite,
the fake Messages API for the classification before it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.support.stack import anthropic_env, empty_database, make_runtime, routed_dispatch
from triage.db.models import Attempt, Dispatch
from triage.pipeline.deliver_stage import deliver_many_stage


@pytest.fixture(params=["postgresql", "sqlite"])
def rt(request, pg_url, clean_redis, fake, tmp_path):
    url = empty_database(request.param, pg_url, tmp_path)
    return make_runtime(anthropic_env(url, clean_redis, fake.base_url))


def _deliveries(rt) -> tuple[dict[int, tuple], list[tuple]]:
    with rt.sessions() as s:
        dispatches = {
            d.id: (d.delivered_at, d.delivery_attempts) for d in s.scalars(select(Dispatch))
        }
        attempts = s.execute(
            select(Attempt.ticket_id, Attempt.number, Attempt.outcome, Attempt.api_calls).where(
                Attempt.stage == "deliver"
            )
        ).all()
    return dispatches, sorted(attempts)


def test_a_batch_of_queue_only_deliveries_is_recorded_once(rt):
    routed = [
        routed_dispatch(rt, source="generic", external_id=f"q-{i}", body=f"Refund for order {i}")
        for i in range(3)
    ]
    tickets = [tid for tid, _ in routed]
    dispatch_ids = [did for _, did in routed]

    assert deliver_many_stage(rt, dispatch_ids) == dict.fromkeys(dispatch_ids, "delivered")
    dispatches, attempts = _deliveries(rt)
    assert all(dispatches[d][0] is not None and dispatches[d][1] == 1 for d in dispatch_ids)
    assert attempts == [(tid, 1, "ok", 0) for tid in sorted(tickets)]

    # The same message again (the broker redelivered it): nothing more is recorded.
    deliver_many_stage(rt, dispatch_ids)
    assert _deliveries(rt) == (dispatches, attempts)

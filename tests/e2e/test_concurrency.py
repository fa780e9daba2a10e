"""One worker process keeps 100+ model calls in flight: the thread pool really overlaps the
waits. This asserts the overlap the fake API observed, not a duration."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.fakeanthropic import FakeAnthropic
from tests.support.stack import (
    WorkerProcess,
    anthropic_env,
    make_runtime,
    post_ticket,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Ticket
from triage.ingest.app import create_app


def test_one_worker_process_holds_over_100_calls_in_flight(pg_url, clean_redis):
    truncate(pg_url)
    with FakeAnthropic(latency=6.0) as fake:
        env = anthropic_env(
            pg_url,
            clean_redis,
            fake.base_url,
            # Far above the fake's latency: a loaded machine must not turn waits into timeouts.
            TRIAGE_API_TIMEOUT_SECONDS="60",
        )
        rt = make_runtime(env)
        # Queue every ticket before the worker starts, so what is measured is the pool's
        # overlap of model calls, not how fast this test can post webhooks.
        with TestClient(create_app(rt)) as client:
            ids = [
                post_ticket(client, ticket_payload(f"c-{i}", body=f"order {i} late")).json()[
                    "ticket_id"
                ]
                for i in range(150)
            ]

        def all_routed() -> bool:
            with rt.sessions() as s:
                return all(s.get(Ticket, i).state == "routed" for i in ids)

        with WorkerProcess(env, concurrency=150) as worker:
            try:
                wait_until(all_routed, 120, what="150 tickets routed", every=0.5)
            except AssertionError:
                with rt.sessions() as s:
                    states = s.execute(
                        select(Ticket.state, func.count()).group_by(Ticket.state)
                    ).all()
                raise AssertionError(f"states {states}; calls {fake.call_count()}") from None
            assert worker.proc.poll() is None
        print(f"peak calls in flight: {fake.peak_in_flight} of 150 queued tickets")
        assert fake.peak_in_flight >= 100, fake.peak_in_flight
        assert fake.call_count() == 150

"""A rejected API key pauses classification fleet-wide instead of dead-lettering every ticket:
a real worker process, the fake Messages API answering 401 for a while, PostgreSQL and Redis.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.integration.test_metrics import scrape
from tests.support.stack import (
    WorkerProcess,
    anthropic_env,
    make_runtime,
    post_ticket,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Attempt, DeadLetter, Ticket
from triage.ingest.app import create_app

TICKETS = 12
# Call slots of the one worker: at most this many calls are in flight when the first 401 comes.
CONCURRENCY = 4
COOLDOWN = 3.0
# In every ticket's subject, to show the ERROR line names the reason, not the ticket.
SUBJECT = "Marisol Keytest order"


def _dead_letters(rt) -> int:
    with rt.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(DeadLetter)) or 0)


def _finished(rt, ids) -> int:
    with rt.sessions() as s:
        return int(
            s.scalar(
                select(func.count()).where(
                    Ticket.id.in_(ids), Ticket.state.in_(("routed", "needs_review"))
                )
            )
            or 0
        )


def test_a_rejected_key_pauses_classification_and_every_ticket_is_routed_once_it_works(
    pg_url, clean_redis
):
    truncate(pg_url)
    with FakeAnthropic(latency=0.2) as fake:
        rejected = fake.add_fault(Fault("auth", times=-1))
        env = anthropic_env(
            pg_url,
            clean_redis,
            fake.base_url,
            TRIAGE_CIRCUIT_AUTH_COOLDOWN_SECONDS=str(COOLDOWN),
            TRIAGE_REUSE_WINDOW_HOURS="0",
        )
        rt = make_runtime(env)
        assert rt.admission is not None
        breaker = rt.admission.breaker
        with TestClient(create_app(rt, relay_interval=3600)) as client:
            # The tickets are waiting when the worker starts: its first wave of calls (one
            # per call slot) is in flight together when the first 401 comes.
            ids = [
                post_ticket(
                    client,
                    ticket_payload(f"key-{i}", subject=SUBJECT, body=f"Where is order {i}?"),
                ).json()["ticket_id"]
                for i in range(TICKETS)
            ]
            with WorkerProcess(env, concurrency=CONCURRENCY) as worker:
                wait_until(
                    lambda: breaker.open_seconds() > 0 or _dead_letters(rt) > 0,
                    30,
                    what="the circuit to open (or a dead letter)",
                    every=0.05,
                )
                assert _dead_letters(rt) == 0, "a rejected key dead-lettered tickets"
                bad_since = time.monotonic()
                seen = scrape(client)
                assert seen[("triage_circuit_open", ())] == 1
                assert seen[("triage_circuit_open_reason", (("reason", "api_key_rejected"),))] == 1
                # The key stays bad past a cool-down: the probe after it meets a 401 and
                # opens the circuit again.
                wait_until(lambda: breaker.open_seconds() == 0, 10, what="cool-down", every=0.05)
                wait_until(lambda: breaker.open_seconds() > 0, 15, what="re-opened", every=0.05)
                assert _dead_letters(rt) == 0 and _finished(rt, ids) == 0
                assert breaker.open_reason() == "api_key_rejected"
                # The key works again: the next probe closes the circuit and every ticket
                # goes through.
                fake.clear_faults()
                bad_for = time.monotonic() - bad_since
                wait_until(lambda: _finished(rt, ids) == TICKETS, 60, what="all tickets done")
                log = worker.log_path.read_text(errors="replace")

        with rt.sessions() as s:
            attempts = s.execute(
                select(Attempt.ticket_id, Attempt.outcome, Attempt.error_type)
                .where(Attempt.stage == "classify")
                .order_by(Attempt.id)
            ).all()
            counted = dict(s.execute(select(Ticket.id, Ticket.attempts)).all())
    assert _dead_letters(rt) == 0
    failed = [a for a in attempts if a.outcome != "ok"]
    assert {(a.outcome, a.error_type) for a in failed} == {("retry", "ApiKeyRejected")}
    # Every 401 answer is one failed attempt; waiting for the circuit spent none.
    assert len(failed) == rejected.injected
    per_ticket = Counter(a.ticket_id for a in failed)
    assert all(counted[t] == per_ticket[t] + 1 for t in ids)
    assert sum(1 for a in attempts if a.outcome == "ok") == TICKETS

    # One ERROR line per opening, however many tickets met the 401 with it: the first wave
    # opened it once; each failed probe opened it once more.
    openings = re.findall(r"ERROR.*API key rejected \(API 401 authentication_error\)", log)
    probes_failed = len(openings) - 1
    assert probes_failed >= 1
    first_wave = len(failed) - probes_failed
    assert 1 <= first_wave <= CONCURRENCY
    # Only probes spent attempts after the first wave: at most one per cool-down.
    assert probes_failed <= bad_for / COOLDOWN + 1
    assert max(per_ticket.values()) <= 1 + probes_failed
    assert SUBJECT not in log and "Where is order" not in log
    assert "(api_key_rejected): pausing triage.classify" in log

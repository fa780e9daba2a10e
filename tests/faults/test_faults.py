"""Issue 5's fault tests: real worker processes, a private Redis and PostgreSQL that get
killed and restarted, and the fake Messages API injecting faults, with a batch of tickets in
flight. After each fault every accepted ticket must be routed, in review or dead-lettered; none
lost, none delivered twice (by dispatch rows and by what the department consumer received),
and the API calls within the retry policy's bound.

Sizes are set for a 2-core CI machine (TRIAGE_FAULT_TICKETS overrides the ticket count): 700
tickets each keeps the suite under its 15 minutes on the slowest such machine seen (at 1,000 the
six scenarios took 400 s of one test process there, and the suite 804-871 s)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import func, select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.faults.harness import (
    Figures,
    assert_nothing_lost_or_doubled,
    audit,
    post_tickets,
    wait_settled,
)
from tests.support.stack import WorkerProcess, wait_until
from triage.db.models import Attempt, DeadLetter, Ticket
from triage.db.session import session_scope
from triage.pipeline.routing import DEAD_QUEUE
from triage.reliability.deadletter import replay

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

TICKETS = int(os.environ.get("TRIAGE_FAULT_TICKETS", "700"))
MAX_ATTEMPTS = 6  # the default classify policy (TRIAGE_CLASSIFY_MAX_ATTEMPTS)
SETTLE_TIMEOUT = 300
INTENTS = ["billing", "refund", "technical", "account", "shipping", "sales", "feedback", "other"]
MARKER = re.compile(r"tk:([A-Za-z0-9-]+)#")


def ticket_bodies(
    prefix: str, n: int, extra: dict[int, str] | None = None
) -> list[tuple[str, str]]:
    """Unique tickets; every tenth unsure enough to go to review."""
    out = []
    for i in range(n):
        confidence = "0.3" if i % 10 == 0 else "0.93"
        body = (
            f"Ticket tk:{prefix}-{i}# about my account [[intent:{INTENTS[i % len(INTENTS)]}]] "
            f"[[confidence:{confidence}]] {(extra or {}).get(i, '')}"
        )
        out.append((f"{prefix}-{i}", body))
    return out


def calls_per_ticket(fake: FakeAnthropic) -> Counter[str]:
    """API calls the fake received, by the ticket marker in the request text."""
    with fake._lock:
        bodies = [r.body for r in fake.requests if r.path == "/v1/messages"]
    counts: Counter[str] = Counter()
    for body in bodies:
        found = MARKER.search(json.dumps(body.get("messages") if isinstance(body, dict) else body))
        if found:
            counts[found.group(1)] += 1
    return counts


@contextlib.contextmanager
def workers(
    env: dict[str, str], n: int = 2, concurrency: int = 50
) -> Iterator[list[WorkerProcess]]:
    started = [WorkerProcess(env, concurrency=concurrency).start() for _ in range(n)]
    try:
        yield started
    finally:
        for w in started:
            w.kill9()


def terminal_count(rt, ids: list[int]) -> int:
    try:
        with rt.sessions() as s:
            return int(
                s.scalar(
                    select(func.count()).where(
                        Ticket.id.in_(ids),
                        Ticket.state.in_(["routed", "needs_review", "dead_lettered"]),
                    )
                )
            )
    except Exception:
        return -1


def settle(rt, receiver, ids, pool: list[WorkerProcess]) -> None:
    try:
        wait_settled(rt, receiver, ids, SETTLE_TIMEOUT)
    except AssertionError:
        for w in pool:
            print(w.log()[-3000:])
        raise
    # A late duplicate (a redelivered message, a second sweep) would arrive after this point.
    time.sleep(6)


def assert_survived(pool: list[WorkerProcess]) -> None:
    """An outage of the broker or the database is something to reconnect through, never a
    reason for a worker to exit."""
    for w in pool:
        log = w.log_path.read_text(errors="replace")
        assert w.proc is not None and w.proc.poll() is None, f"worker exited:\n{w.log()}"
        assert "Unrecoverable error" not in log, log[log.index("Unrecoverable error") :][:6000]


def audited(scenario, rt, receiver, fake: FakeAnthropic, *, sent, ids, started):
    """Count a finished scenario's outcomes and hold every ticket to the policy's call bound.
    Returns the figures and the API calls each ticket cost."""
    fig = audit(
        scenario,
        rt,
        receiver,
        sent=sent,
        ids=ids,
        api_calls=fake.call_count(),
        max_attempts=MAX_ATTEMPTS,
        started=started,
    )
    per_ticket: Counter[str] = calls_per_ticket(fake)
    fig.notes["max_calls_one_ticket"] = max(per_ticket.values(), default=0)
    assert fig.notes["max_calls_one_ticket"] <= MAX_ATTEMPTS, fig.line()
    return fig, per_ticket


@pytest.fixture
def slower_model(fake: FakeAnthropic) -> Iterator[None]:
    """Calls of 0.4-0.8 s instead of 0.05-0.2 s: a run of several seconds between each round's
    progress mark and its end, so that a test process kept off the CPU by its neighbours
    still finds a call in flight to kill a worker under (at 0.05-0.2 s a starved poll once
    saw all 700 tickets finished before its first kill)."""
    before = fake.latency
    fake.latency = (0.4, 0.8)
    try:
        yield
    finally:
        fake.latency = before


@pytest.mark.usefixtures("slower_model")
def test_kill9_workers_mid_classification_repeatedly(stack, fault_env, fake, receiver):
    rt, client = stack
    started = time.monotonic()
    bodies = ticket_bodies("kill", TICKETS)
    ids = post_tickets(client, bodies)
    assert len(ids) == TICKETS
    kills = 0
    with workers(fault_env) as pool:
        for round_ in range(4):
            target = TICKETS * (round_ + 1) // 6
            wait_until(lambda t=target: terminal_count(rt, ids) >= t, 120, what="progress")
            # What is left may all be held by the worker killed last round: no call goes out
            # until its claims' lease (18 s here) is over and they are taken over.
            seen = wait_until(
                lambda: (
                    "calling"
                    if fake.in_flight() > 0
                    else "finished"
                    if terminal_count(rt, ids) == len(ids)
                    else None
                ),
                120,
                what="a call in flight",
            )
            if seen == "finished":
                break  # all done before this round: nothing left to kill a worker in
            victim = pool[round_ % len(pool)]
            victim.kill9()
            kills += 1
            pool[round_ % len(pool)] = WorkerProcess(fault_env, concurrency=50).start()
        settle(rt, receiver, ids, pool)
    fig, _per_ticket = audited(
        "kill -9 worker x4", rt, receiver, fake, sent=len(bodies), ids=ids, started=started
    )
    fig.notes["kills"] = kills
    assert kills >= 2, fig.line()
    assert_nothing_lost_or_doubled(fig, workers_died=True)
    assert fig.dead_lettered == 0, fig.line()


def test_redis_killed_and_restarted_mid_run(stack, fault_env, fake, receiver, private_redis):
    rt, client = stack
    started = time.monotonic()
    first = ticket_bodies("redis-a", TICKETS // 2)
    second = ticket_bodies("redis-b", TICKETS - TICKETS // 2)
    ids = post_tickets(client, first)
    with workers(fault_env) as pool:
        wait_until(lambda: terminal_count(rt, ids) >= len(ids) // 4, 120, what="progress")
        private_redis.stop()
        # Tickets keep arriving while the broker is down: accepted into the outbox.
        late: list[int] = []
        poster = threading.Thread(target=lambda: late.extend(post_tickets(client, second)))
        poster.start()
        time.sleep(5)
        private_redis.start()
        poster.join(timeout=240)
        ids += late
        settle(rt, receiver, ids, pool)
        assert_survived(pool)
    fig, _per_ticket = audited(
        "redis killed + restarted (data lost)",
        rt,
        receiver,
        fake,
        sent=len(first) + len(second),
        ids=ids,
        started=started,
    )
    assert_nothing_lost_or_doubled(fig)
    assert fig.dead_lettered == 0, fig.line()


@pytest.mark.usefixtures("slower_model")
def test_postgres_stopped_and_restarted_mid_run(stack, fault_env, fake, receiver, private_pg):
    rt, client = stack
    started = time.monotonic()
    bodies = ticket_bodies("pg", TICKETS)
    ids = post_tickets(client, bodies)
    with workers(fault_env) as pool:
        wait_until(lambda: terminal_count(rt, ids) >= len(ids) // 4, 120, what="progress")
        private_pg.stop("immediate")
        time.sleep(5)
        private_pg.start()
        settle(rt, receiver, ids, pool)
        assert_survived(pool)
    fig, _per_ticket = audited(
        "postgres stopped + restarted",
        rt,
        receiver,
        fake,
        sent=len(bodies),
        ids=ids,
        started=started,
    )
    assert_nothing_lost_or_doubled(fig, workers_died=True)


TRANSIENT_KINDS = (
    "rate_limit",
    "overloaded",
    "server_error",
    "timeout",
    "drop",
    "truncated",
    "cut_body",
)


def test_ten_percent_transient_api_faults_of_every_kind(stack, fault_env, fake, receiver):
    rt, client = stack
    started = time.monotonic()
    # Seven kinds, each on ~1.5% of calls: about 10% of calls fail.
    each = 1 - 0.9 ** (1 / len(TRANSIENT_KINDS))
    for kind in TRANSIENT_KINDS:
        fake.add_fault(
            Fault(
                kind,
                times=-1,
                probability=each,
                retry_after=1 if kind == "rate_limit" else None,
                delay=4.0,
            )
        )
    bodies = ticket_bodies("flaky-api", TICKETS)
    ids = post_tickets(client, bodies)
    with workers(fault_env) as pool:
        settle(rt, receiver, ids, pool)
    fig, _per_ticket = audited(
        "10% transient API faults (429+retry-after, 529, 500, timeout, drop, truncated, cut body)",
        rt,
        receiver,
        fake,
        sent=len(bodies),
        ids=ids,
        started=started,
    )
    fig.notes["injected"] = {f.kind: f.injected for f in fake.faults.snapshot()}
    assert_nothing_lost_or_doubled(fig)
    assert fig.dead_lettered == 0, fig.line()
    assert sum(fig.notes["injected"].values()) > 0.05 * TICKETS


def test_poison_tickets_dead_letter_after_one_call_and_fail_once_tickets_are_routed(
    stack, fault_env, fake, receiver
):
    rt, client = stack
    started = time.monotonic()
    n = TICKETS
    poison = {i for i in range(n) if i % 20 == 7}
    once = {i for i in range(n) if i % 20 == 11}
    fake.add_fault(Fault("bad_request", times=-1, match="POISON"))
    for i in once:
        fake.add_fault(Fault("server_error", times=1, match=f"tk:mixed-{i}#"))
    extra = {i: "POISON" for i in poison}
    bodies = ticket_bodies("mixed", n, extra)
    ids = post_tickets(client, bodies)
    with workers(fault_env) as pool:
        settle(rt, receiver, ids, pool)
        before = check_poison_and_fail_once(
            rt, client, fake, receiver, ids, bodies, poison, once, started
        )
        replay_the_dead_letters_once_the_api_accepts_them(
            rt, fake, receiver, ids, pool, poison, repeats_before=before.redelivered_same_id
        )


def check_poison_and_fail_once(
    rt, client, fake, receiver, ids, bodies, poison, once, started
) -> Figures:
    n = len(bodies)
    fig, per_ticket = audited(
        "poison (always 400) + fail-once tickets",
        rt,
        receiver,
        fake,
        sent=len(bodies),
        ids=ids,
        started=started,
    )
    fig.notes["poison"] = len(poison)
    fig.notes["fail_once"] = len(once)
    # Each dead letter was announced on triage.dead for whoever watches it.
    fig.notes["triage.dead messages"] = redis.Redis.from_url(rt.settings.redis_url).llen(DEAD_QUEUE)
    assert fig.notes["triage.dead messages"] >= len(poison), fig.line()
    assert_nothing_lost_or_doubled(fig)
    assert fig.dead_lettered == len(poison), fig.line()
    assert all(per_ticket[f"mixed-{i}"] == 1 for i in poison), "poison: exactly one call each"
    assert all(per_ticket[f"mixed-{i}"] == 2 for i in once), "fail-once: two calls each"
    others = set(range(n)) - poison - once
    assert all(per_ticket[f"mixed-{i}"] == 1 for i in others)
    with rt.sessions() as s:
        letters = s.scalars(select(DeadLetter)).all()
        assert {dl.error_type for dl in letters} == {"PermanentError"}
        assert all(dl.attempts == 1 and dl.request_id for dl in letters)
        states = dict(s.execute(select(Ticket.external_id, Ticket.state)).all())
        assert all(states[f"mixed-{i}"] in ("routed", "needs_review") for i in once)
        # Classification retried the fail-once tickets' server errors and nothing else. (A
        # delivery may meet a transient network error too; that retry is the deliver stage's
        # business, and assert_nothing_lost_or_doubled has checked it delivered once.)
        retries = s.execute(
            select(Attempt.ticket_id, Attempt.error).where(
                Attempt.outcome == "retry", Attempt.stage == "classify"
            )
        ).all()
        assert len(retries) == len(once), [r.error for r in retries if "500" not in (r.error or "")]
    return fig


def replay_the_dead_letters_once_the_api_accepts_them(
    rt, fake, receiver, ids, pool, poison, *, repeats_before
):
    fake.clear_faults()
    outbox_ids = []
    with session_scope(rt.sessions) as s:
        for letter_id in s.scalars(select(DeadLetter.id)).all():
            replayed = replay(s, letter_id)
            assert replayed is not None and replayed.stage == "classify"
            outbox_ids.append(replayed.outbox_id)
        # A second replay of the same letter does nothing.
        assert replay(s, letter_id) is None
    rt.publisher.publish(outbox_ids)
    settle(rt, receiver, ids, pool)
    per_ticket = calls_per_ticket(fake)
    with rt.sessions() as s:
        states = dict(s.execute(select(Ticket.external_id, Ticket.state)).all())
        letters = s.scalars(select(DeadLetter)).all()
    assert all(states[f"mixed-{i}"] in ("routed", "needs_review") for i in poison)
    # History kept: the letters stay, marked replayed; one more call per replayed ticket.
    assert len(letters) == len(poison) and all(dl.replayed_at for dl in letters)
    assert all(per_ticket[f"mixed-{i}"] == 2 for i in poison)
    received, _ = receiver.snapshot()
    # Every dispatch arrived, and the replayed ones once: the only repeats are those the first
    # phase already saw and explained (a recorded delivery attempt whose answer was lost, as
    # on a loaded machine).
    assert len(received) == len(ids)
    assert sum(n - 1 for n in received.values()) == repeats_before, received.most_common(3)


# How long the API keeps answering 529 once the circuit has opened. How soon it opens depends
# on how fast the workers turn 529s into retries (about 8 s on a quiet 2-core machine, 10 s on
# a busy one), so the open phase is timed from the opening, which the test reads from the
# breaker itself.
OPEN_FOR = 17
OPENS_WITHIN = 30


def test_sustained_overload_pauses_consumption_instead_of_spending_attempts(
    stack, fault_env, fake, receiver
):
    rt, client = stack
    started = time.monotonic()
    env = {**fault_env, "TRIAGE_CIRCUIT_COOLDOWN_SECONDS": "5"}
    bodies = ticket_bodies("overload", TICKETS)
    # A fifth before the outage and the rest once it has begun, so that there are calls to
    # answer 529 however far the workers got while this process was off the CPU (a starved
    # poll once found every ticket finished before the outage, and no circuit to open).
    ids = post_tickets(client, bodies[: TICKETS // 5])
    with workers(env) as pool:
        wait_until(lambda: terminal_count(rt, ids) >= len(ids) // 2, 120, what="progress")
        # The API answers nothing but 529 until the circuit opens, and for OPEN_FOR s after.
        answered_before = fake.call_count()
        outage = fake.add_fault(Fault("overloaded", times=-1))
        outage_started = time.monotonic()
        ids += post_tickets(client, bodies[TICKETS // 5 :])
        breaker = rt.admission.breaker  # the workers' circuit, in the same Redis
        wait_until(
            lambda: breaker.open_seconds() > 0, OPENS_WITHIN, what="the circuit to open", every=0.05
        )
        while_opening = outage.injected
        opened_after = time.monotonic() - outage_started
        time.sleep(OPEN_FOR)
        fake.clear_faults()
        settle(rt, receiver, ids, pool)
        logs = [w.log_path.read_text(errors="replace") for w in pool]
        paused = sum(log.count("pausing triage.classify") for log in logs)
        resumed = sum(log.count("resuming triage.classify") for log in logs)
    fig, _per_ticket = audited(
        f"API overloaded (100% 529) until {OPEN_FOR} s after the circuit opened",
        rt,
        receiver,
        fake,
        sent=len(bodies),
        ids=ids,
        started=started,
    )
    open_phase = outage.injected - while_opening
    fig.notes.update(
        overloaded_answers=outage.injected,
        answered_before=answered_before,
        opened_after_s=round(opened_after, 1),
        while_opening=while_opening,
        once_open=open_phase,
        paused=paused,
        resumed=resumed,
    )
    assert_nothing_lost_or_doubled(fig)
    assert fig.dead_lettered == 0, fig.line()
    assert paused >= 1 and resumed >= 1, fig.line()
    # The breaker opens once overloads are half of the window's answers: about as many 529s
    # as answers before the outage, plus the calls already out. Without it every waiting
    # ticket would call about every second for 25 s (some 20,000 calls).
    assert while_opening < answered_before + len(ids) // 2, fig.line()
    # Once open, only half-open probes go out: one per probe interval (2 s) for everyone,
    # and the calls of batches admitted just before a probe failed.
    assert open_phase < OPEN_FOR / 2 + 40, fig.line()

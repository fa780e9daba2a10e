"""Batched messages against the real PostgreSQL, Redis, a real worker process and the SDK on
the fake Messages API: rows published together share a task message, and each ticket of a
batch still gets exactly its own outcome."""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import func, select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.support.stack import (
    WorkerProcess,
    make_runtime,
    queued_ids,
    stack_env,
    truncate,
    wait_until,
)
from triage.db.models import Attempt, Classification, DeadLetter, Dispatch, Ticket
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.relay import enqueue, enqueue_delivery
from triage.pipeline.routing import CLASSIFY_QUEUE


@pytest.fixture(scope="module")
def fake():
    with FakeAnthropic(latency=0.05) as server:
        yield server


@pytest.fixture()
def env(pg_url, clean_redis, fake):
    truncate(pg_url)
    fake.clear_faults()
    fake.reset_stats()
    return stack_env(
        pg_url,
        clean_redis,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=fake.base_url,
        TRIAGE_REUSE_WINDOW_HOURS="0",
        TRIAGE_BATCH_SIZE="8",
    )


def _store(rt, n, text=lambda i: f"Ticket {i} [[intent:billing]]", prefix="b"):
    ids, outbox = [], []
    with session_scope(rt.sessions) as session:
        for i in range(n):
            accepted = accept_ticket(
                session,
                InboundTicket(
                    source="generic", external_id=f"{prefix}-{i}", subject="s", body=text(i)
                ),
            )
            ids.append(accepted.ticket_id)
            outbox.append(accepted.outbox_id)
    return ids, outbox


def test_rows_published_together_share_messages_up_to_the_batch_size(env, clean_redis):
    rt = make_runtime(env)
    ids, outbox = _store(rt, 11)
    assert rt.publisher.publish(outbox) == 11
    # 11 tickets, batches of 8: two messages, every ticket in exactly one of them.
    assert sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == sorted(ids)
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).where(Ticket.state == "queued")) == 11
    assert redis.Redis.from_url(clean_redis).llen(CLASSIFY_QUEUE) == 2


def test_delayed_and_other_queue_rows_keep_their_own_messages(env, clean_redis):
    rt = make_runtime(env)
    ids, _ = _store(rt, 3)
    with session_scope(rt.sessions) as session:
        delayed = enqueue(
            session,
            ticket_id=ids[0],
            task="triage.classify_ticket",
            queue=CLASSIFY_QUEUE,
            args={"ticket_id": ids[0]},
            countdown=5,
        )
        a = enqueue_delivery(session, ticket_id=ids[1], dispatch_id=901, route="dept.billing")
        b = enqueue_delivery(session, ticket_id=ids[2], dispatch_id=902, route="dept.billing")
        c = enqueue_delivery(session, ticket_id=ids[2], dispatch_id=903, route="dept.sales")
        rows = [delayed, a, b, c]
    assert rt.publisher.publish(rows) == 4
    broker = redis.Redis.from_url(clean_redis)
    assert broker.llen(CLASSIFY_QUEUE) == 1  # the delayed one, alone
    assert broker.llen("dept.billing") == 1 and sorted(queued_ids(clean_redis, "dept.billing")) == [
        901,
        902,
    ]
    assert queued_ids(clean_redis, "dept.sales") == [903]


def test_one_batch_message_gives_each_ticket_its_own_outcome(env, clean_redis, fake):
    rt = make_runtime(env)
    marks = {3: "POISON", 5: "FLAKY"}

    def text(i):
        return f"{marks.get(i, 'Ticket')} {i} [[intent:{'technical' if i % 2 else 'billing'}]]"

    fake.add_fault(Fault("bad_request", times=-1, match="POISON"))
    fake.add_fault(Fault("overloaded", times=1, match="FLAKY"))
    ids, outbox = _store(rt, 8, text)
    rt.publisher.publish(outbox)
    assert sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == sorted(ids)
    poison, flaky = ids[3], ids[5]
    with WorkerProcess(env, concurrency=16) as worker:

        def finished():
            with rt.sessions() as s:
                routed = s.scalar(
                    select(func.count()).where(Ticket.id.in_(ids), Ticket.state == "routed")
                )
                delivered = s.scalar(select(func.count()).where(Dispatch.delivered_at.is_not(None)))
                dead = s.scalar(select(func.count()).where(Ticket.state == "dead_lettered"))
            return routed == 7 and delivered == 7 and dead == 1

        try:
            wait_until(finished, 60, what="7 routed and delivered, 1 dead-lettered")
        except AssertionError:
            print(worker.log())
            raise
    with rt.sessions() as s:
        tickets = {t.id: t for t in s.scalars(select(Ticket).where(Ticket.id.in_(ids)))}
        assert tickets[poison].state == "dead_lettered"
        letter = s.scalars(select(DeadLetter).where(DeadLetter.ticket_id == poison)).one()
        assert letter.stage == "classify" and letter.payload["args"] == {"ticket_id": poison}
        # One label per routed ticket, none for the poison one; departments follow the label.
        labels = s.scalars(select(Classification).where(Classification.ticket_id.in_(ids))).all()
        assert sorted(c.ticket_id for c in labels) == sorted(set(ids) - {poison})
        for i, ticket_id in enumerate(ids):
            if ticket_id != poison:
                expected = "tech_support" if i % 2 else "billing"
                assert tickets[ticket_id].department == expected
        flaky_outcomes = s.scalars(
            select(Attempt.outcome)
            .where(Attempt.ticket_id == flaky, Attempt.stage == "classify")
            .order_by(Attempt.id)
        ).all()
        assert flaky_outcomes == ["retry", "ok"]
        delivered = s.scalars(
            select(Attempt.ticket_id).where(Attempt.stage == "deliver", Attempt.outcome == "ok")
        ).all()
        assert sorted(delivered) == sorted(set(ids) - {poison})
    # 6 plain calls, the poison once, the flaky twice.
    assert fake.call_count() == 9


def _queued(rt, redis_url: str, n: int, prefix: str, *, messages: int):
    """`n` stored tickets published in the runtime's batch size: their ids and the broker."""
    ids, outbox = _store(rt, n, prefix=prefix)
    rt.publisher.publish(outbox)
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(CLASSIFY_QUEUE) == messages
    return ids, broker


def _routed(rt, ids: list[int]) -> int:
    with rt.sessions() as s:
        return s.scalar(select(func.count()).where(Ticket.id.in_(ids), Ticket.state == "routed"))


def test_a_worker_holds_no_more_tickets_than_it_has_call_slots(env, clean_redis, fake):
    """Ten 4-ticket messages and a worker with 4 call slots: it takes one message (and at
    most one more that a fetch already had on its way) and leaves the rest on the broker,
    where a second worker finds them, instead of hoarding batches it cannot run."""
    env = {**env, "TRIAGE_BATCH_SIZE": "4"}
    rt = make_runtime(env)
    # Enough work that the first worker alone needs ~16 s for what it leaves behind: a second
    # worker that starts slowly on a loaded machine still finds messages to take.
    ids, broker = _queued(rt, clean_redis, 40, "b", messages=10)
    fake.latency = 2.0
    try:
        with WorkerProcess(env, concurrency=4) as first:
            wait_until(lambda: fake.in_flight() == 4, 30, what="4 calls in flight")
            # Long enough for a hoarding consumer to fill its prefetch (4 messages).
            time.sleep(0.5)
            assert broker.llen(CLASSIFY_QUEUE) >= 8, first.log()
            with WorkerProcess(env, concurrency=4):
                # The fake's high-water mark, not a sample: 8 at once needs both workers.
                wait_until(lambda: fake.peak_in_flight >= 8, 30, what="both workers calling")
                wait_until(lambda: _routed(rt, ids) == 40, 60, what="40 routed")
    finally:
        fake.latency = 0.05
    # Neither worker ran more calls than its 4 slots.
    assert fake.peak_in_flight == 8
    assert fake.call_count() == 40


def test_a_slow_call_does_not_keep_its_batch_mates_slots(env, clean_redis, fake):
    """Two call slots; message A carries a slow ticket and a fast one, message B one more.
    The fast call's slot is free again once it has answered, so B is taken and routed while
    A's slow call is still out, instead of waiting for the whole of A."""
    env = {**env, "TRIAGE_BATCH_SIZE": "2"}
    rt = make_runtime(env)
    fake.add_fault(Fault("timeout", times=-1, match="SLOWPOKE", delay=3.0))
    (slow, fast), outbox_a = _store(
        rt, 2, lambda i: f"{'SLOWPOKE' if i == 0 else 'Fast'} {i} [[intent:billing]]", "a"
    )
    (later,), outbox_b = _store(rt, 1, prefix="later")
    rt.publisher.publish(outbox_a)
    rt.publisher.publish(outbox_b)
    assert redis.Redis.from_url(clean_redis).llen(CLASSIFY_QUEUE) == 2

    def states() -> dict[int, str]:
        with rt.sessions() as s:
            rows = s.execute(
                select(Ticket.id, Ticket.state).where(Ticket.id.in_([slow, fast, later]))
            )
            return {row.id: row.state for row in rows}

    with WorkerProcess(env, concurrency=2) as worker:
        # B's ticket may be routed a moment before A's fast one: A's batch waits a few ms for
        # answers arriving with its first, and B's call starts as soon as the fast one's ends.
        wait_until(
            lambda: states()[later] == states()[fast] == "routed", 30, what="B and A's fast routed"
        )
        assert states()[slow] == "classifying", worker.log()
        wait_until(lambda: states()[slow] == "routed", 30, what="the slow one routed")
    assert fake.call_count() == 3


def test_the_rest_of_a_batch_does_not_wait_behind_a_slow_call(env, clean_redis, fake):
    """One 4-ticket message, two call slots, the first ticket slow. The batch goes in parts:
    the fast tickets behind the slow one start as slots come back and are routed while the
    slow call is still out, instead of waiting for the part it started in."""
    env = {**env, "TRIAGE_BATCH_SIZE": "4"}
    rt = make_runtime(env)
    fake.add_fault(Fault("timeout", times=-1, match="SLOWPOKE", delay=3.0))
    ids, outbox = _store(
        rt, 4, lambda i: f"{'SLOWPOKE' if i == 0 else 'Fast'} {i} [[intent:billing]]", "parts"
    )
    rt.publisher.publish(outbox)
    assert redis.Redis.from_url(clean_redis).llen(CLASSIFY_QUEUE) == 1
    slow, rest = ids[0], ids[1:]

    def states() -> dict[int, str]:
        with rt.sessions() as s:
            rows = s.execute(select(Ticket.id, Ticket.state).where(Ticket.id.in_(ids)))
            return {row.id: row.state for row in rows}

    with WorkerProcess(env, concurrency=2) as worker:
        wait_until(lambda: all(states()[i] == "routed" for i in rest), 30, what="3 fast routed")
        assert states()[slow] == "classifying", worker.log()
        wait_until(lambda: states()[slow] == "routed", 30, what="the slow one routed")
    assert fake.call_count() == 4


def test_a_busy_worker_holds_one_message_in_reserve_and_no_more(env, clean_redis, fake):
    """Four 8-ticket messages and a worker with 4 call slots (a reserve of 1 ticket). The
    first message runs in two parts; when the first part's calls answer, the freed slots go
    to the second part, and the worker takes one message more, to have work in hand when
    those slots free again, but not the other two: they stay on the broker for any worker
    with slots to spare, instead of queueing behind this one's."""
    env = {**env, "TRIAGE_BATCH_SIZE": "8"}
    rt = make_runtime(env)
    ids, broker = _queued(rt, clean_redis, 32, "ahead", messages=4)
    fake.latency = 1.5
    try:
        with WorkerProcess(env, concurrency=4) as worker:
            wait_until(lambda: fake.call_count() == 4, 30, what="the first part's 4 calls")
            # While the first part runs, the other half of its message is all it holds.
            assert broker.llen(CLASSIFY_QUEUE) == 3, worker.log()
            # Taken while the second part's calls are still out: ahead of need, not after.
            wait_until(
                lambda: (
                    fake.call_count() == 8
                    and fake.in_flight() == 4
                    and broker.llen(CLASSIFY_QUEUE) == 2
                ),
                30,
                what="one message taken ahead while the second part's 4 calls run",
            )
            # Holding 8 tickets ahead of no free slot, it takes nothing more.
            time.sleep(1.0)
            assert broker.llen(CLASSIFY_QUEUE) == 2, worker.log()
            wait_until(lambda: _routed(rt, ids) == 32, 60, what="32 routed")
    finally:
        fake.latency = 0.05
    assert fake.call_count() == 32

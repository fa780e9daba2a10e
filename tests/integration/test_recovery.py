"""Recovery pieces against the real PostgreSQL and Redis: long retry delays wait in the outbox,
and the sweeper tells a backlog from lost messages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from tests.support.stack import make_runtime, queued_ids, stack_env, truncate, wait_until
from triage.db.models import DeadLetter, Dispatch, OutboxMessage, Ticket, utcnow
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.publishing import PublishBatcher
from triage.pipeline.relay import CLASSIFY_TASK, Publisher, classify_values, enqueue
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.reliability.deadletter import dead_letter, replay
from triage.reliability.sweeper import sweep_once


def _tickets(rt, n, state="queued", age=600.0):
    old = utcnow() - timedelta(seconds=age)
    with session_scope(rt.sessions) as s:
        rows = [
            Ticket(
                source="generic",
                external_id=f"rec-{i}",
                subject="s",
                body="b",
                clean_text="b",
                content_hash=f"h{i}",
                state=state,
                state_changed_at=old,
                received_at=old,
            )
            for i in range(n)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def test_a_long_retry_delay_waits_in_the_outbox_not_on_the_broker(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    sent = []
    publisher = Publisher(rt.sessions, lambda task, **kw: sent.append((task, kw)))
    (tid,) = _tickets(rt, 1)
    with session_scope(rt.sessions) as s:
        msg_id = enqueue(
            s, ticket_id=tid, task=CLASSIFY_TASK, queue=CLASSIFY_QUEUE, args={}, countdown=120
        )
    assert publisher.publish([msg_id]) == 0
    assert publisher.relay_pending(older_than=0) == 0 and sent == []
    with session_scope(rt.sessions) as s:
        s.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == msg_id)
            .values(
                available_at=utcnow() - timedelta(seconds=1),
                created_at=utcnow() - timedelta(seconds=121),
            )
        )
    assert publisher.relay_pending(older_than=0) == 1
    assert sent[0][1]["countdown"] is None  # due now: no countdown left for the broker to hold


def test_sweeper_leaves_a_backlog_alone_and_re_enqueues_what_the_broker_lost(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_STUCK_AFTER_SECONDS="60"))
    ids = _tickets(rt, 5)
    broker = redis.Redis.from_url(clean_redis)
    # A backlog at least as deep as the waiting tickets may still hold their messages.
    broker.rpush(CLASSIFY_QUEUE, *[b"{}"] * 5)
    assert sweep_once(rt).requeued_tickets == 0
    # Drained below them: they cannot all be there, so they are sent again, once.
    broker.delete(CLASSIFY_QUEUE)
    assert sweep_once(rt).requeued_tickets == 5
    assert sweep_once(rt).requeued_tickets == 0
    # Sent together, they share one message.
    assert broker.llen(CLASSIFY_QUEUE) == 1
    assert sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == sorted(ids)


def test_several_sweepers_at_once_re_enqueue_each_stuck_ticket_once(pg_url, clean_redis):
    truncate(pg_url)
    env = stack_env(pg_url, clean_redis, TRIAGE_STUCK_AFTER_SECONDS="60")
    sweepers = [make_runtime(env) for _ in range(4)]
    ids = _tickets(sweepers[0], 40)
    with ThreadPoolExecutor(len(sweepers)) as pool:
        reports = list(pool.map(sweep_once, sweepers))
    assert sum(r.requeued_tickets for r in reports) == 40
    assert sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == sorted(set(ids))


def test_rows_claimed_as_written_are_sent_by_their_writer_or_after_the_lease_by_the_relay(
    pg_url, clean_redis
):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    sent = []
    publisher = Publisher(rt.sessions, lambda task, **kw: sent.append(kw["kwargs"]))
    first, second = _tickets(rt, 2)
    with session_scope(rt.sessions) as s:
        rows = publisher.write(s, [classify_values(first), classify_values(second)])
    assert [r.ticket_id for r in rows] == [first, second]
    # Claimed: the relay leaves them to the writer, however old they are.
    assert publisher.relay_pending(older_than=0) == 0 and sent == []
    assert publisher.publish_written(rows[:1]) == 1
    assert sent == [{"ticket_id": first}]
    # The writer died before sending the second: once the lease is over it is the relay's.
    with session_scope(rt.sessions) as s:
        s.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == rows[1].id)
            .values(available_at=utcnow() - timedelta(seconds=1))
        )
    assert publisher.relay_pending(older_than=0) == 1
    assert sent == [{"ticket_id": first}, {"ticket_id": second}]
    with rt.sessions() as s:
        marked = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [m.sent_at is not None for m in marked] == [True, True]
    assert [m.publish_attempts for m in marked] == [1, 2]


def test_a_row_due_later_cannot_be_claimed_as_it_is_written(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    (tid,) = _tickets(rt, 1)
    with session_scope(rt.sessions) as s, pytest.raises(ValueError, match="due later"):
        rt.publisher.write(s, [classify_values(tid, countdown=600)])


def test_the_publishing_thread_sends_at_once_and_marks_sent_a_moment_later(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    ids = _tickets(rt, 3, state="received", age=0.0)
    batcher = PublishBatcher(rt.publisher)
    batcher.start()
    try:
        with session_scope(rt.sessions) as s:
            rows = rt.publisher.write(s, [classify_values(i) for i in ids])
        batcher.submit(rows)
        wait_until(lambda: sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == ids, 10)
        # On the broker, not yet marked: the claim's lease keeps the relay off them meanwhile.
        assert rt.publisher.relay_pending(older_than=0) == 0

        def marked() -> bool:
            with rt.sessions() as s:
                sent = s.scalars(select(OutboxMessage.sent_at)).all()
            return len(sent) == 3 and all(at is not None for at in sent)

        wait_until(marked, 10, what="the rows marked sent")
    finally:
        batcher.stop()
    with rt.sessions() as s:
        assert set(s.scalars(select(Ticket.state))) == {"queued"}
    # Sent once: nothing more reached the broker.
    assert sorted(queued_ids(clean_redis, CLASSIFY_QUEUE)) == ids


def test_an_error_quoting_a_nul_from_a_remote_service_is_still_recorded(pg_url, clean_redis):
    # A sink's error text quotes the body it answered; PostgreSQL text refuses NUL, which
    # would have failed the dead letter's transaction and left the ticket where it was.
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    (tid,) = _tickets(rt, 1, state="routed")
    error = PermanentError("zendesk write-back: PUT /api answered 400: bad\x00body")
    with session_scope(rt.sessions) as s:
        recorded = dead_letter(
            s, ticket_id=tid, stage="deliver", error=error, attempts=1, payload={"t": tid}
        )
        assert recorded is not None
    with rt.sessions() as s:
        letter = s.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).one()
        assert letter.message.endswith("400: bad\ufffdbody")
        assert s.get(Ticket, tid).state == "dead_lettered"


def _states(rt):
    with rt.sessions() as s:
        return dict(s.execute(select(Ticket.id, Ticket.state)).all())


def test_sweeper_dead_letters_a_dispatch_to_a_department_no_longer_configured(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_STUCK_AFTER_SECONDS="60"))
    kept, retired, added = _tickets(rt, 3, state="routed")
    old = utcnow() - timedelta(seconds=600)
    older = utcnow() - timedelta(hours=2)
    with session_scope(rt.sessions) as s:
        s.add_all(
            [
                # A department the taxonomy still has: its queue is consumed, left alone.
                Dispatch(
                    ticket_id=kept, route="dept.billing", department="billing", created_at=old
                ),
                # One since removed from the taxonomy: nothing consumes dept.retired.
                Dispatch(
                    ticket_id=retired,
                    route="dept.retired",
                    department="retired",
                    created_at=older,
                ),
                # One this sweeper's config does not know yet, mid-deploy: workers on the new
                # config consume dept.added. Ten minutes undelivered is a backlog, not a loss.
                Dispatch(ticket_id=added, route="dept.added", department="added", created_at=old),
            ]
        )
    redis.Redis.from_url(clean_redis).rpush("dept.billing", *[b"{}"] * 5)
    dead = {"stage": "classify", "outcome": "dead", "error_type": "PermanentError"}
    lettered = REGISTRY.get_sample_value("triage_stage_failures_total", dead) or 0.0
    report = sweep_once(rt)
    assert (report.stranded_deliveries, report.requeued_deliveries) == (1, 0)
    # Counted with the other dead letters, so an alert on them sees it.
    assert REGISTRY.get_sample_value("triage_stage_failures_total", dead) == lettered + 1
    with rt.sessions() as s:
        states = dict(s.execute(select(Ticket.id, Ticket.state)).all())
        (letter,) = s.scalars(select(DeadLetter)).all()
    assert states == {kept: "routed", retired: "dead_lettered", added: "routed"}
    assert letter.ticket_id == retired and letter.stage == "classify"
    assert "dept.retired" in letter.message
    # Visible once, not again on the next pass.
    assert sweep_once(rt).stranded_deliveries == 0
    # Replaying classifies it again, under the taxonomy as it is now.
    with session_scope(rt.sessions) as s:
        assert replay(s, letter.id) is not None
    # ("review" here: the offline backend is not sure of a one-letter ticket.)
    assert classify_tickets_stage(rt, [retired]) == {retired: "review"}
    with rt.sessions() as s:
        routes = s.scalars(
            select(Dispatch.route).where(Dispatch.ticket_id == retired).order_by(Dispatch.id)
        ).all()
    assert routes == ["dept.retired", "triage.review"]
    # The replay made a new generation: the stranded dispatch is history, not stranded again.
    assert sweep_once(rt).stranded_deliveries == 0
    assert _states(rt)[retired] == "needs_review"

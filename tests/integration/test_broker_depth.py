"""Queue depth from the real Redis broker, as the publishing thread's backlog check asks it."""

from __future__ import annotations

from tests.support.stack import make_runtime, stack_env, truncate
from triage.pipeline import redis_transport
from triage.pipeline.broker import QueueDepth, queue_depth
from triage.pipeline.publishing import Backlog
from triage.pipeline.routing import CLASSIFY_QUEUE


def test_depth_counts_waiting_messages_and_an_empty_queue_is_zero(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    depth = QueueDepth(rt.celery, CLASSIFY_QUEUE)
    # On Redis an empty queue is no key at all: zero, asked again and again.
    assert [depth(), depth()] == [0, 0]
    backlog = Backlog(depth, threshold=3, interval=0)
    assert backlog() is False
    for i in range(3):
        rt.celery.send_task("triage.classify_ticket", kwargs={"ticket_id": i}, queue=CLASSIFY_QUEUE)
    assert depth() == 3 and queue_depth(rt.celery, CLASSIFY_QUEUE) == 3
    assert backlog() is True
    depth.close()


def test_an_unreachable_broker_has_no_depth(pg_url):
    rt = make_runtime(stack_env(pg_url, "redis://127.0.0.1:1/0"))
    depth = QueueDepth(rt.celery, CLASSIFY_QUEUE)
    assert depth() is None
    assert Backlog(depth, interval=0)() is False


def test_the_redis_channel_reuses_one_client_until_its_pool_is_replaced(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    with rt.celery.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, redis_transport.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            first.rpush("triage-test-list", b"x")
            assert second.llen("triage-test-list") == 1
        # kombu drops the pool after a connection error; the next command gets a new client.
        channel._pool = None
        with channel.conn_or_acquire() as third:
            assert third is not first and third.llen("triage-test-list") == 1
        # Publishing and reading back go through it.
        rt.celery.send_task("triage.classify_ticket", kwargs={"ticket_id": 1}, queue=CLASSIFY_QUEUE)
        assert queue_depth(rt.celery, CLASSIFY_QUEUE) == 1


def test_a_channel_detached_from_its_connection_still_closes_and_restores_unacked(
    pg_url, clean_redis
):
    """When the consumer loses the broker, kombu can detach the transport from its connection
    before the channel is closed; closing then rebuilds the pool to put unacked messages back.
    That raised AttributeError, which Celery treats as unrecoverable: the worker shut down."""
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis))
    rt.celery.send_task("triage.classify_ticket", kwargs={"ticket_id": 1}, queue=CLASSIFY_QUEUE)
    with rt.celery.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get(CLASSIFY_QUEUE, no_ack=False)
        assert message is not None and queue_depth(rt.celery, CLASSIFY_QUEUE) == 0
        # What kombu's Connection.collect() does before the consumer closes the connection.
        channel.connection.client = None
        channel.close()
        assert queue_depth(rt.celery, CLASSIFY_QUEUE) == 1

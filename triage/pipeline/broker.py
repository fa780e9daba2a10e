"""Asking the broker how many messages wait on a queue (kombu's passive declare: LLEN on
Redis, the declare-ok count on AMQP), and keeping a queue nobody may consume to a length."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Messages waiting on `queue` for a consumer (0 for a queue nobody declared yet), or None
    when the broker cannot be asked. Opens a connection for the one question."""
    depth = QueueDepth(celery, queue)
    try:
        return depth()
    finally:
        depth.close()


def queue_depths(celery: Celery, queues: list[str]) -> dict[str, int] | None:
    """Messages waiting on each of `queues`, asked over one connection; None when the broker
    cannot be reached. One question per queue, each with a connection of its own, took 2 s
    per queue to learn that a broker is down: longer than a Prometheus scrape may take."""
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            return {queue: _declared_depth(conn, queue) for queue in queues}
    except Exception as exc:  # noqa: BLE001 - callers treat "unknown" on their own terms
        log.warning("queue depths unknown (%s)", exc)
        return None


def _declared_depth(conn: Any, queue: str) -> int:
    # A channel per queue: on AMQP a passive declare of a missing queue closes its channel.
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception as exc:
        if getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc):
            return 0  # nobody declared it yet; on Redis, any empty queue
        raise
    finally:
        try:
            channel.close()
        except Exception as exc:  # noqa: BLE001 - closed by the server already (AMQP 404)
            log.debug("closing a channel: %s", exc)


class QueueDepth:
    """`queue_depth` for a caller that asks often (several times a second): the connection
    stays open between asks, and is dropped after any failure. One thread only."""

    def __init__(self, celery: Celery, queue: str) -> None:
        self._celery = celery
        self._queue = queue
        # A connection of its own, not a pooled producer's: on AMQP a passive declare of a
        # missing queue closes the channel.
        self._conn: Any = None

    def __call__(self) -> int | None:
        try:
            if self._conn is None:
                self._conn = self._celery.connection_for_write()
                self._conn.ensure_connection(max_retries=1)
            ok = self._conn.default_channel.queue_declare(queue=self._queue, passive=True)
            return int(ok.message_count)
        except Exception as exc:  # noqa: BLE001 - callers treat "unknown" on their own terms
            if getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc):
                # A queue nobody declared yet; on Redis, any empty queue (no list key). AMQP
                # closes the channel over it, Redis keeps it: reconnecting for every ask of an
                # empty queue would cost more than the rest of the publishing thread's work.
                if self._conn is None or self._conn.transport.driver_type != "redis":
                    self.close()
                return 0
            self.close()
            log.warning("depth of %s unknown (%s)", self._queue, exc)
            return None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.debug("closing a broker connection: %s", exc)


def trim_queue(celery: Celery, queue: str, keep: int) -> int | None:
    """Drop the oldest messages of `queue` beyond the newest `keep` on a Redis broker; returns
    how many were dropped, or None when this broker has no such operation (AMQP: a
    `max-length` policy does it there) or cannot be reached.

    kombu's Redis transport pushes to the left of the queue's list and consumers pop from the
    right, so the newest messages are the first `keep`. The count and the trim are one
    transaction: a message pushed in between is not dropped uncounted."""
    try:
        with celery.connection_for_write() as conn:
            if conn.transport.driver_type != "redis":
                return None
            conn.ensure_connection(max_retries=1, timeout=2)
            channel = conn.default_channel
            with channel.conn_or_acquire() as client, client.pipeline() as pipe:
                length, _ = pipe.llen(queue).ltrim(queue, 0, keep - 1).execute()
            return max(0, int(length) - keep)
    except Exception as exc:  # noqa: BLE001 - the sweeper tries again on its next pass
        log.warning("could not trim %s (%s)", queue, exc)
        return None

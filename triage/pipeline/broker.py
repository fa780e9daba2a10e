"""Asking the broker how many messages wait on a queue (kombu's passive declare: LLEN on
Redis, the declare-ok count on AMQP)."""

from __future__ import annotations

import logging

from celery import Celery

log = logging.getLogger(__name__)


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Messages waiting on `queue` for a consumer (0 for a queue nobody declared yet), or None
    when the broker cannot be asked."""
    # A connection of its own: on AMQP a passive declare of a missing queue closes the
    # channel, which must not be a pooled producer's.
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            ok = conn.default_channel.queue_declare(queue=queue, passive=True)
            return int(ok.message_count)
    except Exception as exc:  # noqa: BLE001 - callers treat "unknown" on their own terms
        if getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc):
            return 0
        log.warning("depth of %s unknown (%s)", queue, exc)
        return None

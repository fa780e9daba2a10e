"""kombu's Redis transport with two changes: one client object per channel for its short
commands, and a channel that can still be closed once kombu has detached its connection.

kombu builds a new `redis.Redis` for every command it sends outside the event loop (each
publish, and the acknowledgement bookkeeping of every message consumed). With redis-py 8 that
construction copies the client's response-callback table each time: 5% of a worker's CPU on
one-ticket messages (py-spy, `make bench` scenario 5b). The client is only a handle on the
channel's connection pool and is safe to share between threads, so one per pool is kept.

When the consumer loses the broker mid-poll, kombu's Connection.collect() detaches the transport
from its connection (`client = None`) before the channel has closed; the close that follows
rebuilds the pool from the connection's address to put the unacked messages back, and raised
AttributeError. Celery treats that as unrecoverable and the worker shut down instead of
reconnecting (fault test: Redis killed and restarted). The channel keeps the parameters it
was opened with, so the close restores what it can or fails with a connection error, which
the consumer ignores before it reconnects.

Everything else is kombu's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    _shared: tuple[Any, Any] | None = None
    _opened_with: dict[bool, dict[str, Any]] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:  # detached by Connection.collect()
            known = (self._opened_with or {}).get(asynchronous)
            if known is None:
                raise redis.exceptions.ConnectionError("the broker connection was closed")
            return dict(known)
        params: dict[str, Any] = super()._connparams(asynchronous)
        self._opened_with = {**(self._opened_with or {}), asynchronous: dict(params)}
        return params

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool, shared = self._shared or (None, None)
        if pool is not self.pool:
            # First use, or kombu replaced the pool (after a connection error).
            pool, shared = self.pool, self._create_client()
            self._shared = (pool, shared)
        yield shared


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel

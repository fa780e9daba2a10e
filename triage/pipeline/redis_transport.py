"""kombu's Redis transport with one client object per channel for its short commands.

kombu builds a new `redis.Redis` for every command it sends outside the event loop (each
publish, and the acknowledgement bookkeeping of every message consumed). With redis-py 8 that
construction copies the client's response-callback table each time: 5% of a worker's CPU on
one-ticket messages (py-spy, `make bench` scenario 5b). The client is only a handle on the
channel's connection pool and is safe to share between threads, so one per pool is kept.
Everything else is kombu's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    _shared: tuple[Any, Any] | None = None

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

"""An HTTP request's timeouts cut to the time left before a deadline.

httpx's timeouts bound each phase of an exchange and each read in it, not the whole: an answer
that keeps arriving a few bytes at a time never trips one. Where a lease counts on work ending
by some time (a classify call's, a delivery's requests), each request carries this as its
`timeout` extension, and the answer's body is abandoned once the deadline has passed.
"""

from __future__ import annotations

import time
from typing import Any


class TimeLeft(dict[str, Any]):
    """A request's `timeout` extension, each value cut to the time left before the deadline.
    httpcore reads it at each phase of the exchange (pool, connect, write, read), for httpx and
    httpx2 alike."""

    def __init__(self, timeouts: dict[str, Any], deadline: float) -> None:
        super().__init__(timeouts)
        self.deadline = deadline

    def get(self, key: str, default: Any = None) -> Any:
        configured = super().get(key, default)
        # Never 0 or less: httpcore reads that as "no wait at all" only on some paths.
        left = max(0.001, self.deadline - time.monotonic())
        return left if configured is None else min(float(configured), left)

"""The consumer reads Celery's reserved requests (a WeakSet) while the pool's threads discard
the requests whose tasks end and the set gains new ones: the read must never raise."""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from triage.pipeline.consumption import waiting_requests


class _Request:
    pass


def test_waiting_requests_are_the_reserved_ones_not_yet_running():
    requests = [_Request() for _ in range(5)]
    reserved = weakref.WeakSet(requests)
    active = {requests[1], requests[3]}

    waiting = waiting_requests(reserved, active)

    assert sorted(map(id, waiting)) == sorted(map(id, [requests[0], requests[2], requests[4]]))


@contextmanager
def _churned(reserved: weakref.WeakSet[Any], requests: list[Any]) -> Iterator[None]:
    """Two threads adding to and discarding from `reserved` as fast as they can, switching
    threads as often as the interpreter allows: the race is microseconds wide."""
    stop = threading.Event()

    def churn(k: int) -> None:
        i = 0
        while not stop.is_set():
            reserved.add(requests[(i * 7 + k) % len(requests)])
            reserved.discard(requests[(i * 13 + k) % len(requests)])
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)


def _errors_reading(
    read: Callable[[weakref.WeakSet[Any]], object], seconds: float
) -> tuple[int, int]:
    requests = [_Request() for _ in range(200)]
    reserved: weakref.WeakSet[Any] = weakref.WeakSet(requests[:100])
    reads = errors = 0
    with _churned(reserved, requests):
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            try:
                read(reserved)
            except RuntimeError:
                errors += 1
            reads += 1
    return reads, errors


def test_reading_reserved_requests_while_threads_change_them_never_raises():
    # The race is real: a plain read of the same set under the same churn fails (it stopped a
    # worker in `make bench` with "Set changed size during iteration").
    reads, errors = _errors_reading(lambda reserved: [r for r in list(reserved)], 1.0)
    assert errors > 0, f"the churn never raced a plain read in {reads} reads"

    reads, errors = _errors_reading(lambda reserved: waiting_requests(reserved, set()), 1.0)

    assert reads > 1000 and errors == 0

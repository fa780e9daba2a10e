"""Model calls in flight in one worker process: a bound on them, and the threads they run on.

A task message can carry many tickets. The task takes as many call slots as it can get (at
least one, at most one per ticket), claims that many tickets, and runs their calls side by
side; tickets it has no slot for yet stay unclaimed in `queued`, so a busy process never holds
claims (and their leases) it cannot serve. Those go in a later part of the batch, which starts
beside the earlier ones as slots come back (each call's slot is given back as it answers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
# How long a wave waits for answers arriving just after its first.
GATHER_SECONDS = 0.01
# How long a batch that finds too few free slots waits for more before starting on a part.
SLOT_PATIENCE_SECONDS = 0.05


class CallSlots:
    """A counting semaphore that hands out as many permits as are free, up to a wish."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._free = self.limit
        # Tickets of running batches that have no slot yet (`expect`): work this process has
        # already taken from the broker, ahead of anything it would fetch next.
        self._waiting = 0
        self._cond = threading.Condition()

    def take(self, wanted: int, patience: float = 0.0) -> int:
        """Block until a slot is free; take up to `wanted` of them and say how many (at least
        one). With fewer free than wanted, wait up to `patience` seconds for more first: slots
        come back a call at a time, and a batch split into many small chunks costs a
        transaction pair per chunk."""
        wanted = max(1, wanted)
        deadline: float | None = None
        with self._cond:
            # Another taker can empty the slots while this one waits for more: then it waits
            # for one again. Handing back none would start a part with no tickets, a claim
            # transaction for nothing (seen in a trace of `make bench`).
            while True:
                while self._free == 0:
                    self._cond.wait()
                if deadline is None:
                    deadline = time.monotonic() + patience
                while self._free < wanted and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._free > 0:
                    break
            got = min(self._free, wanted)
            self._free -= got
            return got

    def give(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()

    def expect(self, n: int) -> None:
        """`n` more tickets in hand wait for slots (negative: that many fewer)."""
        with self._cond:
            self._waiting = max(0, self._waiting + n)

    @property
    def free(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        return self._waiting


class HeldSlots:
    """Slots one task has taken, given back a few at a time as its calls finish; whatever is
    left goes back at the end (`give_rest`, in a finally)."""

    def __init__(self, slots: CallSlots, count: int) -> None:
        self._slots = slots
        self.count = count
        self._held = count
        # The call threads give back their own slots (`released`) while the task's thread
        # gives back the rest.
        self._lock = threading.Lock()

    def give(self, n: int) -> None:
        with self._lock:
            n = max(0, min(n, self._held))
            self._held -= n
        if n > 0:
            self._slots.give(n)

    def released(self, call: Callable[[], T]) -> Callable[[], T]:
        """`call`, giving one slot back on its own thread as soon as it returns or raises.
        The task's thread may still be recording an earlier wave of answers then; a slot
        given back only when it came round to this answer would stand idle meanwhile."""

        def run() -> T:
            try:
                return call()
            finally:
                self.give(1)

        return run

    def give_rest(self) -> None:
        self.give(self._held)


def send_reserve(limit: int) -> int:
    """Threads the call pool keeps beyond its call slots for deliveries' sink requests."""
    return max(SEND_RESERVE_MIN, limit // SEND_RESERVE_SHARE)


# Model calls hold at most the slot limit's threads, so these are always a delivery's: with
# none, every thread could be held by a call (tens of seconds each when the model API is
# slow) while a delivery's requests waited for one and its deadline ran out, and healthy
# sinks' deliveries failed as "not sent" and were retried, in the end dead-lettered. Few,
# so deliveries stay throttled while calls are busy: unthrottled (a thread per send), a
# burst of them flooded a slow receiver into cut requests sent again (bench/RESULTS.md,
# session 16).
SEND_RESERVE_MIN = 2
SEND_RESERVE_SHARE = 8


class CallPool:
    """Runs a batch's calls concurrently. The first runs on the caller's own thread (a batch
    of one never changes threads); the rest on a shared pool as large as the slot limit, plus
    a few threads (`send_reserve`) that model calls never fill."""

    def __init__(self, limit: int) -> None:
        self.slots = CallSlots(limit)
        # Threads start on first use, not here. Parts get their own: a part waits on its
        # calls, which need the call threads.
        self._calls = ThreadPoolExecutor(
            self.slots.limit + send_reserve(self.slots.limit), thread_name_prefix="triage-call"
        )
        self._parts = ThreadPoolExecutor(self.slots.limit, thread_name_prefix="triage-part")

    def run(self, calls: Sequence[Callable[[], T]]) -> list[T | Exception]:
        """Each call's result, or the exception it raised, in order."""
        if not calls:
            return []
        futures: list[Future[T]] = [self._calls.submit(call) for call in calls[1:]]
        results: list[T | Exception] = [_capture(calls[0])]
        for future in futures:
            outcome: T | Exception = _outcome(future)
            results.append(outcome)
        return results

    def waves(self, calls: Sequence[Callable[[], T]]) -> Iterator[list[tuple[int, T | Exception]]]:
        """Run the calls side by side and yield their outcomes as they finish: each time one
        is done, every call done within GATHER_SECONDS of it, with its index. A fast answer is
        not held back for a slow one, and answers that arrive together are handled together."""
        if len(calls) <= 1:
            if calls:
                yield [(0, _capture(calls[0]))]
            return
        futures = {self._calls.submit(call): i for i, call in enumerate(calls)}
        pending: set[Future[T]] = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            if pending:
                # Answers a few ms behind the first join its wave: one transaction for them
                # all, at a cost far below a model call's own spread.
                more, pending = wait(pending, timeout=GATHER_SECONDS)
                done |= more
            wave: list[tuple[int, T | Exception]] = []
            for future in sorted(done, key=futures.__getitem__):
                outcome: T | Exception = _outcome(future)
                wave.append((futures[future], outcome))
            yield wave

    def beside(self, part: Callable[[], T]) -> Future[T]:
        """Run one part of a batch on its own thread. Each running part holds at least one
        slot, so `limit` threads suffice."""
        return self._parts.submit(part)

    def shutdown(self) -> None:
        self._parts.shutdown(wait=True)
        self._calls.shutdown(wait=True)


def _capture(call: Callable[[], T]) -> T | Exception:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - handed back for the stage's guard to decide
        return exc


def _outcome(future: Future[R]) -> R | Exception:
    exc = future.exception()
    if exc is None:
        return future.result()
    return _as_exception(exc)


def _as_exception(exc: BaseException) -> Exception:
    # A BaseException (KeyboardInterrupt, SystemExit) from a pool thread must still stop us.
    if isinstance(exc, Exception):
        return exc
    raise exc

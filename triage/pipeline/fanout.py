"""Model calls in flight in one worker process: a bound on them, and the threads they run on.

A task message can carry many tickets. The task takes as many claim slots as it can get (at
least one, at most one per ticket), claims that many tickets, and hands their calls to the
call gate, which runs at most `limit` at once. There are a few more claim slots than calls
(`claim_ahead`), so a process holds a few tickets claimed and ready to call: the moment a
call answers, the gate starts the next on the same thread, where a ticket claimed only then
would leave the slot idle for its claim's transaction. Tickets a task has no claim slot for
yet stay unclaimed in `queued`, so a busy process never holds more claims than it can start
soon (a claim's lease runs from the claim). Those go in a later part of the batch, which
starts beside the earlier ones as claim slots come back (each call's is given back as it
answers).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from triage.errors import CallNotStarted

if TYPE_CHECKING:
    from triage.config import Settings

T = TypeVar("T")
R = TypeVar("R")
# How long a wave waits for answers arriving just after its first.
GATHER_SECONDS = 0.01
# How long a batch that finds too few free slots waits for more before starting on a part.
SLOT_PATIENCE_SECONDS = 0.05


class CallSlots:
    """A counting semaphore that hands out as many permits as are free, up to a wish: the
    claim slots, one per ticket claimed for a call (running, or next in line at the gate)."""

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


def claim_ahead(limit: int) -> int:
    """Tickets a process may hold claimed beyond its calls in flight, ready for the next
    free call."""
    return max(1, limit // CLAIM_AHEAD_SHARE)


# A call answers every 4 ms in a process of 64 slots with the model at 0.25 s: a refill (the
# claim slot's patience, the claim's transaction, admission) takes tens of ms, and this many
# tickets in line cover it. More would hold claims longer and leave the fleet's last tickets
# in fewer workers' hands.
CLAIM_AHEAD_SHARE = 4
# A ticket claimed ahead that waited this long for a call is put back instead of called: its
# claim's lease counts on its calls fitting in it, with only its grace for waiting. Workers
# use half the configured grace (`call_pool`); this is half the default's.
MAX_GATE_WAIT_SECONDS = 15.5


def call_pool(settings: Settings, limit: int) -> CallPool:
    """A process's pool of `limit` calls, its claimed tickets waiting at most half their
    lease's grace for a call slot (`retry.classify_lease_seconds`)."""
    return CallPool(limit, max_wait=settings.claim_grace_seconds / 2)


class _Entry(Generic[T]):
    __slots__ = ("call", "future", "since")

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.future: Future[T] = Future()
        self.since = time.monotonic()

    def run(self, max_wait: float) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        waited = time.monotonic() - self.since
        if waited > max_wait:
            reason = f"it waited {waited:.1f}s for a free call slot"
            self.future.set_exception(CallNotStarted(reason))
            return
        try:
            result = self.call()
        except BaseException as exc:  # noqa: BLE001 - the waiter decides (see _outcome)
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class CallGate:
    """At most `limit` calls running at once; the others wait in arrival order. When a call
    ends, the next waiting one starts on the same thread at once: no thread hand-off, and no
    moment with a free slot and a call waiting."""

    def __init__(self, limit: int, threads: ThreadPoolExecutor, max_wait: float) -> None:
        self.limit = max(1, limit)
        self.max_wait = max_wait
        self._threads = threads
        self._running = 0
        self._waiting: deque[_Entry[Any]] = deque()
        self._lock = threading.Lock()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """`call` on a pool thread when a slot is free."""
        entry = _Entry(call)
        if self._start_or_wait(entry):
            self._threads.submit(self._run_from, entry)
        return entry.future

    def run_here(self, call: Callable[[], T]) -> Future[T]:
        """`call` on this thread when a slot is free now (a batch of one never changes
        threads); otherwise in line like any other. The returned future is done when the
        call has run here."""
        entry = _Entry(call)
        if self._start_or_wait(entry):
            entry.run(self.max_wait)
            following = self._next()
            if following is not None:
                self._threads.submit(self._run_from, following)
        return entry.future

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _start_or_wait(self, entry: _Entry[Any]) -> bool:
        with self._lock:
            if self._running < self.limit:
                self._running += 1
                return True
            self._waiting.append(entry)
            return False

    def _run_from(self, entry: _Entry[Any] | None) -> None:
        while entry is not None:
            entry.run(self.max_wait)
            entry = self._next()

    def _next(self) -> _Entry[Any] | None:
        """The slot just freed goes to the next call in line, if any."""
        with self._lock:
            if self._waiting:
                return self._waiting.popleft()
            self._running -= 1
            return None


class CallPool:
    """Runs a batch's calls concurrently, at most `limit` at once in the process (the gate).
    The first of a batch of one runs on the caller's own thread; the rest on a shared pool
    as large as the slot limit, plus a few threads (`send_reserve`) that model calls never
    fill. Claim slots (`slots`) are a few more than calls (`claim_ahead`)."""

    def __init__(self, limit: int, max_wait: float = MAX_GATE_WAIT_SECONDS) -> None:
        limit = max(1, limit)
        self.slots = CallSlots(limit + claim_ahead(limit))
        # Threads start on first use, not here. Parts get their own: a part waits on its
        # calls, which need the call threads.
        self._calls = ThreadPoolExecutor(
            limit + send_reserve(limit), thread_name_prefix="triage-call"
        )
        self.gate = CallGate(limit, self._calls, max_wait)
        self._parts = ThreadPoolExecutor(self.slots.limit, thread_name_prefix="triage-part")

    def run(self, calls: Sequence[Callable[[], T]]) -> list[T | Exception]:
        """Each call's result, or the exception it raised, in order. Not through the gate:
        for a delivery's sink requests, which the send reserve's threads are kept for."""
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
                yield [(0, _outcome(self.gate.run_here(calls[0])))]
            return
        futures = {self.gate.submit(call): i for i, call in enumerate(calls)}
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
        claim slot, so as many threads as claim slots suffice."""
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

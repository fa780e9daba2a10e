"""Publishing committed outbox rows off the caller's thread, in batches.

The API's webhooks and the workers' classify stage hand the rows they committed (claimed as
they were written, `Publisher.write`) to one background thread per process and go on. Under
light load the thread publishes each row as it arrives; under heavy load rows pile up while it
works and go out together: marking rows sent costs one transaction per batch instead of one
per ticket, and rows for the same queue share task messages (relay.Publisher). A crash loses
nothing: the rows are committed, and the relay loop and the workers' sweepers publish whatever
is left once its claim's lease is over.

Rows are marked sent a moment after they are sent, together (MARK_DELAY_SECONDS): at a
moderate rate every publish is one row, and its own mark-sent transaction would be a third of
the database work the API does for a webhook. Nothing waits for the mark: the message is on
the broker, the claim's lease keeps other relays off the row meanwhile, and a crash in between
sends the row again after the lease, which the idempotent tasks absorb.

When the classify queue is backed up (messages wait there that no worker has taken), the
thread lingers longer: the tickets would wait in the queue anyway, and full batches cost the
workers far less per ticket than the one-ticket messages a steady trickle of webhooks makes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from triage.pipeline.relay import Pending, Publisher

log = logging.getLogger(__name__)

# Large enough to amortise the two transactions, small enough that one batch's broker sends
# do not hold back the next tickets for long.
MAX_BATCH = 200
# Under load the thread waits up to this long for more ids before publishing, so that rows
# share task messages: when LINGER_FROM handoffs are waiting at once (they arrive faster than
# one publish takes; one handoff of several rows, a batch's deliveries say, is not a rate), or,
# with `gather_stream`, when handoffs have lately come less than this far apart (another is
# due within the wait). A message of two tickets costs the workers far less than two of one,
# and the wait is small beside the model call. At a moderate rate ids go at once.
LINGER_SECONDS = 0.02
LINGER_FROM = 3
# Weight of the newest gap in the running mean of the gaps between ids.
GAP_WEIGHT = 0.2
# With a backlog: up to this long (MAX_BATCH ids end it sooner). Tickets wait far longer than
# this in the queue meanwhile. A worker's deliveries split by department (one message per
# department per publish), so at 0.1 s its delivery messages carried 2.6 tickets in the
# I/O-bound bench; at 0.4 s, 5.5 (one run), and the workers spent 3.1-3.3 ms of CPU per
# ticket instead of 3.9-4.1 (make bench, 3a, three alternating runs each).
BACKLOG_LINGER_SECONDS = 0.4
# Messages waiting on the classify queue that make it a backlog: more than a moment's worth
# between a publish and a worker's next fetch.
BACKLOG_MESSAGES = 4
# How often the broker is asked, at most (and only while there is something to publish).
BACKLOG_CHECK_SECONDS = 0.25
# Sent rows are marked sent this long after the first of them was sent, or once this many
# wait. Far inside the claim's lease (relay.CLAIM_LEASE), so no other relay sends them again.
MARK_DELAY_SECONDS = 0.5
MARK_MAX = 1000


class Backlog:
    """Whether a queue holds at least `threshold` messages, from a depth probe asked at most
    every `interval` seconds. An unknown depth (broker down) is no backlog."""

    def __init__(
        self,
        depth: Callable[[], int | None],
        threshold: int = BACKLOG_MESSAGES,
        interval: float = BACKLOG_CHECK_SECONDS,
    ) -> None:
        self._depth = depth
        self._threshold = threshold
        self._interval = interval
        self._checked = -interval
        self._backed_up = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            depth = self._depth()
            self._backed_up = depth is not None and depth >= self._threshold
        return self._backed_up


class PublishBatcher:
    def __init__(
        self,
        publisher: Publisher,
        linger: float = LINGER_SECONDS,
        backlog: Callable[[], bool] | None = None,
        backlog_linger: float = BACKLOG_LINGER_SECONDS,
        gather_stream: bool = False,
    ) -> None:
        self._publisher = publisher
        self._linger = linger
        self._backlog = backlog or (lambda: False)
        self._backlog_linger = backlog_linger
        self._gather_stream = gather_stream
        # One item per handoff (`submit`); None asks the thread to stop.
        self._handoffs: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        # Running mean of the seconds between handoffs. Submitters update it without a
        # lock: a lost update only nudges an estimate.
        self._gap = float("inf")
        self._last_submit: float | None = None
        self._unmarked: list[Pending] = []
        self._mark_at = 0.0
        self._thread = threading.Thread(target=self._run, name="triage-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, rows: Iterable[Pending]) -> None:
        now = time.monotonic()
        last, self._last_submit = self._last_submit, now
        if last is not None:
            gap = now - last
            self._gap = (
                gap if self._gap == float("inf") else self._gap + GAP_WEIGHT * (gap - self._gap)
            )
        handoff = list(rows)
        if handoff:
            self._handoffs.put(handoff)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted, then end the thread."""
        self._handoffs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            wait = None
            if self._unmarked:
                wait = max(0.0, self._mark_at - time.monotonic())
            batch, stopping = self._collect(wait)
            if batch:
                self._publish(batch)
            if self._unmarked and (
                stopping or len(self._unmarked) >= MARK_MAX or time.monotonic() >= self._mark_at
            ):
                self._mark()

    def _collect(self, wait: float | None) -> tuple[list[Pending], bool]:
        """The next batch (empty when nothing came within `wait` seconds; None: no limit),
        and whether stop() was called."""
        batch: list[Pending] = []
        handoffs = 0
        stopping = False
        deadline: float | None = None
        try:
            item = self._handoffs.get(timeout=wait)
        except queue.Empty:
            return batch, stopping
        while True:
            if item is None:
                stopping = True
            else:
                batch += item
                handoffs += 1
            if len(batch) >= MAX_BATCH:
                break
            try:
                item = self._handoffs.get_nowait()
                continue
            except queue.Empty:
                pass
            if stopping:
                break
            if deadline is None:
                linger = self._linger_for(handoffs)
                if linger <= 0:
                    break
                deadline = time.monotonic() + linger
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._handoffs.get(timeout=remaining)
            except queue.Empty:
                break
        return batch, stopping

    def _linger_for(self, waiting: int) -> float:
        """How long to wait for more ids, with `waiting` handoffs in hand (0: publish now)."""
        if self._backed_up():
            return self._backlog_linger
        if waiting >= LINGER_FROM or (self._gather_stream and self._gap < self._linger):
            return self._linger
        return 0.0

    def _backed_up(self) -> bool:
        try:
            return self._backlog()
        except Exception as exc:  # noqa: BLE001 - lingering is an optimisation, never a stall
            log.warning("backlog unknown (%s); publishing without it", exc)
            return False

    def _publish(self, rows: list[Pending]) -> None:
        try:
            sent = self._publisher.send_claimed(rows)
        except Exception as exc:  # noqa: BLE001 - the relay loop retries what is left
            log.warning(
                "publishing %d outbox rows failed (%s); the relay will retry", len(rows), exc
            )
            return
        if sent and not self._unmarked:
            self._mark_at = time.monotonic() + MARK_DELAY_SECONDS
        self._unmarked += sent

    def _mark(self) -> None:
        rows, self._unmarked = self._unmarked, []
        try:
            self._publisher.mark_sent(rows)
        except Exception as exc:  # noqa: BLE001 - unmarked rows are sent again after the lease
            log.warning(
                "marking %d sent outbox rows failed (%s); they will be sent again after the "
                "claim's lease",
                len(rows),
                exc,
            )

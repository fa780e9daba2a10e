"""Publishing committed outbox rows off the caller's thread, in batches.

The API's webhooks and the workers' classify stage hand the ids of the rows they committed to
one background thread per process and go on. Under light load the thread publishes each id as
it arrives; under heavy load ids pile up while it works and go out together: claiming and
marking rows costs two transactions per batch instead of two per ticket, and rows for the same
queue share task messages (relay.Publisher). A crash loses nothing: the rows are committed,
and the relay loop and the workers' sweepers publish whatever is left.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

from triage.pipeline.relay import Publisher

log = logging.getLogger(__name__)

# Large enough to amortise the two transactions, small enough that one batch's broker sends
# do not hold back the next tickets for long.
MAX_BATCH = 200
# Under load (at least LINGER_FROM ids waiting at once: they arrive faster than one publish
# takes) the thread waits up to this long for more before publishing, so that rows share task
# messages. At a moderate rate ids go at once and pay no latency for it.
LINGER_SECONDS = 0.02
LINGER_FROM = 3


class PublishBatcher:
    def __init__(self, publisher: Publisher, linger: float = LINGER_SECONDS) -> None:
        self._publisher = publisher
        self._linger = linger
        self._ids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="triage-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, outbox_ids: Iterable[int]) -> None:
        for outbox_id in outbox_ids:
            self._ids.put(outbox_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted, then end the thread."""
        self._ids.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect()
            if batch:
                self._publish(batch)

    def _collect(self) -> tuple[list[int], bool]:
        """The next batch, and whether stop() was called."""
        batch: list[int] = []
        stopping = False
        deadline: float | None = None
        item = self._ids.get()
        while True:
            if item is None:
                stopping = True
            else:
                batch.append(item)
            if len(batch) >= MAX_BATCH:
                break
            try:
                item = self._ids.get_nowait()
                continue
            except queue.Empty:
                pass
            if stopping or (deadline is None and len(batch) < LINGER_FROM):
                break
            if deadline is None:
                deadline = time.monotonic() + self._linger
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._ids.get(timeout=remaining)
            except queue.Empty:
                break
        return batch, stopping

    def _publish(self, ids: list[int]) -> None:
        try:
            self._publisher.publish(ids)
        except Exception as exc:  # noqa: BLE001 - the relay loop retries what is left
            log.warning(
                "publishing %d outbox rows failed (%s); the relay will retry", len(ids), exc
            )

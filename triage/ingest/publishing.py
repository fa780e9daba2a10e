"""Publishing accepted tickets' outbox rows off the request path, in batches.

Each webhook hands its outbox id to one background thread and answers at once. Under light
load the thread publishes each id as it arrives; under heavy load ids pile up while it works
and go out together, so claiming and marking rows costs two transactions per batch instead of
two per ticket. A crash loses nothing: the rows are committed, and the relay loop and the
workers' sweepers publish whatever is left.
"""

from __future__ import annotations

import logging
import queue
import threading

from triage.pipeline.relay import Publisher

log = logging.getLogger(__name__)

# Large enough to amortise the two transactions, small enough that one batch's broker sends
# do not hold back the next tickets for long.
MAX_BATCH = 200


class PublishBatcher:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._ids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="triage-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, outbox_id: int) -> None:
        self._ids.put(outbox_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted, then end the thread."""
        self._ids.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[int] = []
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
                except queue.Empty:
                    break
            if batch:
                self._publish(batch)

    def _publish(self, ids: list[int]) -> None:
        try:
            self._publisher.publish(ids)
        except Exception as exc:  # noqa: BLE001 - the relay loop retries what is left
            log.warning(
                "publishing %d outbox rows failed (%s); the relay will retry", len(ids), exc
            )

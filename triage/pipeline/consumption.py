"""Backpressure at the consumer: while the shared circuit breaker is open, a worker stops
consuming `triage.classify`, and starts again by itself when the circuit half-opens.

Deferring each ticket instead would spin through the whole backlog every cool-down (a database
write and a broker message per ticket) and bring every ticket back in the same instant. Messages
already taken keep going through the classify stage, which defers them without spending an
attempt. Delivery queues are not paused: sinks are not the API.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import Celery, bootsteps

from triage.pipeline.routing import CLASSIFY_QUEUE

log = logging.getLogger(__name__)

# How often the consumer looks at the circuit: short against a 30 s cool-down, and a single
# Redis GET on the consumer's event loop.
CHECK_INTERVAL_SECONDS = 1.0


class PauseClassifyWhileCircuitOpen(bootsteps.StartStopStep):  # type: ignore[misc]
    requires: ClassVar[tuple[str, ...]] = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None
        self.paused = False
        # Whether this worker serves classify at all (-Q may leave it out); fixed at first start.
        self.wanted: bool | None = None

    def start(self, c: Any) -> None:
        if self.wanted is None:
            self.wanted = CLASSIFY_QUEUE in c.app.amqp.queues.consume_from
        if not self.wanted:
            return
        # A consumer restart (broker reconnect) rebuilds its queues from app.amqp.queues, where
        # a paused queue stays deselected; read the state back rather than assume it.
        self.paused = CLASSIFY_QUEUE not in c.app.amqp.queues.consume_from
        self._tref = c.timer.call_repeatedly(CHECK_INTERVAL_SECONDS, self._check, (c,))

    def stop(self, c: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _check(self, c: Any) -> None:
        from triage.pipeline.runtime import get_runtime

        admission = get_runtime().admission
        if admission is None or c.task_consumer is None:
            return
        try:
            open_for = admission.breaker.open_seconds()
        except Exception as exc:  # noqa: BLE001 - Redis down: keep the current state
            log.warning("circuit state unavailable (%s); consumption unchanged", exc)
            return
        if open_for > 0 and not self.paused:
            log.warning("circuit open for %.0fs: pausing %s", open_for, CLASSIFY_QUEUE)
            c.cancel_task_queue(CLASSIFY_QUEUE)
            self.paused = True
        elif open_for <= 0 and self.paused:
            log.warning("circuit no longer open: resuming %s", CLASSIFY_QUEUE)
            c.add_task_queue(CLASSIFY_QUEUE)
            self.paused = False


def install(app: Celery) -> None:
    app.steps["consumer"].add(PauseClassifyWhileCircuitOpen)

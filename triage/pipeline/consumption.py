"""Backpressure at the consumer.

Two consumer steps decide when a worker takes messages off the broker:

- While the shared circuit breaker is open, a worker stops consuming `triage.classify`, and
  starts again by itself when the circuit half-opens.
- A worker takes another message only while the tickets it holds without a call slot are
  fewer than its free call slots plus a small reserve (see HoldOnlyWhatCanRun).

For the circuit: deferring each ticket instead would spin through the whole backlog every
cool-down (a database write and a broker message per ticket) and bring every ticket back in
the same instant. Messages already taken keep going through the classify stage, which defers
them without spending an attempt. Delivery queues are not paused: sinks are not the API.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from types import MethodType
from typing import Any, ClassVar

from celery import Celery, bootsteps
from celery.worker import state

from triage.pipeline.relay import CLASSIFY_TASK
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.reliability.limits import Admission

log = logging.getLogger(__name__)

# A worker may hold this fraction of its call slots' worth of tickets beyond its free slots
# (1/RESERVE_DIVISOR; at least 1 ticket, and always whole messages): a slot that frees then
# finds its next ticket in hand instead of waiting for the consumer's next turn and a broker
# round trip. make bench, three alternating full runs each: 3b (model at 0.2-2 s) 75-79% of
# ideal against 69-71%; 3a 72-77% either way (75-80% against 68-72% in runs of 3a alone).
# The price: a message taken ahead gets its slots a few at a time, in more and smaller
# claims, and 3a's workers spent 3.1-3.3 ms of CPU per ticket against 2.7-2.9.
RESERVE_DIVISOR = 4

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
            log.warning(
                "circuit open for %.0fs (%s): pausing %s",
                open_for,
                _reason(admission),
                CLASSIFY_QUEUE,
            )
            c.cancel_task_queue(CLASSIFY_QUEUE)
            self.paused = True
        elif open_for <= 0 and self.paused:
            log.warning("circuit no longer open: resuming %s", CLASSIFY_QUEUE)
            c.add_task_queue(CLASSIFY_QUEUE)
            self.paused = False


def _reason(admission: Admission) -> str:
    try:
        return admission.breaker.open_reason() or "unknown"
    except Exception:  # noqa: BLE001 - only a log line's detail
        return "unknown"


# Passes `waiting_requests` may make over a set other threads keep changing (see there).
SNAPSHOT_TRIES = 100


def waiting_requests(reserved: Iterable[Any], active: Container[Any]) -> list[Any]:
    """The requests in `reserved` that are not in `active`: taken from the broker, not yet
    running.

    Celery's `reserved_requests` is a WeakSet that the pool's threads discard from as their
    tasks end, while the consumer thread reads it here. A WeakSet iterates in Python, so a
    thread switch mid-way that changes it makes the iteration raise RuntimeError ("Set changed
    size during iteration"): raised in the consumer loop, that is an unrecoverable error that
    stopped the worker (seen in `make bench`; a stress test fails thousands of times in two
    seconds). The window is a few microseconds, so another pass succeeds."""
    for _ in range(SNAPSHOT_TRIES - 1):
        try:
            snapshot = list(reserved)
            break
        except RuntimeError:
            continue
    else:
        snapshot = list(reserved)  # the last try raises what it meets
    return [r for r in snapshot if r not in active]


def held_tickets(requests: Iterable[Any]) -> int:
    """Tickets in these messages: a classify message counts its ids, since each needs a call
    slot; any other message counts one."""
    held = 0
    for request in requests:
        kwargs = request.kwargs or {}
        ids = kwargs.get("ticket_ids") if request.task_name == CLASSIFY_TASK else None
        held += len(ids) if ids else 1
    return held


class HoldOnlyWhatCanRun(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker takes another message only while the tickets it already holds without a claim
    slot are fewer than its free claim slots plus a reserve of a quarter of its call slots:
    those in messages waiting for a thread, and those of running batches still waiting for
    claim slots (`CallSlots.waiting`; fanout explains claim and call slots).

    Celery's prefetch counts messages (one per thread), but a message can carry a batch of
    tickets. Without this, the first worker to start after an outage would take up to a
    thread's worth of batches, thousands of tickets it can only run 64 at a time, while the
    other workers sat idle. Messages left on the broker go to whichever worker frees a slot
    first; a slot is free again as soon as its call has answered (`HeldSlots`), so a batch
    whose slowest calls are still out does not keep the worker from taking more. A batch that
    began with fewer slots than tickets keeps the rest waiting for this worker's next free
    slots; counting them means a freed slot goes to them, not to fetching yet another batch
    while an idle worker gets none. A busy worker (no free slot) holds ahead less than the
    reserve (RESERVE_DIVISOR) plus one message.

    Redis only (the transport asks `can_consume` before each BRPOP; a reply already on its
    way, or a message a thread has just started, may still bring a few tickets more); on
    AMQP, prefetch alone bounds it.
    """

    requires: ClassVar[tuple[str, ...]] = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from triage.pipeline.runtime import get_runtime

        if c.task_consumer is None or c.connection.transport.driver_type != "redis":
            return
        calls = get_runtime().calls
        slots = calls.slots
        reserve = max(1, calls.gate.limit // RESERVE_DIVISOR)
        qos = c.task_consumer.channel.qos
        by_prefetch = qos.can_consume

        def can_consume(_qos: Any) -> bool:
            waiting = waiting_requests(state.reserved_requests, state.active_requests)
            return held_tickets(waiting) + slots.waiting < slots.free + reserve and by_prefetch()

        # A consumer restart (broker reconnect) builds a new channel, and this step runs
        # again after Tasks to wrap its QoS.
        qos.can_consume = MethodType(can_consume, qos)


def install(app: Celery) -> None:
    app.steps["consumer"].add(PauseClassifyWhileCircuitOpen)
    app.steps["consumer"].add(HoldOnlyWhatCanRun)

"""Gauges read when /metrics is scraped: the backlog on each queue, tickets by unfinished
state, and the circuit breaker. They describe the whole deployment (the broker, the database,
Redis), not one process, so the API serves them and workers do not: a fleet of workers would
report the same numbers many times over."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from triage.db.models import Ticket, TicketState
from triage.pipeline.broker import queue_depths
from triage.pipeline.celery_app import all_queues
from triage.pipeline.routing import DEAD_QUEUE
from triage.pipeline.runtime import Runtime
from triage.reliability.limits import REASONS

log = logging.getLogger(__name__)

S = TicketState
# Each counted through the (state, state_changed_at) index. Routed tickets, the bulk of the
# table, are left out: counting them would cost a scan that grows for ever.
COUNTED_STATES = (S.RECEIVED, S.QUEUED, S.CLASSIFYING, S.NEEDS_REVIEW, S.DEAD_LETTERED)


class PipelineGauges(Collector):
    """A source that cannot be asked (broker or database down) leaves its gauge out of the
    scrape rather than reporting a zero that looks healthy; /readyz says what is down."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._queues()
        yield from self._tickets()
        yield from self._circuit()

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        if self._rt.settings.effective_broker_url() is None:
            return
        depths = queue_depths(self._rt.celery, [*all_queues(self._rt.config), DEAD_QUEUE])
        if depths is None:
            return
        gauge = GaugeMetricFamily(
            "triage_queue_messages",
            "Messages waiting on each triage queue for a consumer",
            labels=["queue"],
        )
        for queue, depth in depths.items():
            gauge.add_metric([queue], depth)
        yield gauge

    def _tickets(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self._rt.sessions() as session:
                counts = dict(
                    session.execute(
                        select(Ticket.state, func.count())
                        .where(Ticket.state.in_([s.value for s in COUNTED_STATES]))
                        .group_by(Ticket.state)
                    ).all()
                )
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail over one source
            log.warning("ticket counts unavailable for /metrics: %s", exc.__class__.__name__)
            return
        gauge = GaugeMetricFamily(
            "triage_tickets",
            "Tickets by state: the unfinished ones (received, queued, classifying), those "
            "awaiting human review (needs_review) and the dead-lettered",
            labels=["state"],
        )
        for state in COUNTED_STATES:
            gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge

    def _circuit(self) -> Iterator[GaugeMetricFamily]:
        admission = self._rt.admission
        if admission is None:
            return
        try:
            open_for = admission.breaker.open_seconds()
            reason = admission.breaker.open_reason() if open_for > 0 else None
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail over one source
            log.warning("circuit state unavailable for /metrics: %s", exc.__class__.__name__)
            return
        yield GaugeMetricFamily(
            "triage_circuit_open",
            "1 while the API circuit breaker is open (workers stop taking triage.classify), else 0",
            value=1.0 if open_for > 0 else 0.0,
        )
        yield GaugeMetricFamily(
            "triage_circuit_open_seconds",
            "Seconds until the open circuit lets a probe call through (0 when not open)",
            value=open_for,
        )
        # Every reason always present (1 for the one the circuit is open for): a series that
        # appears only while open would leave an alert nothing to compare with.
        why = GaugeMetricFamily(
            "triage_circuit_open_reason",
            "1 for the reason the API circuit breaker is open (overload: sustained 429/529; "
            "api_key_rejected: a 401), else 0",
            labels=["reason"],
        )
        for each in REASONS:
            why.add_metric([each], 1.0 if each == reason else 0.0)
        yield why

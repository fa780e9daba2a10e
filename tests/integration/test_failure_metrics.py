"""`triage_stage_failures_total{stage, outcome, error_type}` counts what the guard decided for
each failed attempt: `retry` or `dead` (a dead letter, what an operator alerts on), or `noop`
(work that was no longer current). Before, the counter was declared and served but never counted.

Real PostgreSQL and Redis, the real SDK against the fake Messages API.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.fakeanthropic import Fault
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.runtime import Runtime


def _failures(stage: str, outcome: str) -> float:
    """Summed over error types."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "triage_stage_failures"
        for sample in metric.samples
        if sample.name == "triage_stage_failures_total"
        and sample.labels.get("stage") == stage
        and sample.labels.get("outcome") == outcome
    )


def _ticket(rt: Runtime, external_id: str) -> int:
    inbound = InboundTicket(
        source="generic", external_id=external_id, subject="Refund", body="Refund please"
    )
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound).ticket_id


@pytest.mark.parametrize(("fault", "outcome"), [("bad_request", "dead"), ("overloaded", "retry")])
def test_each_failed_attempt_is_counted_by_the_guards_decision(runtime, fake, fault, outcome):
    rt = runtime()
    tid = _ticket(rt, f"metrics-{fault}")
    before = _failures("classify", outcome)
    fake.add_fault(Fault(fault))

    assert classify_tickets_stage(rt, [tid]) == {tid: outcome}
    assert _failures("classify", outcome) == before + 1

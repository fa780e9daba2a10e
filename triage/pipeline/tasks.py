"""The Celery tasks: classify a ticket, deliver it to its department.

Each task is a thin shell: the stage functions in this package do the work, and
`reliability.guard.run_guarded` alone decides between retrying and dead-lettering.
"""

from __future__ import annotations

from celery import shared_task

from triage.pipeline.classify_stage import classify_ticket_stage
from triage.pipeline.deliver_stage import deliver_stage
from triage.pipeline.runtime import get_runtime


@shared_task(name="triage.classify_ticket", ignore_result=True)  # type: ignore[untyped-decorator]
def classify_ticket(ticket_id: int) -> str:
    """Label one ticket and dispatch it to its department (or to review)."""
    return classify_ticket_stage(get_runtime(), ticket_id)


@shared_task(name="triage.deliver", ignore_result=True)  # type: ignore[untyped-decorator]
def deliver(dispatch_id: int) -> str:
    """Apply a routed ticket's department sinks (consumed from dept.<department>)."""
    return deliver_stage(get_runtime(), dispatch_id)

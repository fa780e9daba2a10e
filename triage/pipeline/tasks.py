"""The Celery tasks: classify a ticket, deliver it to its department.

Each task is a thin shell: the stage functions in this package do the work, and
`reliability.guard.handle_failure` alone decides between retrying and dead-letting. The one
exception is a database that cannot be reached at all: the guard cannot record an attempt or
write the outbox without it, so the message itself goes back on the broker for a short,
jittered while (`retry.infrastructure_delay`) instead of being acked and left to the sweeper.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from triage.pipeline.classify_stage import classify_ticket_stage
from triage.pipeline.deliver_stage import SinksDone, deliver_stage
from triage.pipeline.runtime import get_runtime
from triage.reliability.retry import (
    INFRASTRUCTURE_RETRIES,
    infrastructure_delay,
    is_database_outage,
)

log = logging.getLogger(__name__)


def _retry_on_database_outage(task: Any, exc: Exception) -> None:
    if not is_database_outage(exc):
        return
    retries = int(task.request.retries or 0)
    if retries >= INFRASTRUCTURE_RETRIES:
        # Beyond this the sweeper recovers the ticket once the database is back.
        return
    delay = infrastructure_delay(retries)
    log.warning("%s: database unavailable (%s); back on the broker in %.1fs", task.name, exc, delay)
    raise task.retry(exc=exc, countdown=delay, max_retries=INFRASTRUCTURE_RETRIES)


@shared_task(bind=True, name="triage.classify_ticket", ignore_result=True)  # type: ignore[untyped-decorator]
def classify_ticket(self: Any, ticket_id: int) -> str:
    """Label one ticket and dispatch it to its department (or to review)."""
    try:
        return classify_ticket_stage(get_runtime(), ticket_id)
    except Exception as exc:
        _retry_on_database_outage(self, exc)
        raise


@shared_task(bind=True, name="triage.deliver", ignore_result=True)  # type: ignore[untyped-decorator]
def deliver(self: Any, dispatch_id: int, sinks_done: bool = False) -> str:
    """Apply a routed ticket's department sinks (consumed from dept.<department>)."""
    try:
        return deliver_stage(get_runtime(), dispatch_id, sinks_done=sinks_done)
    except SinksDone as done:
        # Only the recording is retried; the sinks are not asked twice.
        delay = infrastructure_delay(int(self.request.retries or 0))
        raise self.retry(
            exc=done,
            countdown=delay,
            kwargs={"dispatch_id": dispatch_id, "sinks_done": True},
            max_retries=INFRASTRUCTURE_RETRIES,
        ) from done
    except Exception as exc:
        _retry_on_database_outage(self, exc)
        raise

"""The Celery tasks: classify a ticket, deliver it to its department.

Each task is a thin shell: the stage functions in this package do the work, and
`reliability.guard.handle_failure` alone decides between retrying and dead-letting. The one
exception is a database that cannot be reached at all: the guard cannot record an attempt or
write the outbox without it, so the message itself goes back on the broker for a short,
jittered while (`retry.infrastructure_delay`) instead of being acked and left to the sweeper.
What was done but not recorded rides with it, so the retry records it instead of doing it
again: a classify message carries the model's answers, a delivery message says the sinks took it.
A spooled webhook (`triage.ingest.spool`) waits for the database without that bound.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from triage.errors import loggable
from triage.ingest.spool import SPOOL_TASK, spooled_ticket_name, store_spooled
from triage.metrics import BATCH_SIZE
from triage.pipeline.classify_labels import AnswersNotRecorded
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.deliver_stage import SinksDone, deliver_many_stage
from triage.pipeline.runtime import get_runtime
from triage.reliability.retry import (
    INFRASTRUCTURE_RETRIES,
    infrastructure_delay,
    is_database_outage,
)

log = logging.getLogger(__name__)


def _retry_on_database_outage(
    task: Any, exc: Exception, bound: int | None = INFRASTRUCTURE_RETRIES
) -> None:
    """Put the message back on the broker if `exc` is a database outage, up to `bound` times
    (None: no bound). Returns when it is not, or past the bound."""
    if not is_database_outage(exc):
        return
    retries = int(task.request.retries or 0)
    if bound is not None and retries >= bound:
        # Beyond this the sweeper recovers the ticket once the database is back.
        return
    delay = infrastructure_delay(retries)
    # The error by its type: a driver error's text can carry the row's values.
    log.warning(
        "%s: database unavailable (%s); back on the broker in %.1fs (retry %d)",
        task.name,
        loggable(exc),
        delay,
        retries + 1,
    )
    raise task.retry(exc=exc, countdown=delay, max_retries=bound)


@shared_task(bind=True, name="triage.classify_ticket", ignore_result=True)  # type: ignore[untyped-decorator]
def classify_ticket(
    self: Any,
    ticket_id: int | None = None,
    ticket_ids: list[int] | None = None,
    carried: list[dict[str, Any]] | None = None,
) -> dict[int, str]:
    """Label tickets and dispatch each to its department (or to review). A message carries
    one ticket (`ticket_id`) or a batch the publisher grouped (`ticket_ids`); a retried one
    may carry answers it could not record (`carried`)."""
    ids = _ids(ticket_id, ticket_ids)
    BATCH_SIZE.labels(stage="classify").observe(len(ids))
    try:
        return classify_tickets_stage(get_runtime(), ids, carried=carried)
    except AnswersNotRecorded as unrecorded:
        retries = int(self.request.retries or 0)
        if retries >= INFRASTRUCTURE_RETRIES:
            # Past this the sweeper recovers the tickets, and they are asked again.
            log.error("classify: %s; giving up on them", unrecorded)
            raise
        delay = infrastructure_delay(retries)
        log.warning("classify: %s; back on the broker in %.1fs", unrecorded, delay)
        raise self.retry(
            exc=unrecorded,
            countdown=delay,
            kwargs={"ticket_ids": ids, "carried": unrecorded.carried},
            max_retries=INFRASTRUCTURE_RETRIES,
        ) from unrecorded
    except Exception as exc:
        _retry_on_database_outage(self, exc)
        raise


@shared_task(bind=True, name="triage.deliver", ignore_result=True)  # type: ignore[untyped-decorator]
def deliver(
    self: Any,
    dispatch_id: int | None = None,
    sinks_done: bool = False,
    dispatch_ids: list[int] | None = None,
) -> dict[int, str]:
    """Apply routed tickets' department sinks (consumed from dept.<department>): one
    dispatch (`dispatch_id`) or a batch (`dispatch_ids`)."""
    ids = _ids(dispatch_id, dispatch_ids)
    BATCH_SIZE.labels(stage="deliver").observe(len(ids))
    try:
        return deliver_many_stage(get_runtime(), ids, sinks_done=sinks_done)
    except SinksDone as done:
        # Only the recording is retried; the sinks are not asked twice.
        delay = infrastructure_delay(int(self.request.retries or 0))
        raise self.retry(
            exc=done,
            countdown=delay,
            kwargs={"dispatch_ids": done.dispatch_ids, "sinks_done": True},
            max_retries=INFRASTRUCTURE_RETRIES,
        ) from done
    except Exception as exc:
        _retry_on_database_outage(self, exc)
        raise


# max_retries=None: no bound on the retries (see accept_spooled).
@shared_task(bind=True, name=SPOOL_TASK, ignore_result=True, max_retries=None)  # type: ignore[untyped-decorator]
def accept_spooled(self: Any, ticket: dict[str, Any], arrived_at: str) -> int:
    """Store a ticket whose webhook arrived while the database was down (published on
    triage.classify by the API); returns its id."""
    message = {"ticket": ticket, "arrived_at": arrived_at}
    try:
        return store_spooled(get_runtime(), message).ticket_id
    except Exception as exc:
        # Back on the broker without the other tasks' bound: this message is the ticket's only
        # copy (the sweeper cannot recover what the database never held).
        _retry_on_database_outage(self, exc, bound=None)
        # Not retried: the message is acked as failed, and the ticket is not stored. The
        # helpdesk was answered 202, so the operator needs its name to have it sent again.
        log.error(
            "%s: spooled %s not stored (%s); message dropped, send it again from the helpdesk",
            self.name,
            spooled_ticket_name(message),
            loggable(exc),
        )
        raise


def _ids(one: int | None, many: list[int] | None) -> list[int]:
    ids = [*([] if one is None else [one]), *(many or [])]
    if not ids:
        raise ValueError("a message with no ids")
    return ids

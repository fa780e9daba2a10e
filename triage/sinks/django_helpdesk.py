"""django-helpdesk write-back through its REST API (DRF, basic auth, a staff user).

PATCH /api/tickets/<id>/ sets queue and priority; POST /api/followups/ adds a private
follow-up titled with the triage marker, which the django-helpdesk source ignores when the
helpdesk's follow-up webhook reports it back. A retried delivery looks for its own follow-up
(by dispatch id in the title) first: the PATCH is made before the follow-up, so finding it
means both were applied, and the retry sends nothing (patching again would undo a queue or
priority an agent changed since).

Queue and priority are set only while they are what the webhook reported
(`helpdesk.agent_wins`), compared with the ticket as read: one an agent changed since is left,
and named in the follow-up.
"""

from __future__ import annotations

from collections.abc import Mapping

from triage.sinks.base import Delivery
from triage.sinks.helpdesk import (
    agent_wins,
    has_note,
    left_fields,
    note_text,
    note_title,
    reported_number,
    ticket_number,
)
from triage.sinks.http import make_client, send

# django-helpdesk: 1 critical, 2 high, 3 normal, 4 low, 5 very low.
PRIORITIES = {"urgent": 1, "high": 2, "normal": 3, "low": 4}


class DjangoHelpdeskWriter:
    name = "django-helpdesk"
    # The ticket with its follow-ups, the PATCH, the follow-up.
    max_requests = 3

    def __init__(
        self,
        base_url: str,
        *,
        username: str,
        password: str,
        queues: Mapping[str, str],
        queue_ids: Mapping[str, int],
        timeout_seconds: float,
    ) -> None:
        self.queues = dict(queues)
        self.queue_ids = dict(queue_ids)
        self.client = make_client(
            timeout_seconds, base_url=base_url.rstrip("/"), auth=(username, password)
        )

    def queue_id(self, department: str | None) -> int | None:
        """department -> queue slug (default: the same name) -> the helpdesk's queue id."""
        if department is None:
            return None
        return self.queue_ids.get(self.queues.get(department, department))

    def deliver(self, delivery: Delivery) -> None:
        what = f"django-helpdesk write-back for ticket {delivery.ticket_id}"
        number = ticket_number(delivery)
        ticket_path = f"/api/tickets/{number}/"
        current = send(
            self.client, "GET", ticket_path, what=what, deadline=delivery.deadline
        ).json()
        if not isinstance(current, dict):
            current = {}
        if has_note(current.get("followup_set"), note_title(delivery), "title"):
            return
        queue = agent_wins(
            "queue",
            self.queue_id(delivery.department),
            reported_number(delivery.metadata, "queue_id"),
            current.get("queue"),
        )
        priority = agent_wins(
            "priority",
            PRIORITIES.get(str(delivery.label.get("priority"))),
            reported_number(delivery.metadata, "priority"),
            current.get("priority"),
        )
        change = {write.name: write.value for write in (queue, priority) if write.value is not None}
        left = left_fields((queue, priority), what)
        if change:
            send(
                self.client,
                "PATCH",
                ticket_path,
                what=what,
                deadline=delivery.deadline,
                json=change,
            )
        send(
            self.client,
            "POST",
            "/api/followups/",
            what=what,
            deadline=delivery.deadline,
            json={
                "ticket": int(number),
                "title": note_title(delivery),
                "comment": note_text(delivery, left),
                "public": False,
            },
        )

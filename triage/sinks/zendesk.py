"""Zendesk write-back: group, priority, tags and a private comment in one ticket update.

PUT /api/v2/tickets/{id}.json with API-token auth (`{email}/token:{token}`).
`additional_tags` adds triage's tags without replacing the agent's (plain `tags` would).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from triage.sinks.base import Delivery
from triage.sinks.helpdesk import note_text, triage_tags
from triage.sinks.http import make_client, send

# Triage's priorities are Zendesk's.
PRIORITIES = {"low": "low", "normal": "normal", "high": "high", "urgent": "urgent"}


class ZendeskWriter:
    name = "zendesk"

    def __init__(
        self,
        base_url: str,
        *,
        email: str,
        api_token: str,
        groups: Mapping[str, int],
        timeout_seconds: float,
    ) -> None:
        self.groups = dict(groups)
        self.client = make_client(
            timeout_seconds, base_url=base_url.rstrip("/"), auth=(f"{email}/token", api_token)
        )

    def deliver(self, delivery: Delivery) -> None:
        ticket: dict[str, Any] = {
            "additional_tags": triage_tags(delivery),
            "comment": {"body": note_text(delivery), "public": False},
        }
        group = self.groups.get(delivery.department or "")
        if group is not None:
            ticket["group_id"] = group
        priority = PRIORITIES.get(str(delivery.label.get("priority")))
        if priority:
            ticket["priority"] = priority
        send(
            self.client,
            "PUT",
            f"/api/v2/tickets/{delivery.external_id}.json",
            what=f"zendesk write-back for ticket {delivery.ticket_id}",
            json={"ticket": ticket},
        )

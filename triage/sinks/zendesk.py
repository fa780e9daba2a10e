"""Zendesk write-back: group, priority, tags and a private comment in one ticket update.

PUT /api/v2/tickets/{id}.json with API-token auth (`{email}/token:{token}`).
`additional_tags` adds triage's tags without replacing the agent's (plain `tags` would);
`remove_tags` takes off triage's own tags of an earlier routing that no longer apply.
Each PUT with a comment adds one, and Zendesk has no idempotency key for updates: a retried
delivery (a timeout that in fact succeeded, or a later sink of the department failing) first
looks among the ticket's newest comments for its own (by dispatch id in the title). Comment,
group, priority and tags went in one update, so finding it means all of them were applied:
the retry sends nothing. Setting them again would undo what an agent changed since (moved the
ticket to another group, removed a tag), minutes or hours after triage wrote them.

A closed ticket takes no updates: Zendesk answers 422 "Status: closed prevents ticket update".
That happens to a ticket an agent closed (or merged into another) before triage wrote back,
and to old tickets a reprocess or backfill routes again. There is nothing left to write to, and
nothing a retry could change: the write-back is skipped (logged, and counted in
`triage_sink_skipped_total`), not dead-lettered, and the department's other sinks still run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from triage.errors import SinkRejected
from triage.metrics import SINK_SKIPPED
from triage.sinks.base import Delivery
from triage.sinks.helpdesk import has_note, note_text, note_title, ticket_number, triage_tags
from triage.sinks.http import make_client, send

log = logging.getLogger(__name__)

# What Zendesk says, in a 422's validation details, to any update of a closed ticket.
CLOSED = "closed prevents ticket update"

# Triage's priorities are Zendesk's.
PRIORITIES = {"low": "low", "normal": "normal", "high": "high", "urgent": "urgent"}


class ZendeskWriter:
    name = "zendesk"
    # The newest comments, then one update.
    max_requests = 2

    def __init__(
        self,
        base_url: str,
        *,
        email: str,
        api_token: str,
        groups: Mapping[str, int],
        timeout_seconds: float,
        own_tags: Iterable[str] = (),
    ) -> None:
        self.groups = dict(groups)
        # The tags triage may write (helpdesk.possible_tags): those it may also take off.
        self.own_tags = frozenset(own_tags)
        self.client = make_client(
            timeout_seconds, base_url=base_url.rstrip("/"), auth=(f"{email}/token", api_token)
        )

    def deliver(self, delivery: Delivery) -> None:
        what = f"zendesk write-back for ticket {delivery.ticket_id}"
        path = f"/api/v2/tickets/{ticket_number(delivery)}"
        if self._commented(path, delivery, what):
            return
        tags = triage_tags(delivery)
        ticket: dict[str, Any] = {
            "additional_tags": tags,
            "comment": {"body": note_text(delivery), "public": False},
        }
        stale = sorted(self.own_tags.difference(tags))
        if stale:
            ticket["remove_tags"] = stale
        group = self.groups.get(delivery.department or "")
        if group is not None:
            ticket["group_id"] = group
        priority = PRIORITIES.get(str(delivery.label.get("priority")))
        if priority:
            ticket["priority"] = priority
        try:
            send(
                self.client,
                "PUT",
                f"{path}.json",
                what=what,
                deadline=delivery.deadline,
                json={"ticket": ticket},
            )
        except SinkRejected as exc:
            if exc.status != 422 or CLOSED not in exc.body:
                raise
            log.warning("%s: the ticket is closed in Zendesk; nothing written", what)
            SINK_SKIPPED.labels(sink=self.name, reason="ticket_closed").inc()

    def _commented(self, path: str, delivery: Delivery, what: str) -> bool:
        """Whether this dispatch's comment is already on the ticket. Newest first: a retry
        comes minutes after the write it repeats, so one page is enough."""
        listing = send(
            self.client,
            "GET",
            f"{path}/comments.json",
            what=what,
            deadline=delivery.deadline,
            params={"sort_order": "desc", "per_page": 100},
        ).json()
        comments = listing.get("comments") if isinstance(listing, dict) else None
        return has_note(comments, note_title(delivery), "body", "plain_body")

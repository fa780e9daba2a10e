"""Freshdesk write-back: group, priority and tags, then a private note.

GET /api/v2/tickets/{id}?include=conversations, PUT /api/v2/tickets/{id} and
POST /api/v2/tickets/{id}/notes, API-key basic auth (`key:X`). A note's body is HTML, so the
note's text (the summary is the model's, from the customer's words) is escaped and its lines
joined with <br>: as plain text its markup would be live in the agents' view, and its lines
would run together.
Freshdesk's `tags` replaces the ticket's tags and there is no "add tags" update, so triage reads
the ticket's tags as they are now (an agent may have changed them since the webhook, and a
re-triage can come days later) and sends them plus its own, less its own of an earlier
routing that no longer apply. Each POST adds a note: a retried delivery (a timeout that in fact
succeeded, or a later sink of the department failing) first looks through the ticket's
conversations for its own note (by dispatch id in the title). The update is made before the
note, so finding the note means it was applied: the retry sends nothing, rather than undo what
an agent changed since (group, priority, a removed tag).

Group and priority are set only while they are what the webhook reported
(`helpdesk.agent_wins`), compared with the ticket as read: one an agent changed since is left,
and named in the note. The simple-mode webhook carries the group's name, not its id, and the
ticket read gives only the id, so the group is compared only when the webhook also sends
`ticket_group_id`; without it the group is set as before.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

from triage.sinks.base import Delivery
from triage.sinks.helpdesk import (
    UNREPORTED,
    Unreported,
    agent_wins,
    has_note,
    left_fields,
    note_text,
    note_title,
    reported_number,
    ticket_number,
    triage_tags,
)
from triage.sinks.http import make_client, send

# Freshdesk: 1 low, 2 medium, 3 high, 4 urgent.
PRIORITIES = {"low": 1, "normal": 2, "high": 3, "urgent": 4}
# What `{{ticket.priority}}` renders in a webhook.
PRIORITY_NAMES = {"low": 1, "medium": 2, "high": 3, "urgent": 4}
# Conversations come oldest first, at most 100 a page. The search for a note stops after this
# many pages (1,000 conversations): a bound on the calls one delivery makes.
CONVERSATION_PAGE = 100
MAX_CONVERSATION_PAGES = 10
# GET /tickets/{id}?include=conversations embeds the first ten.
INCLUDED_CONVERSATIONS = 10


def note_html(delivery: Delivery, left: list[str]) -> str:
    return "<br>".join(html.escape(line) for line in note_text(delivery, left).splitlines())


def reported_priority(metadata: Mapping[str, Any]) -> int | Unreported:
    """The priority the webhook reported, by name ("Medium") or number (2)."""
    value = metadata.get("priority")
    if value is None:
        return UNREPORTED
    text = str(value).strip().lower()
    if text.isascii() and text.isdigit():
        return int(text) if int(text) in PRIORITY_NAMES.values() else UNREPORTED
    return PRIORITY_NAMES.get(text, UNREPORTED)


class FreshdeskWriter:
    name = "freshdesk"
    # The ticket read, every page of conversations the search for the note may read, the
    # update and the note.
    max_requests = 1 + MAX_CONVERSATION_PAGES + 2

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        groups: Mapping[str, int],
        timeout_seconds: float,
        own_tags: Iterable[str] = (),
    ) -> None:
        self.groups = dict(groups)
        # The tags triage may write (helpdesk.possible_tags): those it may also take off.
        self.own_tags = frozenset(own_tags)
        self.client = make_client(
            timeout_seconds, base_url=base_url.rstrip("/"), auth=(api_key, "X")
        )

    def deliver(self, delivery: Delivery) -> None:
        what = f"freshdesk write-back for ticket {delivery.ticket_id}"
        path = f"/api/v2/tickets/{ticket_number(delivery)}"
        # One read for both: the tags as they are now, and (most tickets have fewer than ten)
        # all of the ticket's conversations, so a write-back is three requests as a rule.
        current = send(
            self.client,
            "GET",
            path,
            what=what,
            deadline=delivery.deadline,
            params={"include": "conversations"},
        ).json()
        if not isinstance(current, dict):
            current = {}
        if self._noted(path, delivery, what, current.get("conversations")):
            return
        ours = triage_tags(delivery)
        stale = self.own_tags.difference(ours)
        tags = [str(t) for t in current.get("tags") or [] if str(t) not in stale]
        update: dict[str, Any] = {"tags": list(dict.fromkeys([*tags, *ours]))}
        group = agent_wins(
            "group",
            self.groups.get(delivery.department or ""),
            reported_number(delivery.metadata, "group_id"),
            current.get("group_id"),
        )
        priority = agent_wins(
            "priority",
            PRIORITIES.get(str(delivery.label.get("priority"))),
            reported_priority(delivery.metadata),
            current.get("priority"),
        )
        if group.value is not None:
            update["group_id"] = group.value
        if priority.value is not None:
            update["priority"] = priority.value
        left = left_fields((group, priority), what)
        send(self.client, "PUT", path, what=what, deadline=delivery.deadline, json=update)
        send(
            self.client,
            "POST",
            f"{path}/notes",
            what=what,
            deadline=delivery.deadline,
            json={"body": note_html(delivery, left), "private": True},
        )

    def _noted(self, path: str, delivery: Delivery, what: str, included: Any) -> bool:
        """Whether this dispatch's note is already among the ticket's conversations: those
        the ticket read included, and only if that was a full ten, the paged list."""
        title = note_title(delivery)
        if isinstance(included, list):
            if has_note(included, title, "body_text", "body"):
                return True
            if len(included) < INCLUDED_CONVERSATIONS:
                return False
        for page in range(1, MAX_CONVERSATION_PAGES + 1):
            conversations = send(
                self.client,
                "GET",
                f"{path}/conversations",
                what=what,
                deadline=delivery.deadline,
                params={"page": page, "per_page": CONVERSATION_PAGE},
            ).json()
            if not isinstance(conversations, list):
                return False
            if has_note(conversations, title, "body_text", "body"):
                return True
            if len(conversations) < CONVERSATION_PAGE:
                return False
        return False

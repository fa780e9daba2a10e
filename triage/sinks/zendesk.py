"""Zendesk write-back: triage's tags, then group, priority and a private comment in one update.

API-token auth (`{email}/token:{token}`). Tags go through the ticket's Tags endpoints:
`PUT /api/v2/tickets/{id}/tags` adds triage's tags without replacing the agent's (plain `tags`
in an update would replace them all), and `DELETE /api/v2/tickets/{id}/tags` takes off
triage's own tags of an earlier routing that no longer apply. (`additional_tags` and
`remove_tags` are documented only for the bulk, asynchronous Update Many Tickets, not for a
single ticket's update.) Then `PUT /api/v2/tickets/{id}.json` sets group and priority and adds
the comment.

Group and priority are set only while they are what the webhook reported
(`helpdesk.agent_wins`): the ticket is read (`GET /api/v2/tickets/{id}.json`) just before the
update, and a field an agent changed since is left, and named in the comment. The read is
skipped when the webhook carried neither field (nothing to compare with: both are set).

An agent's change can still land between that read and the update. The update after a read
carries Zendesk's guard against update collisions (`safe_update` with `updated_stamp`, the
ticket's `updated_at` as read): if the ticket was updated since, Zendesk answers 409
"UpdateConflict" and applies nothing. A 409 is transient (`http.TRANSIENT_STATUSES`): the
delivery is retried by the deliver policy, and the retry, not finding its comment, sends the
tags again, reads the ticket again and decides group and priority against what the agent set.
The retry is left to the policy rather than made at once: the conflict means someone is working
on the ticket right now (and their update may set off triggers that update it again), so the
policy's delay lets it settle, and a delivery's requests, and so its lease, stay as they were.
A ticket read without `updated_at` is updated unguarded, as before.

Each update with a comment adds one, and Zendesk has no idempotency key for updates: a retried
delivery (a timeout that in fact succeeded, or a later sink of the department failing) first
looks among the ticket's newest comments for its own (by dispatch id in the title). The comment
goes in the last request, after the tags, so finding it means all of them were applied: the
retry sends nothing. Setting them again would undo what an agent changed since (moved the
ticket to another group, removed a tag), minutes or hours after triage wrote them. A retry that
does not find it sends the tag requests again (adding a tag already there, or removing one
already gone, changes nothing) and then the update.

A closed ticket takes no updates: Zendesk answers 422 "Status: closed prevents ticket update".
That happens to a ticket an agent closed (or merged into another) before triage wrote back,
and to old tickets a reprocess or backfill routes again. There is nothing left to write to, and
nothing a retry could change: at the first write so answered the write-back stops and is
skipped (logged, and counted in `triage_sink_skipped_total`), not dead-lettered, and the
department's other sinks still run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from triage.errors import SinkRejected
from triage.metrics import SINK_SKIPPED
from triage.sinks.base import Delivery
from triage.sinks.helpdesk import (
    UNREPORTED,
    FieldWrite,
    Unreported,
    agent_wins,
    has_note,
    left_fields,
    needs_current,
    note_text,
    note_title,
    reported_number,
    ticket_number,
    triage_tags,
)
from triage.sinks.http import make_client, send

log = logging.getLogger(__name__)

# What Zendesk says, in a 422's validation details, to any update of a closed ticket. Its
# documentation shows it for ticket updates; the Tags endpoints are assumed to answer a closed
# ticket the same way, since adding or removing a tag is an update of the ticket too.
CLOSED = "closed prevents ticket update"

# Triage's priorities are Zendesk's.
PRIORITIES = {"low": "low", "normal": "normal", "high": "high", "urgent": "urgent"}


def reported_priority(metadata: Mapping[str, Any]) -> str | Unreported | None:
    """The priority the webhook reported: `{{ticket.priority}}` renders its name ("High"),
    blank for none. A word that is no Zendesk priority (a translated name) tells nothing."""
    value = metadata.get("priority")
    if value is None:
        return UNREPORTED
    text = str(value).strip().lower()
    if not text:
        return None
    return PRIORITIES.get(text, UNREPORTED)


def collision_guard(current: Mapping[str, Any]) -> dict[str, Any]:
    """What makes an update depend on the ticket as read (`current`): Zendesk refuses it, 409,
    if the ticket was updated after `updated_stamp`. Nothing when it was not read (no decision
    rests on it) or its read gave no `updated_at`."""
    stamp = current.get("updated_at")
    if not isinstance(stamp, str) or not stamp:
        return {}
    return {"safe_update": True, "updated_stamp": stamp}


class ZendeskWriter:
    name = "zendesk"
    # The newest comments, adding tags, removing tags, the ticket's group and priority, the
    # update.
    max_requests = 5

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
        try:
            self._write(path, delivery, what)
        except SinkRejected as exc:
            # Whichever write meets it first: the ones after it would meet it too.
            if exc.status != 422 or CLOSED not in exc.body:
                raise
            log.warning("%s: the ticket is closed in Zendesk; nothing more written", what)
            SINK_SKIPPED.labels(sink=self.name, reason="ticket_closed").inc()

    def _write(self, path: str, delivery: Delivery, what: str) -> None:
        """The tags first, the update with the comment last: the comment is the sign, for a
        retry, that everything before it was applied."""
        tags = triage_tags(delivery)
        # None to add (no intent, no department, no review): no request.
        if tags:
            self._send(delivery, what, "PUT", f"{path}/tags", json={"tags": tags})
        stale = sorted(self.own_tags.difference(tags))
        if stale:
            self._send(delivery, what, "DELETE", f"{path}/tags", json={"tags": stale})
        group, priority, current = self._fields(path, delivery, what)
        left = left_fields((group, priority), what)
        ticket: dict[str, Any] = {"comment": {"body": note_text(delivery, left), "public": False}}
        if group.value is not None:
            ticket["group_id"] = group.value
        if priority.value is not None:
            ticket["priority"] = priority.value
        ticket.update(collision_guard(current))
        self._send(delivery, what, "PUT", f"{path}.json", json={"ticket": ticket})

    def _fields(
        self, path: str, delivery: Delivery, what: str
    ) -> tuple[FieldWrite, FieldWrite, dict[str, Any]]:
        """Group and priority as `agent_wins` decides them, and the ticket as read for that
        (empty: not read)."""
        group = self.groups.get(delivery.department or "")
        priority = PRIORITIES.get(str(delivery.label.get("priority")))
        was_group = reported_number(delivery.metadata, "group_id")
        was_priority = reported_priority(delivery.metadata)
        current: dict[str, Any] = {}
        if needs_current(group, was_group) or needs_current(priority, was_priority):
            # Read after the tags, just before the update: the narrowest window for an
            # agent's change to fall between the two.
            answer = send(
                self.client, "GET", f"{path}.json", what=what, deadline=delivery.deadline
            ).json()
            found = answer.get("ticket") if isinstance(answer, dict) else None
            current = found if isinstance(found, dict) else {}
        return (
            agent_wins("group", group, was_group, current.get("group_id")),
            agent_wins("priority", priority, was_priority, current.get("priority")),
            current,
        )

    def _send(self, delivery: Delivery, what: str, method: str, url: str, **kwargs: Any) -> None:
        send(self.client, method, url, what=what, deadline=delivery.deadline, **kwargs)

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

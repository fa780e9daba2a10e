"""Write-back leaves a group (queue) or priority an agent changed after the webhook triage
routed: a late delivery, or a reprocess of old tickets, must not undo a person's decision.
Triage still adds its tags and its note, which says what it left. Real local HTTP servers
stand in for each helpdesk's REST API."""

from __future__ import annotations

import logging

import pytest

from tests.integration.test_sinks import (
    FD_TICKET,
    NOTE,
    ZD_COMMENTS,
    ZD_TAGS,
    ZD_UPDATE,
    delivery,
    dh_writer,
)
from tests.support.fakehttp import Reply
from triage.errors import TransientError
from triage.sinks.freshdesk import FreshdeskWriter
from triage.sinks.zendesk import ZendeskWriter

ZD_TICKET = ("GET", "/api/v2/tickets/101.json")


# What the Zendesk trigger rendered: {{ticket.group.id}}, {{ticket.priority}}.
ZD_REPORTED = {"tags": ["vip"], "group_id": "360009", "priority": "Normal"}


def zd_writer(url: str) -> ZendeskWriter:
    return ZendeskWriter(
        url, email="b", api_token="t", groups={"billing": 360001}, timeout_seconds=2
    )


def test_zendesk_leaves_a_group_an_agent_changed_and_still_sets_priority_tags_and_comment(
    zd_api, zd, caplog
):
    ticket = zd.tickets[101]
    # Since the webhook, an agent moved the ticket; its priority is as reported.
    ticket.group_id, ticket.priority = 360777, "normal"
    with caplog.at_level(logging.INFO, logger="triage.sinks"):
        zd_writer(zd_api.url).deliver(delivery(metadata=ZD_REPORTED))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_TICKET, ZD_UPDATE]
    assert (ticket.group_id, ticket.priority) == (360777, "high")
    assert ticket.tags == ["vip", "triage_refund", "triage_billing"]
    assert [c["body"] for c in ticket.comments] == [f"{NOTE}\ngroup left as an agent set it"]
    assert "group_id" not in zd_api.requests[-1].json()["ticket"]
    logged = [r.getMessage() for r in caplog.records if "left as an agent" in r.getMessage()]
    assert logged == [
        "zendesk write-back for ticket 42: group left as an agent set it since the webhook"
    ]
    # Customer text (the summary) stays out of the log.
    assert not any("charged twice" in r.getMessage() for r in caplog.records)


def test_zendesk_sets_group_and_priority_still_as_the_webhook_reported_them(zd_api, zd):
    ticket = zd.tickets[101]
    ticket.group_id, ticket.priority = 360009, "normal"
    zd_writer(zd_api.url).deliver(delivery(metadata=ZD_REPORTED))
    assert (ticket.group_id, ticket.priority) == (360001, "high")
    assert [c["body"] for c in ticket.comments] == [NOTE]


def test_zendesk_leaves_a_priority_an_agent_set_on_a_ticket_that_had_none(zd_api, zd):
    ticket = zd.tickets[101]
    # The trigger rendered blank for both: no group, no priority then. An agent set urgent.
    ticket.priority = "urgent"
    zd_writer(zd_api.url).deliver(delivery(metadata={"group_id": "", "priority": ""}))
    assert (ticket.group_id, ticket.priority) == (360001, "urgent")
    assert ticket.comments[-1]["body"].endswith("\npriority left as an agent set it")


def test_zendesk_leaves_both_when_an_agent_changed_both_and_still_comments(zd_api, zd):
    ticket = zd.tickets[101]
    ticket.group_id, ticket.priority = 360777, "low"
    zd_writer(zd_api.url).deliver(delivery(metadata=ZD_REPORTED))
    assert (ticket.group_id, ticket.priority) == (360777, "low")
    sent = zd_api.requests[-1].json()["ticket"]
    assert sent.keys() == {"comment", "safe_update", "updated_stamp"}
    assert ticket.comments[-1]["body"].endswith(
        "\ngroup left as an agent set it\npriority left as an agent set it"
    )


# --- an agent's change between the read and the update (Zendesk's safe_update) -----------------


def test_zendesk_update_after_its_read_is_guarded_by_the_updated_at_it_read(zd_api, zd):
    ticket = zd.tickets[101]
    ticket.group_id, ticket.priority = 360009, "normal"
    read: list[str] = []
    zd.after_next_read(101, lambda: read.append(ticket.stamp))
    zd_writer(zd_api.url).deliver(delivery(metadata=ZD_REPORTED))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_TICKET, ZD_UPDATE]
    sent = zd_api.requests[-1].json()["ticket"]
    assert (sent["safe_update"], sent["updated_stamp"]) == (True, read[0])
    assert (ticket.group_id, ticket.priority) == (360001, "high")
    assert [c["body"] for c in ticket.comments] == [NOTE]


def test_zendesk_agents_group_change_between_its_read_and_its_update_survives_the_retry(zd_api, zd):
    # The webhook's group and priority are still the ticket's when it is read; right after,
    # an agent moves the ticket. Unguarded, the update would move it back to billing.
    ticket = zd.tickets[101]
    ticket.group_id, ticket.priority = 360009, "normal"
    zd.after_next_read(101, lambda: zd.update_by_agent(101, group_id=360777))
    writer = zd_writer(zd_api.url)
    with pytest.raises(TransientError, match="409") as refused:
        writer.deliver(delivery(metadata=ZD_REPORTED))
    assert "UpdateConflict" in refused.value.quoted
    # Zendesk applied nothing of the update: the agent's group, no comment.
    assert (ticket.group_id, ticket.priority, ticket.comments) == (360777, "normal", [])
    # The deliver policy's retry: no comment found, tags again, a new read, a new decision.
    writer.deliver(delivery(metadata=ZD_REPORTED))
    once = [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_TICKET, ZD_UPDATE]
    assert zd_api.calls() == once * 2
    assert (ticket.group_id, ticket.priority) == (360777, "high")
    assert ticket.tags == ["vip", "triage_refund", "triage_billing"]
    assert [c["body"] for c in ticket.comments] == [f"{NOTE}\ngroup left as an agent set it"]


def test_zendesk_without_a_read_sends_its_update_unguarded(zd_api, zd):
    # The webhook carried neither group nor priority: nothing read, nothing to guard.
    zd_writer(zd_api.url).deliver(delivery(metadata={"tags": ["vip"]}))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_UPDATE]
    sent = zd_api.requests[-1].json()["ticket"]
    assert "safe_update" not in sent and "updated_stamp" not in sent
    assert (zd.tickets[101].group_id, zd.tickets[101].priority) == (360001, "high")


def test_zendesk_read_without_updated_at_sends_its_update_unguarded(zd_api, zd):
    zd_api.script(*ZD_TICKET, Reply(body={"ticket": {"group_id": 360009, "priority": "normal"}}))
    zd_writer(zd_api.url).deliver(delivery(metadata=ZD_REPORTED))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_TICKET, ZD_UPDATE]
    sent = zd_api.requests[-1].json()["ticket"]
    assert sent.keys() == {"group_id", "priority", "comment"}


def test_freshdesk_leaves_a_priority_an_agent_raised_and_still_sets_group_tags_and_note(api):
    # The webhook said Medium in group 43000009; an agent has since made it urgent (4).
    now = {"id": 202, "tags": ["vip"], "group_id": 43000009, "priority": 4, "conversations": []}
    api.script("GET", FD_TICKET, Reply(body=now))
    writer = FreshdeskWriter(api.url, api_key="k", groups={"billing": 43}, timeout_seconds=2)
    reported = {"tags": ["vip"], "priority": "Medium", "group": "Triage", "group_id": 43000009}
    writer.deliver(delivery("freshdesk", "202", metadata=reported))
    _get, update, note = api.requests
    assert update.json() == {"tags": ["vip", "triage_refund", "triage_billing"], "group_id": 43}
    assert note.json()["body"].endswith("<br>priority left as an agent set it")


def test_freshdesk_sets_the_group_when_the_webhook_named_it_without_its_id(api):
    # Simple mode carries the group's name; the ticket read gives only ids: nothing to
    # compare, so the group is set as before. The priority (number 2, as reported) is set.
    now = {"id": 202, "tags": [], "group_id": 43000777, "priority": 2, "conversations": []}
    api.script("GET", FD_TICKET, Reply(body=now))
    writer = FreshdeskWriter(api.url, api_key="k", groups={"billing": 43}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202", metadata={"group": "Triage", "priority": 2}))
    _get, update, note = api.requests
    assert (update.json()["group_id"], update.json()["priority"]) == (43, 3)
    assert "left as an agent" not in note.json()["body"]


def test_django_helpdesk_leaves_a_queue_an_agent_changed_and_patches_the_priority(api):
    now = {"id": 303, "queue": 5, "priority": 3, "followup_set": []}
    api.script("GET", "/api/tickets/303/", Reply(body=now))
    reported = {"queue_id": 2, "queue_slug": "support", "priority": 3}
    dh_writer(api).deliver(delivery("django-helpdesk", "303", metadata=reported))
    _get, patch, followup = api.requests
    assert patch.json() == {"priority": 2}
    assert followup.json()["comment"] == f"{NOTE}\nqueue left as an agent set it"


def test_django_helpdesk_patches_nothing_when_an_agent_changed_both_but_posts_its_followup(api):
    now = {"id": 303, "queue": 5, "priority": 1, "followup_set": []}
    api.script("GET", "/api/tickets/303/", Reply(body=now))
    reported = {"queue_id": 2, "priority": 3}
    dh_writer(api).deliver(delivery("django-helpdesk", "303", metadata=reported))
    assert api.calls() == [("GET", "/api/tickets/303/"), ("POST", "/api/followups/")]
    assert (
        api.requests[-1]
        .json()["comment"]
        .endswith("\nqueue left as an agent set it\npriority left as an agent set it")
    )

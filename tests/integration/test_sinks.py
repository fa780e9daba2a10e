"""Write-back sinks against a real local HTTP server standing in for each helpdesk's REST API:
exact calls, errors named transient or permanent, and signatures a reference library accepts."""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from tests.support.fakehttp import ZENDESK_CLOSED, FakeApi, Reply
from triage.config import PROJECT_ROOT, Settings, load_config
from triage.errors import ConfigError, PermanentError, RateLimited, TransientError
from triage.sinks.base import Delivery
from triage.sinks.django_helpdesk import DjangoHelpdeskWriter
from triage.sinks.freshdesk import FreshdeskWriter
from triage.sinks.helpdesk import HelpdeskWriteBack, possible_tags
from triage.sinks.loader import build_sink_table, load_sinks_file
from triage.sinks.webhook import WebhookSink
from triage.sinks.zendesk import ZendeskWriter

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"sink-test-secret-0123456789abcdef").decode()


LABEL = {
    "intent": "refund",
    "department": "billing",
    "priority": "high",
    "language": "en",
    "sentiment": "negative",
    "confidence": 0.93,
    "summary": "Customer was charged twice.",
    "model": "local",
}


ROUTED_AT = datetime(2026, 11, 27, 9, 30, 5, 250000, tzinfo=UTC)


def delivery(source: str = "zendesk", external_id: str = "101", **changes: Any) -> Delivery:
    base = Delivery(
        ticket_id=42,
        dispatch_id=7,
        source=source,
        external_id=external_id,
        route="dept.billing",
        department="billing",
        needs_review=False,
        review_reason=None,
        label=LABEL,
        metadata={"tags": ["vip"]},
        routed_at=ROUTED_AT,
        # Far off: these tests are about the requests, not the deadline's cut.
        deadline=time.monotonic() + 60,
    )
    return replace(base, **changes)


NOTE = (
    "[triage] dispatch 7: routed to billing\n"
    "intent refund, priority high, sentiment negative, language en, confidence 0.93\n"
    "summary: Customer was charged twice."
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- exact write-back calls -------------------------------------------------------------------


ZD_COMMENTS = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
ZD_TAGS = "/api/v2/tickets/101/tags"
ZD_UPDATE = ("PUT", "/api/v2/tickets/101.json")
# Adding tags, removing the stale ones, then the update with the comment.
ZD_WRITES = [("PUT", ZD_TAGS), ("DELETE", ZD_TAGS), ZD_UPDATE]


def test_zendesk_adds_its_tags_beside_the_agents_then_sets_group_priority_and_private_comment(
    zd_api, zd
):
    # Zendesk documents additional_tags only for the bulk Update Many Tickets, not for the
    # update of one ticket. Its Tags endpoint adds without replacing.
    zd.tickets[101].tags.append("escalated")
    writer = ZendeskWriter(
        zd_api.url,
        email="bot@acme.test",
        api_token="tok",
        groups={"billing": 360001},
        timeout_seconds=2,
    )
    writer.deliver(delivery("zendesk", "101"))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_UPDATE]
    _listing, tags, update = zd_api.requests
    assert tags.headers["authorization"] == basic("bot@acme.test/token", "tok")
    assert tags.json() == {"tags": ["triage_refund", "triage_billing"]}
    # No tags in the update: plain `tags` would replace the agent's.
    assert update.json() == {
        "ticket": {
            "group_id": 360001,
            "priority": "high",
            "comment": {"body": NOTE, "public": False},
        }
    }
    ticket = zd.tickets[101]
    assert ticket.tags == ["vip", "escalated", "triage_refund", "triage_billing"]
    assert (ticket.group_id, ticket.priority) == (360001, "high")
    assert [(c["body"], c["public"]) for c in ticket.comments] == [(NOTE, False)]


FD_TICKET = "/api/v2/tickets/202?include=conversations"


def test_freshdesk_updates_ticket_then_adds_private_note(api):
    ticket = {"id": 202, "tags": ["vip"], "conversations": []}
    api.script("GET", FD_TICKET, Reply(body=ticket))
    writer = FreshdeskWriter(api.url, api_key="fd-key", groups={"billing": 43}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202"))
    assert api.calls() == [
        ("GET", FD_TICKET),
        ("PUT", "/api/v2/tickets/202"),
        ("POST", "/api/v2/tickets/202/notes"),
    ]
    _ticket, update, note = api.requests
    assert update.headers["authorization"] == basic("fd-key", "X")
    assert update.json() == {
        "tags": ["vip", "triage_refund", "triage_billing"],
        "group_id": 43,
        "priority": 3,
    }
    assert note.json() == {"body": NOTE.replace("\n", "<br>"), "private": True}


def test_freshdesk_note_is_html_with_the_summarys_markup_escaped(api):
    # Freshdesk renders a note's body as HTML; the summary is the model's, from customer text.
    summary = 'Says <a href="https://evil.example/login">verify here</a> & "refund"'
    label = {**LABEL, "summary": summary}
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202", label=label))
    note = next(r for r in api.requests if r.method == "POST").json()
    assert note["body"].split("<br>") == [
        "[triage] dispatch 7: routed to billing",
        "intent refund, priority high, sentiment negative, language en, confidence 0.93",
        "summary: Says &lt;a href=&quot;https://evil.example/login&quot;&gt;verify here&lt;/a&gt;"
        " &amp; &quot;refund&quot;",
    ]


def dh_writer(api: FakeApi) -> DjangoHelpdeskWriter:
    return DjangoHelpdeskWriter(
        api.url,
        username="triage",
        password="pw",
        queues={"tech_support": "support"},
        queue_ids={"billing": 1, "support": 2},
        timeout_seconds=2,
    )


def test_django_helpdesk_patches_queue_and_priority_and_posts_private_followup(api):
    api.script("GET", "/api/tickets/303/", Reply(body={"id": 303, "followup_set": []}))
    dh_writer(api).deliver(delivery("django-helpdesk", "303"))
    assert api.calls() == [
        ("GET", "/api/tickets/303/"),
        ("PATCH", "/api/tickets/303/"),
        ("POST", "/api/followups/"),
    ]
    _get, patch, followup = api.requests
    assert patch.headers["authorization"] == basic("triage", "pw")
    assert patch.json() == {"queue": 1, "priority": 2}
    assert followup.json() == {
        "ticket": 303,
        "title": "[triage] dispatch 7: routed to billing",
        "comment": NOTE,
        "public": False,
    }


def test_django_helpdesk_maps_department_to_queue_slug_then_id(api):
    dh_writer(api).deliver(delivery("django-helpdesk", "303", department="tech_support"))
    assert api.requests[1].json() == {"queue": 2, "priority": 2}


def test_django_helpdesk_retried_delivery_neither_posts_the_note_twice_nor_patches_again(api):
    # Its follow-up is there, so its PATCH (made first) was applied; an agent may have moved
    # the ticket to another queue since, and patching again would move it back.
    existing = {"id": 900, "title": "[triage] dispatch 7: routed to billing", "public": False}
    ticket = {"id": 303, "queue": 2, "priority": 3, "followup_set": [existing]}
    api.script("GET", "/api/tickets/303/", Reply(body=ticket))
    dh_writer(api).deliver(delivery("django-helpdesk", "303"))
    assert api.calls() == [("GET", "/api/tickets/303/")]


def test_webhook_sink_posts_signed_json_that_standard_webhooks_verifies(api):
    sink = WebhookSink("crm", api.url + "/hooks/triage", secret=WEBHOOK_SECRET, timeout_seconds=2)
    sink.deliver(delivery())
    assert api.calls() == [("POST", "/hooks/triage")]
    sent = api.requests[0]
    assert sent.headers["webhook-id"] == "dispatch_7"
    payload = Webhook(WEBHOOK_SECRET).verify(sent.body.decode(), sent.headers)
    assert payload["type"] == "ticket.routed"
    assert payload["data"]["ticket_id"] == 42 and payload["data"]["label"] == LABEL
    assert payload["data"]["external_id"] == "101" and payload["data"]["department"] == "billing"


def test_a_retried_webhook_sends_the_same_body_timestamped_when_the_ticket_was_routed(api):
    # Standard Webhooks: the attempt's time is the webhook-timestamp header, new on every
    # attempt; the body's timestamp is the event's, the same on every retry.
    sink = WebhookSink("crm", api.url + "/hooks/triage", secret=WEBHOOK_SECRET, timeout_seconds=2)
    sink.deliver(delivery())
    sink.deliver(delivery())
    first, retry = api.requests
    assert first.body == retry.body
    assert first.json()["timestamp"] == "2026-11-27T09:30:05.250000Z"
    assert abs(int(retry.headers["webhook-timestamp"]) - time.time()) < 60
    assert Webhook(WEBHOOK_SECRET).verify(retry.body.decode(), retry.headers)["type"] == (
        "ticket.routed"
    )


def test_helpdesk_sink_writes_back_to_the_tickets_source_only(api):
    zendesk = ZendeskWriter(api.url, email="b", api_token="t", groups={}, timeout_seconds=2)
    sink = HelpdeskWriteBack({"zendesk": zendesk})
    sink.deliver(delivery("generic", "g-1"))
    assert api.calls() == []
    sink.deliver(delivery("zendesk", "101"))
    assert ("PUT", "/api/v2/tickets/101.json") in api.calls()


# --- failures are named by meaning; sinks do not retry ------------------------------------------


def zendesk(api: FakeApi, timeout: float = 2) -> ZendeskWriter:
    return ZendeskWriter(api.url, email="b", api_token="t", groups={}, timeout_seconds=timeout)


def test_503_is_transient(api):
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=503, body={"error": "down"}))
    with pytest.raises(TransientError, match="503"):
        zendesk(api).deliver(delivery())
    assert api.calls()[-1] == ("PUT", "/api/v2/tickets/101.json")


def test_429_is_rate_limited_with_retry_after(api):
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimited) as err:
        zendesk(api).deliver(delivery())
    assert err.value.retry_after == 7.0


def test_timeout_is_transient(api):
    api.script("PUT", "/api/v2/tickets/101.json", Reply(delay=1.5))
    with pytest.raises(TransientError, match="timed out"):
        zendesk(api, timeout=0.3).deliver(delivery())


def test_connection_refused_is_transient():
    writer = ZendeskWriter(
        "http://127.0.0.1:9", email="b", api_token="t", groups={}, timeout_seconds=1
    )
    with pytest.raises(TransientError):
        writer.deliver(delivery())


def test_400_is_permanent(api):
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=400, body={"error": "bad"}))
    with pytest.raises(PermanentError, match="400"):
        zendesk(api).deliver(delivery())
    assert api.calls()[-1] == ("PUT", "/api/v2/tickets/101.json")


def test_404_from_freshdesk_note_is_permanent(api):
    api.script("POST", "/api/v2/tickets/202/notes", Reply(status=404))
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2)
    with pytest.raises(PermanentError):
        writer.deliver(delivery("freshdesk", "202"))


# --- config/sinks.yaml --------------------------------------------------------------------------


@pytest.fixture()
def app_config():
    return load_config(Settings(config_dir=PROJECT_ROOT / "config"))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sinks.yaml"
    path.write_text(text)
    return path


def test_sink_table_from_yaml_routes_departments_to_their_sinks(
    api, tmp_path, app_config, monkeypatch
):
    monkeypatch.setenv("T_ZD_TOKEN", "tok")
    monkeypatch.setenv("T_HOOK_SECRET", WEBHOOK_SECRET)
    path = write_yaml(
        tmp_path,
        f"""
helpdesks:
  zendesk: {{base_url: "{api.url}", email: bot@acme.test, api_token_env: T_ZD_TOKEN,
            groups: {{billing: 360001}}}}
webhooks:
  crm: {{url: "{api.url}/hooks", secret_env: T_HOOK_SECRET}}
departments:
  billing: [helpdesk, webhook:crm]
  sales: [queue]
default: [helpdesk]
""",
    )
    table = build_sink_table(path, app_config)
    assert [s.name for s in table.for_department("billing")] == ["helpdesk", "webhook:crm"]
    assert table.for_department("sales") == ()
    assert [s.name for s in table.for_department("general")] == ["helpdesk"]
    for sink in table.for_department("billing"):
        sink.deliver(delivery())
    assert [c for c in api.calls() if c[0] != "GET"] == [*ZD_WRITES, ("POST", "/hooks")]


def _skipped_closed() -> float:
    labels = {"sink": "zendesk", "reason": "ticket_closed"}
    return REGISTRY.get_sample_value("triage_sink_skipped_total", labels) or 0.0


def test_a_ticket_closed_in_zendesk_skips_the_write_back_and_the_departments_other_sinks_run(
    zd_api, zd, tmp_path, app_config, monkeypatch
):
    # An agent closed (or merged) the ticket before triage wrote back, or a reprocess routed an
    # old, closed one: Zendesk takes no update to it, and no retry changes that. Not a reason
    # to dead-letter a correctly routed ticket, nor to hold back the department's webhook.
    monkeypatch.setenv("T_ZD_TOKEN", "tok")
    monkeypatch.setenv("T_HOOK_SECRET", WEBHOOK_SECRET)
    path = write_yaml(
        tmp_path,
        f"""
helpdesks:
  zendesk: {{base_url: "{zd_api.url}", email: bot@acme.test, api_token_env: T_ZD_TOKEN}}
webhooks:
  crm: {{url: "{zd_api.url}/hooks", secret_env: T_HOOK_SECRET}}
departments:
  billing: [helpdesk, webhook:crm]
""",
    )
    zd.tickets[101].status = "closed"
    before = _skipped_closed()
    for sink in build_sink_table(path, app_config).for_department("billing"):
        sink.deliver(delivery())
    # The first write met the closed ticket: none after it was tried.
    assert [c for c in zd_api.calls() if c[0] != "GET"] == [("PUT", ZD_TAGS), ("POST", "/hooks")]
    assert _skipped_closed() == before + 1
    assert (zd.tickets[101].tags, zd.tickets[101].comments) == (["vip"], [])


def test_a_ticket_closed_after_triage_added_its_tags_skips_the_update(zd_api, zd):
    # Closed by an agent between the tag requests and the update.
    zd_api.script(*ZD_UPDATE, Reply(status=422, body=ZENDESK_CLOSED))
    before = _skipped_closed()
    zendesk(zd_api).deliver(delivery())
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("PUT", ZD_TAGS), ZD_UPDATE]
    assert _skipped_closed() == before + 1
    assert (zd.tickets[101].tags, zd.tickets[101].comments) == (
        ["vip", "triage_refund", "triage_billing"],
        [],
    )


def test_any_other_422_from_zendesk_is_still_permanent(api):
    invalid = {
        "error": "RecordInvalid",
        "description": "Record validation errors",
        "details": {"group_id": [{"description": "Group: is invalid"}]},
    }
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=422, body=invalid))
    before = _skipped_closed()
    with pytest.raises(PermanentError, match="422") as info:
        zendesk(api).deliver(delivery())
    # The helpdesk's answer is kept for the record (not in str(), which logs show).
    assert "Group: is invalid" in info.value.message
    assert _skipped_closed() == before


def test_secrets_read_with_a_trailing_newline_are_used_without_it(
    api, tmp_path, app_config, monkeypatch
):
    # As a secret mounted from a file arrives; with the newline every write-back got 401 and
    # every webhook a signature its receiver refuses.
    monkeypatch.setenv("T_ZD_TOKEN", "tok\n")
    monkeypatch.setenv("T_HOOK_SECRET", WEBHOOK_SECRET + "\n")
    path = write_yaml(
        tmp_path,
        f"""
helpdesks:
  zendesk: {{base_url: "{api.url}", email: bot@acme.test, api_token_env: T_ZD_TOKEN}}
webhooks:
  crm: {{url: "{api.url}/hooks", secret_env: T_HOOK_SECRET}}
default: [helpdesk, webhook:crm]
""",
    )
    for sink in build_sink_table(path, app_config).for_department("billing"):
        sink.deliver(delivery())
    put = next(r for r in api.requests if r.method == "PUT")
    assert put.headers["authorization"] == basic("bot@acme.test/token", "tok")
    hook = next(r for r in api.requests if r.method == "POST")
    payload = Webhook(WEBHOOK_SECRET).verify(hook.body.decode(), hook.headers)
    assert payload["data"]["ticket_id"] == 42


def test_a_blank_secret_is_a_config_error(tmp_path, app_config, monkeypatch):
    monkeypatch.setenv("T_HOOK_SECRET", " \n")
    text = "webhooks:\n  crm: {url: 'http://x', secret_env: T_HOOK_SECRET}\n"
    with pytest.raises(ConfigError, match="T_HOOK_SECRET is not set"):
        build_sink_table(write_yaml(tmp_path, text), app_config)


def test_unknown_sink_name_is_a_config_error_naming_the_field(tmp_path, app_config):
    path = write_yaml(tmp_path, "departments:\n  billing: [webhook:nope]\n")
    with pytest.raises(ConfigError, match=r"departments\.billing: unknown sink 'webhook:nope'"):
        build_sink_table(path, app_config)


def test_unknown_department_and_missing_secret_are_config_errors(tmp_path, app_config):
    with pytest.raises(ConfigError, match=r"departments\.nowhere"):
        build_sink_table(write_yaml(tmp_path, "departments:\n  nowhere: [queue]\n"), app_config)
    text = "webhooks:\n  crm: {url: 'http://x', secret_env: T_UNSET_SECRET_XYZ}\n"
    with pytest.raises(ConfigError, match="T_UNSET_SECRET_XYZ"):
        build_sink_table(write_yaml(tmp_path, text), app_config)


def test_shipped_example_file_is_valid():
    spec = load_sinks_file(PROJECT_ROOT / "config" / "sinks.example.yaml")
    assert spec.helpdesks.django_helpdesk is not None
    assert spec.departments["billing"] == ["helpdesk", "webhook:crm"]


# --- a retried delivery writes its note once ----------------------------------------------------


def test_zendesk_retried_delivery_neither_comments_twice_nor_updates_the_ticket_again(zd_api, zd):
    # Its comment is there, and it went in the last request, after the tags and with group
    # and priority: all were applied. An agent changed them since; setting them again would
    # undo that.
    writer = ZendeskWriter(
        zd_api.url, email="b", api_token="t", groups={"billing": 1}, timeout_seconds=2
    )
    writer.deliver(delivery())
    ticket = zd.tickets[101]
    assert ticket.tags == ["vip", "triage_refund", "triage_billing"]
    ticket.group_id, ticket.tags = 2, ["vip", "triage_billing"]
    sent = len(zd_api.requests)
    writer.deliver(delivery())
    assert zd_api.calls()[sent:] == [("GET", ZD_COMMENTS)]
    assert (ticket.group_id, ticket.tags) == (2, ["vip", "triage_billing"])
    assert len(ticket.comments) == 1


def test_zendesk_retry_after_a_failed_update_sends_the_tags_again_and_comments_once(zd_api, zd):
    # The tag requests were applied, the update was not: no comment, so the retry writes
    # everything again. Adding a tag already there and removing one already gone change
    # nothing.
    zd.tickets[101].tags.append("triage_technical")
    zd_api.script(*ZD_UPDATE, Reply(status=503, body={"error": "down"}))
    writer = ZendeskWriter(
        zd_api.url, email="b", api_token="t", groups={}, timeout_seconds=2, own_tags=OWN_TAGS
    )
    with pytest.raises(TransientError, match="503"):
        writer.deliver(delivery())
    ticket = zd.tickets[101]
    assert (ticket.tags, ticket.comments) == (["vip", "triage_refund", "triage_billing"], [])
    writer.deliver(delivery())
    assert zd_api.calls() == [("GET", ZD_COMMENTS), *ZD_WRITES] * 2
    assert ticket.tags == ["vip", "triage_refund", "triage_billing"]
    assert [c["body"] for c in ticket.comments] == [NOTE]


def test_zendesk_with_no_tag_of_its_own_to_add_only_removes_the_stale_ones(zd_api, zd):
    zd.tickets[101].tags.append("triage_refund")
    writer = ZendeskWriter(
        zd_api.url, email="b", api_token="t", groups={}, timeout_seconds=2, own_tags=OWN_TAGS
    )
    # No intent, no department, no review: no tag to add.
    writer.deliver(delivery(department=None, route="queue", label={**LABEL, "intent": None}))
    assert zd_api.calls() == [("GET", ZD_COMMENTS), ("DELETE", ZD_TAGS), ZD_UPDATE]
    assert zd.tickets[101].tags == ["vip"]


def test_zendesk_comment_of_another_dispatch_does_not_count(api):
    other = {"id": 5, "body": NOTE.replace("dispatch 7:", "dispatch 70:"), "public": False}
    listing = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
    api.script("GET", listing, Reply(body={"comments": [other]}))
    zendesk(api).deliver(delivery())
    assert api.requests[-1].json()["ticket"]["comment"] == {"body": NOTE, "public": False}


def test_freshdesk_retried_delivery_neither_posts_the_note_twice_nor_updates_again(api):
    ours = {"id": 900, "body_text": NOTE, "private": True}
    api.script("GET", FD_TICKET, Reply(body={"id": 202, "tags": [], "conversations": [ours]}))
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202"))
    # The update is made before the note: it was applied, and an agent may have changed group,
    # priority or tags since.
    assert api.calls() == [("GET", FD_TICKET)]


def test_freshdesk_looks_past_the_first_ten_conversations_for_its_note(api):
    page = "/api/v2/tickets/202/conversations?page={}&per_page=100"
    filler = [{"id": i, "body_text": f"reply {i}", "private": False} for i in range(100)]
    ours = {"id": 900, "body_text": NOTE, "private": True}
    api.script("GET", FD_TICKET, Reply(body={"id": 202, "tags": [], "conversations": filler[:10]}))
    api.script("GET", page.format(1), Reply(body=filler))
    api.script("GET", page.format(2), Reply(body=[ours]))
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202"))
    assert ("POST", "/api/v2/tickets/202/notes") not in api.calls()
    assert ("PUT", "/api/v2/tickets/202") not in api.calls()


def test_freshdesk_keeps_the_tags_an_agent_set_after_the_webhook(api):
    # The webhook carried ["vip"]; since then an agent removed it and added "escalated".
    now = {"id": 202, "tags": ["escalated", "triage_refund"], "conversations": []}
    api.script("GET", FD_TICKET, Reply(body=now))
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2)
    writer.deliver(delivery("freshdesk", "202"))
    put = next(r for r in api.requests if r.method == "PUT")
    assert put.json()["tags"] == ["escalated", "triage_refund", "triage_billing"]


# --- a ticket routed again loses triage's tags of the earlier routing ---------------------------

OWN_TAGS = possible_tags(["refund", "technical"], ["billing", "tech_support"])
REROUTED = {**LABEL, "intent": "technical", "department": "tech_support", "priority": "normal"}


def rerouted() -> Delivery:
    # New customer text (or a reprocess) routed the ticket anew: a new dispatch.
    return delivery(dispatch_id=8, department="tech_support", label=REROUTED)


def test_zendesk_takes_off_its_tags_of_an_earlier_routing_and_keeps_the_agents(zd_api, zd):
    zd.tickets[101].tags = ["vip", "triage_refund", "triage_billing", "triage_needed"]
    writer = ZendeskWriter(
        zd_api.url, email="b", api_token="t", groups={}, timeout_seconds=2, own_tags=OWN_TAGS
    )
    writer.deliver(rerouted())
    assert zd_api.calls() == [("GET", ZD_COMMENTS), *ZD_WRITES]
    # Left, a view on triage_billing would still show a ticket now with tech_support.
    removed = zd_api.requests[2].json()["tags"]
    assert removed == ["triage_billing", "triage_refund", "triage_review"]
    # triage_needed is not a tag triage writes: an agent's, kept.
    kept = ["vip", "triage_needed", "triage_technical", "triage_tech_support"]
    assert zd.tickets[101].tags == kept


def test_freshdesk_takes_off_its_tags_of_an_earlier_routing_and_keeps_the_agents(api):
    now = {"id": 202, "tags": ["vip", "triage_refund", "triage_billing", "triage_needed"]}
    api.script("GET", FD_TICKET, Reply(body={**now, "conversations": []}))
    writer = FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2, own_tags=OWN_TAGS)
    writer.deliver(
        delivery("freshdesk", "202", dispatch_id=8, department="tech_support", label=REROUTED)
    )
    put = next(r for r in api.requests if r.method == "PUT")
    # triage_needed is not a tag triage writes: an agent's, kept.
    assert put.json()["tags"] == ["vip", "triage_needed", "triage_technical", "triage_tech_support"]


def test_the_sink_table_gives_the_writers_the_taxonomys_tags(
    api, tmp_path, app_config, monkeypatch
):
    monkeypatch.setenv("T_ZD_TOKEN", "tok")
    text = (
        f"helpdesks:\n  zendesk: {{base_url: '{api.url}', email: b, api_token_env: T_ZD_TOKEN}}\n"
    )
    table = build_sink_table(write_yaml(tmp_path, text + "default: [helpdesk]\n"), app_config)
    for sink in table.for_department("tech_support"):
        sink.deliver(rerouted())
    (removal,) = [r for r in api.requests if r.method == "DELETE"]
    removed = removal.json()["tags"]
    assert "triage_billing" in removed and "triage_refund" in removed
    assert "triage_tech_support" not in removed and "triage_technical" not in removed


# --- the ticket id goes into a URL path ---------------------------------------------------------


@pytest.mark.parametrize("source", ["zendesk", "freshdesk", "django-helpdesk"])
def test_a_non_numeric_external_id_is_permanent_and_nothing_is_sent(api, source):
    writers = {
        "zendesk": zendesk(api),
        "freshdesk": FreshdeskWriter(api.url, api_key="k", groups={}, timeout_seconds=2),
        "django-helpdesk": dh_writer(api),
    }
    with pytest.raises(PermanentError, match=r"not a .* ticket number"):
        writers[source].deliver(delivery(source, "1/../../users/me"))
    assert api.calls() == []


def test_a_group_for_a_misspelt_department_is_a_config_error(tmp_path, app_config, monkeypatch):
    monkeypatch.setenv("T_ZD_TOKEN", "tok")
    text = (
        "helpdesks:\n  zendesk: {base_url: 'https://acme.zendesk.com', email: b,"
        " api_token_env: T_ZD_TOKEN, groups: {biling: 1}}\n"
    )
    with pytest.raises(ConfigError, match=r"helpdesks\.zendesk\.groups\.biling: not a department"):
        build_sink_table(write_yaml(tmp_path, text), app_config)


def test_a_django_helpdesk_queue_slug_without_an_id_is_a_config_error(
    tmp_path, app_config, monkeypatch
):
    monkeypatch.setenv("T_DH_PW", "pw")
    text = (
        "helpdesks:\n  django-helpdesk: {base_url: 'http://hd.internal', username: t,"
        " password_env: T_DH_PW, queue_ids: {billing: 1}, queues: {tech_support: suport}}\n"
    )
    with pytest.raises(ConfigError, match=r"queues\.tech_support: queue 'suport'"):
        build_sink_table(write_yaml(tmp_path, text), app_config)


@pytest.mark.parametrize(
    "url", ["hooks.example.com/triage", "ftp://hooks.example.com/", "https://"]
)
def test_a_webhook_url_that_is_not_http_is_a_config_error(tmp_path, url):
    text = f"webhooks:\n  crm: {{url: '{url}', secret_env: T_HOOK_SECRET}}\n"
    with pytest.raises(ConfigError, match=r"webhooks\.crm\.url"):
        load_sinks_file(write_yaml(tmp_path, text))


def test_a_department_listed_twice_is_a_config_error(tmp_path, app_config):
    # Last-one-wins would quietly drop billing's first sink list.
    text = "departments:\n  billing: [queue]\n  escalations: [queue]\n  billing: []\n"
    with pytest.raises(ConfigError, match=r"(?s)sinks\.yaml: .*duplicate key 'billing'"):
        build_sink_table(write_yaml(tmp_path, text), app_config)


def test_sections_whose_entries_are_all_commented_out_mean_none(tmp_path, app_config):
    text = "helpdesks:\n#  zendesk: {}\nwebhooks:\ndepartments:\n#  billing: [helpdesk]\ndefault:\n"
    table = build_sink_table(write_yaml(tmp_path, text), app_config)
    assert table.by_department == {} and table.default == ()

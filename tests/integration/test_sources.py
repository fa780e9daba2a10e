"""POST /webhooks/{zendesk,freshdesk,django-helpdesk} against real PostgreSQL and Redis.

Signatures and tokens are computed here with hmac/base64 directly, not with the code under
test. Every refused request answers application/problem+json and stores nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.stack import count_rows, make_runtime, stack_env, truncate
from triage.db.models import OutboxMessage, Ticket
from triage.ingest.app import create_app

ZENDESK_SECRET = "dGVzdC16ZW5kZXNrLXNpZ25pbmctc2VjcmV0"
FRESHDESK_SECRET = "fd-shared-secret-0123456789"
HELPDESK_TOKEN = "dh-url-token-0123456789abcdef"


def source_env(pg_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    return stack_env(
        pg_url,
        redis_url,
        TRIAGE_MAX_BODY_BYTES="4096",
        TRIAGE_WEBHOOK_SECRET_ZENDESK=ZENDESK_SECRET,
        TRIAGE_WEBHOOK_SECRET_FRESHDESK=FRESHDESK_SECRET,
        TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK=HELPDESK_TOKEN,
        **overrides,
    )


@pytest.fixture()
def runtime(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(source_env(pg_url, clean_redis))


@pytest.fixture()
def client(runtime):
    with TestClient(create_app(runtime, relay_interval=3600)) as c:
        yield c


@pytest.fixture()
def retriage_runtime(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(source_env(pg_url, clean_redis, TRIAGE_UPDATE_POLICY="retriage"))


@pytest.fixture()
def retriage_client(retriage_runtime):
    with TestClient(create_app(retriage_runtime, relay_interval=3600)) as c:
        yield c


def count(runtime, model=Ticket) -> int:
    return count_rows(runtime, model)


def stored(runtime, ticket_id: int) -> Ticket:
    with runtime.sessions() as s:
        ticket = s.get(Ticket, ticket_id)
        s.expunge(ticket)
        return ticket


def assert_problem(resp, status: int, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for needle in needles:
        assert needle in json.dumps(body), body
    return body


# --- how each helpdesk authenticates, computed independently -------------------------------


def zendesk_auth(body: bytes, secret: str = ZENDESK_SECRET, *, age: float = 0) -> dict[str, str]:
    stamp = (datetime.now(UTC) - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {
        "X-Zendesk-Webhook-Signature": base64.b64encode(digest).decode(),
        "X-Zendesk-Webhook-Signature-Timestamp": stamp,
    }


def freshdesk_auth(body: bytes, secret: str = FRESHDESK_SECRET) -> dict[str, str]:
    return {"X-Triage-Token": secret}


@dataclass(frozen=True)
class Helpdesk:
    name: str
    payload: Callable[..., dict[str, Any]]
    # Headers and URL for a correctly authenticated request, and for a wrong secret.
    auth: Callable[[bytes], dict[str, str]]
    bad_auth: Callable[[bytes], dict[str, str]]
    url: str
    bad_url: str
    missing_fields: tuple[str, ...]
    without_required: dict[str, Any]

    def post(self, client, payload: Any, *, headers=None, url=None, raw: bytes | None = None):
        body = raw if raw is not None else json.dumps(payload).encode()
        sent = {"content-type": "application/json", **self.auth(body), **(headers or {})}
        return client.post(url or self.url, content=body, headers=sent)


def zendesk_ticket(ext: int = 101, **ticket: Any) -> dict[str, Any]:
    base = {
        "id": ext,
        "subject": "Charged twice",
        "description": "I was charged twice for my subscription this month.",
        "priority": "high",
        "tags": "billing vip",
        "group_id": 360001,
        "group": "Support",
        "via": {"channel": "email"},
        "requester": {"email": "jane.doe@example.com", "name": "Jane Doe"},
        "created_at": "2026-11-26T06:00:00Z",
        "updated_at": "2026-11-26T06:00:00Z",
    }
    return {"ticket": {**base, **ticket}}


def freshdesk_ticket(ext: int = 202, **fields: Any) -> dict[str, Any]:
    base = {
        "ticket_id": ext,
        "ticket_subject": "Where is my parcel?",
        "ticket_description": "<div>My order <b>#4411</b> has not arrived.</div>",
        "ticket_priority": "Medium",
        "ticket_tags": "shipping, late",
        "ticket_group_name": "Logistics",
        "ticket_source": "Email",
        "ticket_contact_email": "max@example.com",
        "ticket_contact_name": "Max Muster",
        "ticket_created_at": "2026-11-26T06:00:00Z",
    }
    return {"freshdesk_webhook": {**base, **fields}}


def helpdesk_followup(fid: int, *, title: str, comment: str, public: bool = True) -> dict:
    return {
        "id": fid,
        "ticket": 303,
        "user": None,
        "title": title,
        "comment": comment,
        "public": public,
        "new_status": None,
        "time_spent": None,
        "followupattachment_set": [],
        "date": "2026-11-26T06:05:00Z",
        "message_id": None,
    }


def helpdesk_ticket(ext: int = 303, *, followup: dict | None = None, **fields: Any) -> dict:
    ticket = {
        "id": ext,
        "queue": 2,
        "title": "Cannot log in",
        "description": "I reset my password but the login page still says invalid.",
        "resolution": None,
        "submitter_email": "li@example.com",
        "assigned_to": None,
        "status": 1,
        "on_hold": False,
        "priority": 2,
        "due_date": None,
        "merged_to": None,
        "followup_set": [followup] if followup else [],
        **fields,
    }
    payload: dict[str, Any] = {"ticket": ticket, "queue_slug": "accounts"}
    if followup:
        payload["followup_id"] = followup["id"]
    return payload


ZENDESK = Helpdesk(
    name="zendesk",
    payload=zendesk_ticket,
    auth=zendesk_auth,
    bad_auth=lambda body: zendesk_auth(body, "not-the-secret"),
    url="/webhooks/zendesk",
    bad_url="/webhooks/zendesk",
    missing_fields=("ticket.id", "ticket.description"),
    without_required={"ticket": {"subject": "no id, no description"}},
)
FRESHDESK = Helpdesk(
    name="freshdesk",
    payload=freshdesk_ticket,
    auth=freshdesk_auth,
    bad_auth=lambda body: freshdesk_auth(body, "wrong-secret"),
    url="/webhooks/freshdesk",
    bad_url="/webhooks/freshdesk",
    missing_fields=("freshdesk_webhook.ticket_id", "freshdesk_webhook.ticket_description"),
    without_required={"freshdesk_webhook": {"ticket_subject": "no id"}},
)
DJANGO_HELPDESK = Helpdesk(
    name="django-helpdesk",
    payload=helpdesk_ticket,
    auth=lambda body: {},
    bad_auth=lambda body: {},
    url=f"/webhooks/django-helpdesk/{HELPDESK_TOKEN}",
    bad_url="/webhooks/django-helpdesk/not-the-token",
    missing_fields=("ticket.id", "ticket.title"),
    without_required={"ticket": {"description": "no id, no title"}, "queue_slug": "x"},
)
HELPDESKS = [ZENDESK, FRESHDESK, DJANGO_HELPDESK]
by_name = pytest.mark.parametrize("desk", HELPDESKS, ids=lambda d: d.name)


# --- refused requests -------------------------------------------------------------------------


@by_name
def test_missing_authentication_is_401_and_stores_nothing(client, runtime, desk):
    body = json.dumps(desk.payload()).encode()
    url = desk.url.replace(f"/{HELPDESK_TOKEN}", "")
    resp = client.post(url, content=body, headers={"content-type": "application/json"})
    assert_problem(resp, 401)
    assert count(runtime) == 0


@by_name
def test_wrong_secret_is_401_and_stores_nothing(client, runtime, desk):
    body = json.dumps(desk.payload()).encode()
    headers = {"content-type": "application/json", **desk.bad_auth(body)}
    assert_problem(client.post(desk.bad_url, content=body, headers=headers), 401)
    assert count(runtime) == 0


def test_zendesk_signature_over_other_body_is_401(client, runtime):
    body = json.dumps(zendesk_ticket()).encode()
    headers = {"content-type": "application/json", **zendesk_auth(b"{}")}
    assert_problem(client.post("/webhooks/zendesk", content=body, headers=headers), 401)
    assert count(runtime) == 0


def test_zendesk_stale_timestamp_is_401(client, runtime):
    body = json.dumps(zendesk_ticket()).encode()
    headers = {"content-type": "application/json", **zendesk_auth(body, age=3600)}
    resp = client.post("/webhooks/zendesk", content=body, headers=headers)
    assert_problem(resp, 401, "tolerance")
    assert count(runtime) == 0


def test_freshdesk_basic_auth_password_is_accepted_and_wrong_one_refused(client, runtime):
    body = json.dumps(freshdesk_ticket()).encode()

    def basic(password: str) -> dict[str, str]:
        token = base64.b64encode(f"freshdesk:{password}".encode()).decode()
        return {"content-type": "application/json", "authorization": f"Basic {token}"}

    assert_problem(client.post("/webhooks/freshdesk", content=body, headers=basic("nope")), 401)
    assert count(runtime) == 0
    resp = client.post("/webhooks/freshdesk", content=body, headers=basic(FRESHDESK_SECRET))
    assert resp.status_code == 202, resp.text


@pytest.mark.parametrize(
    "authorization",
    ["Basic é".encode(), "Basic é".encode("latin-1"), b"Basic \xff\xfe", b"Basic /zp4"],
    ids=["utf-8 e-acute", "latin-1 e-acute", "raw bytes", "base64 of non-UTF-8"],
)
def test_freshdesk_non_ascii_basic_auth_is_401_not_a_500(client, runtime, authorization):
    # b64decode raises a plain ValueError for a str with non-ASCII characters; only
    # binascii.Error was caught, so anyone could cause a 500 before authentication.
    body = json.dumps(freshdesk_ticket()).encode()
    headers = {"content-type": "application/json", "authorization": authorization}
    assert_problem(client.post("/webhooks/freshdesk", content=body, headers=headers), 401)
    assert count(runtime) == 0


@pytest.mark.parametrize("path", ["/webhooks/django-helpdesk", "/webhooks/django-helpdesk/"])
def test_django_helpdesk_token_in_query_string_is_accepted(client, runtime, path):
    resp = DJANGO_HELPDESK.post(client, helpdesk_ticket(), url=f"{path}?token={HELPDESK_TOKEN}")
    assert resp.status_code == 202, resp.text
    assert count(runtime) == 1


# What `openssl rand -base64 32` gives about every other time: a "/" and a "+".
BASE64_TOKEN = "q3Rv/8kP+Zx1mN0b7Ew2cYt5Lh9Ua4Gd6Ff3Jo1Si8A="


@pytest.mark.parametrize(
    "path", [BASE64_TOKEN, quote(BASE64_TOKEN, safe="")], ids=["as is", "percent-encoded"]
)
def test_django_helpdesk_base64_token_with_a_slash_is_accepted_in_the_path(
    pg_url, clean_redis, path
):
    # The route took one path segment: a token with "/" was a 404 that django-helpdesk
    # ignores (it only logs timeouts), so every ticket was silently never triaged.
    truncate(pg_url)
    env = source_env(pg_url, clean_redis)
    env["TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK"] = BASE64_TOKEN
    rt = make_runtime(env)
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        url = f"/webhooks/django-helpdesk/{path}"
        resp = DJANGO_HELPDESK.post(client, helpdesk_ticket(305), url=url)
        assert resp.status_code == 202, resp.text
        wrong = DJANGO_HELPDESK.post(client, helpdesk_ticket(306), url=url.replace("q3Rv", "q3Rw"))
        assert_problem(wrong, 401)
    assert count(rt) == 1


@by_name
def test_unknown_source_is_404(client, runtime, desk):
    resp = desk.post(client, desk.payload(), url="/webhooks/kayako/some-token")
    assert_problem(resp, 404, "unknown source", desk.name)
    assert count(runtime) == 0


@by_name
def test_wrong_content_type_is_415(client, runtime, desk):
    resp = desk.post(client, desk.payload(), headers={"content-type": "text/plain"})
    assert_problem(resp, 415)
    assert count(runtime) == 0


@by_name
def test_oversized_body_is_413(client, runtime, desk):
    payload = desk.payload()
    payload["padding"] = "x" * 10_000
    assert_problem(desk.post(client, payload), 413, "limit")
    assert count(runtime) == 0


@by_name
def test_malformed_json_is_400(client, runtime, desk):
    assert_problem(desk.post(client, None, raw=b'{"ticket": {"id": 1,'), 400, "JSON")
    assert count(runtime) == 0


@by_name
def test_missing_fields_are_422_naming_them(client, runtime, desk):
    problem = assert_problem(desk.post(client, desk.without_required), 422, *desk.missing_fields)
    assert {e["field"] for e in problem["errors"]} >= set(desk.missing_fields)
    assert count(runtime) == 0


@by_name
@pytest.mark.parametrize("too_long", ["x" * 256, 10**300], ids=["256-char id", "301-digit id"])
def test_an_id_longer_than_the_store_holds_is_422_not_a_500(client, runtime, desk, too_long):
    # PostgreSQL refused it at the INSERT (external_id holds 255 characters): a 500 that
    # every retry of the helpdesk met again.
    problem = assert_problem(desk.post(client, desk.payload(too_long)), 422, desk.missing_fields[0])
    assert desk.missing_fields[0] in {e["field"] for e in problem["errors"]}
    assert count(runtime) == 0


@by_name
@pytest.mark.parametrize("not_an_id", [True, False, 1.0], ids=["true", "false", "1.0"])
def test_an_id_that_is_not_an_integer_or_string_is_422_not_another_ticket(
    client, runtime, desk, not_an_id
):
    # A boolean was read as the number 1 (or 0): `"id": true` from a broken placeholder
    # became ticket "1", and its text a redelivery or an update of someone else's ticket.
    problem = assert_problem(
        desk.post(client, desk.payload(not_an_id)), 422, desk.missing_fields[0]
    )
    assert desk.missing_fields[0] in {e["field"] for e in problem["errors"]}
    assert count(runtime) == 0


# --- accepted deliveries ----------------------------------------------------------------------


def test_zendesk_ticket_is_stored_with_mapped_fields(client, runtime):
    resp = ZENDESK.post(client, zendesk_ticket(101))
    assert resp.status_code == 202, resp.text
    assert resp.json()["duplicate"] is False
    ticket = stored(runtime, resp.json()["ticket_id"])
    assert (ticket.source, ticket.external_id) == ("zendesk", "101")
    assert ticket.subject == "Charged twice"
    assert ticket.body == "I was charged twice for my subscription this month."
    assert (ticket.requester_email, ticket.requester_name) == ("jane.doe@example.com", "Jane Doe")
    assert ticket.channel == "email"
    assert ticket.external_created_at == datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
    assert ticket.extra["tags"] == ["billing", "vip"]
    assert ticket.extra["priority"] == "high" and ticket.extra["group_id"] == 360001


def test_freshdesk_ticket_is_stored_with_original_html_and_clean_text(client, runtime):
    resp = FRESHDESK.post(client, freshdesk_ticket(202))
    assert resp.status_code == 202, resp.text
    ticket = stored(runtime, resp.json()["ticket_id"])
    assert (ticket.source, ticket.external_id) == ("freshdesk", "202")
    assert ticket.body == "<div>My order <b>#4411</b> has not arrived.</div>"
    assert "<" not in ticket.clean_text and "#4411 has not arrived" in ticket.clean_text
    assert (ticket.requester_email, ticket.requester_name) == ("max@example.com", "Max Muster")
    assert ticket.channel == "email"
    assert ticket.extra["tags"] == ["shipping", "late"]
    assert ticket.extra["group"] == "Logistics" and ticket.extra["priority"] == "Medium"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2026-11-26T06:00:00", datetime(2026, 11, 26, 6, tzinfo=UTC)),
        ("2026-11-26T07:00:00+01:00", datetime(2026, 11, 26, 6, tzinfo=UTC)),
        ("0001-01-01T00:00:00+01:00", None),
        ("9999-12-31T23:59:59-01:00", None),
        ("Thu, 26 Nov, 2026 at 6:00 AM", None),
    ],
    ids=["no offset", "offset", "before year 1 in UTC", "after 9999 in UTC", "display format"],
)
def test_freshdesk_created_at_is_stored_in_utc_or_as_none_not_a_500(
    client, runtime, sent, expected
):
    # A time UTC cannot hold failed the INSERT with an OverflowError on every retry.
    resp = FRESHDESK.post(client, freshdesk_ticket(204, ticket_created_at=sent))
    assert resp.status_code == 202, resp.text
    assert stored(runtime, resp.json()["ticket_id"]).external_created_at == expected


@pytest.mark.parametrize(
    "sent",
    ["", "November 26, 2026 06:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
    ids=["empty", "display format", "before year 1 in UTC", "after 9999 in UTC"],
)
def test_zendesk_time_that_is_not_iso_is_stored_as_none_not_refused(client, runtime, sent):
    # {{ticket.created_at_with_time}} renders for display; the whole ticket was refused (422)
    # for a time triage does not need, and the helpdesk does not resend a refused ticket.
    resp = ZENDESK.post(client, zendesk_ticket(105, created_at=sent, updated_at=sent))
    assert resp.status_code == 202, resp.text
    ticket = stored(runtime, resp.json()["ticket_id"])
    assert ticket.external_id == "105" and ticket.external_created_at is None


def test_django_helpdesk_ticket_is_stored_with_mapped_fields(client, runtime):
    resp = DJANGO_HELPDESK.post(client, helpdesk_ticket(303))
    assert resp.status_code == 202, resp.text
    ticket = stored(runtime, resp.json()["ticket_id"])
    assert (ticket.source, ticket.external_id) == ("django-helpdesk", "303")
    assert ticket.subject == "Cannot log in"
    assert ticket.body.startswith("I reset my password")
    assert ticket.requester_email == "li@example.com"
    assert ticket.extra["queue_slug"] == "accounts" and ticket.extra["queue_id"] == 2
    assert ticket.extra["priority"] == 2


# A helpdesk renders a field with no value as an empty string: Zendesk's and Freshdesk's
# description placeholders for a message that is only an attachment, django-helpdesk's title
# for an e-mail whose subject is empty or only "Re: " (it strips the prefix).
WITHOUT_TEXT = {
    "zendesk": {"subject": "", "description": ""},
    "freshdesk": {"ticket_subject": "", "ticket_description": ""},
    "django-helpdesk": {"title": "", "description": ""},
}


@by_name
def test_a_ticket_without_subject_or_text_is_stored_not_refused(client, runtime, desk):
    # It was a 422, and no helpdesk resends a refused ticket (django-helpdesk resends nothing):
    # the ticket never reached triage. Stored, it is classified like any other ticket.
    resp = desk.post(client, desk.payload(404, **WITHOUT_TEXT[desk.name]))
    assert resp.status_code == 202, resp.text
    ticket = stored(runtime, resp.json()["ticket_id"])
    assert (ticket.external_id, ticket.subject, ticket.body) == ("404", "", "")
    assert count(runtime, OutboxMessage) == 1


@by_name
def test_duplicate_delivery_returns_same_ticket_and_one_outbox_row(client, runtime, desk):
    first = desk.post(client, desk.payload()).json()
    second = desk.post(client, desk.payload())
    assert second.status_code == 202, second.text
    assert second.json()["ticket_id"] == first["ticket_id"]
    assert second.json()["duplicate"] is True and first["duplicate"] is False
    assert count(runtime) == 1
    assert count(runtime, OutboxMessage) == 1


def test_django_helpdesk_with_a_uuid_user_model_is_accepted(retriage_client, retriage_runtime):
    # Follow-ups name their author by the user model's primary key: a UUID string in projects
    # whose user model has one. Every ticket with a follow-up by a signed-in user (any a staff
    # member opened or answered) was refused 422, and django-helpdesk resends nothing.
    author = {"user": "3f2c1a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f"}
    opened = {**helpdesk_followup(910, title="Ticket Opened", comment="Cannot log in"), **author}
    new_ticket = helpdesk_ticket(307, followup_set=[opened])
    first = DJANGO_HELPDESK.post(retriage_client, new_ticket)
    assert first.status_code == 202, first.text

    reply = {**helpdesk_followup(911, title="Re: Cannot log in", comment="Still broken."), **author}
    update = helpdesk_ticket(307, followup=reply)
    update["ticket"]["followup_set"].insert(0, opened)
    again = DJANGO_HELPDESK.post(retriage_client, update)
    assert again.status_code == 202, again.text
    assert again.json()["ticket_id"] == first.json()["ticket_id"]
    assert stored(retriage_runtime, first.json()["ticket_id"]).body.endswith("Still broken.")


def test_triage_own_django_helpdesk_followup_is_ignored_and_stores_nothing(client, runtime):
    note = helpdesk_followup(
        900, title="[triage] routed to accounts", comment="[triage] intent account", public=False
    )
    resp = DJANGO_HELPDESK.post(client, helpdesk_ticket(303, followup=note))
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "ignored"
    assert count(runtime) == 0 and count(runtime, OutboxMessage) == 0


def test_zendesk_private_comment_update_is_ignored(client, runtime):
    payload = {
        **zendesk_ticket(101),
        "event": "updated",
        "comment": {"id": 5, "body": "[triage] routed to billing", "public": False},
    }
    resp = ZENDESK.post(client, payload)
    assert resp.status_code == 202 and resp.json()["status"] == "ignored"
    assert count(runtime) == 0


def test_followup_under_ignore_policy_changes_nothing(client, runtime):
    first = DJANGO_HELPDESK.post(client, helpdesk_ticket(303)).json()
    reply = helpdesk_followup(901, title="Re: Cannot log in", comment="Still broken today.")
    resp = DJANGO_HELPDESK.post(client, helpdesk_ticket(303, followup=reply)).json()
    assert resp["ticket_id"] == first["ticket_id"] and resp["duplicate"] is True
    ticket = stored(runtime, first["ticket_id"])
    assert ticket.generation == 0 and "Still broken" not in ticket.body
    assert count(runtime, OutboxMessage) == 1


def test_followup_under_retriage_policy_appends_text_and_classifies_again(
    retriage_client, retriage_runtime
):
    rt = retriage_runtime
    first = DJANGO_HELPDESK.post(retriage_client, helpdesk_ticket(303)).json()
    reply = helpdesk_followup(901, title="Re: Cannot log in", comment="Still broken today.")
    resp = DJANGO_HELPDESK.post(retriage_client, helpdesk_ticket(303, followup=reply))
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"ticket_id": first["ticket_id"], "status": "queued", "duplicate": False}
    ticket = stored(rt, first["ticket_id"])
    assert ticket.generation == 1 and ticket.state == "queued"
    assert ticket.body.startswith("I reset my password")  # the original text is kept
    assert ticket.body.endswith("Still broken today.")
    assert "Still broken today." in ticket.clean_text
    with rt.sessions() as s:
        messages = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [m.task for m in messages] == ["triage.classify_ticket"] * 2

    # The helpdesk retries the same follow-up: nothing is appended or enqueued again.
    again = DJANGO_HELPDESK.post(retriage_client, helpdesk_ticket(303, followup=reply)).json()
    assert again["ticket_id"] == first["ticket_id"] and again["duplicate"] is True
    assert stored(rt, first["ticket_id"]).generation == 1
    assert count(rt, OutboxMessage) == 2


def test_zendesk_public_comment_under_retriage_policy_bumps_generation(
    retriage_client, retriage_runtime
):
    first = ZENDESK.post(retriage_client, zendesk_ticket(101)).json()
    payload = {
        **zendesk_ticket(101, updated_at="2026-11-26T07:00:00Z"),
        "event": "updated",
        "comment": {"id": 77, "body": "Now I was charged three times!", "public": True},
    }
    resp = ZENDESK.post(retriage_client, payload).json()
    assert resp["ticket_id"] == first["ticket_id"] and resp["duplicate"] is False
    ticket = stored(retriage_runtime, first["ticket_id"])
    assert ticket.generation == 1 and "three times" in ticket.body
    assert count(retriage_runtime, OutboxMessage) == 2


def test_zendesk_comments_whose_id_renders_blank_are_each_applied_once(
    retriage_client, retriage_runtime
):
    # A placeholder with no value (or a misspelt one: Liquid renders it as nothing) sends
    # "id": "". Every comment of the ticket then had the key "comment:", so each after the
    # first was taken for a redelivery: answered as a duplicate, its text never stored.
    rt = retriage_runtime
    first = ZENDESK.post(retriage_client, zendesk_ticket(107)).json()
    for text in ("Still charged twice.", "Now three times!", "Now three times!"):
        payload = {
            **zendesk_ticket(107),
            "event": "updated",
            "comment": {"id": "", "body": text, "public": True},
        }
        assert ZENDESK.post(retriage_client, payload).status_code == 202
    ticket = stored(rt, first["ticket_id"])
    assert ticket.generation == 2
    assert ticket.body.count("Still charged twice.") == 1
    assert ticket.body.count("Now three times!") == 1

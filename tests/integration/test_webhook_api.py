"""POST /webhooks/generic against real PostgreSQL and Redis: accepted tickets are committed
before the 202; bad input gets a clear problem+json answer and stores nothing."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.stack import (
    count_rows,
    make_runtime,
    post_ticket,
    signed_headers,
    stack_env,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import OutboxMessage, Ticket
from triage.ingest.app import create_app


@pytest.fixture()
def runtime(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(stack_env(pg_url, clean_redis, TRIAGE_MAX_BODY_BYTES="4096"))


@pytest.fixture()
def client(runtime):
    with TestClient(create_app(runtime, relay_interval=3600)) as c:
        yield c


def count(runtime, model=Ticket) -> int:
    return count_rows(runtime, model)


def assert_problem(resp, status: int, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for needle in needles:
        assert needle in json.dumps(body), body
    return body


def test_signed_ticket_is_committed_and_queued_before_202(client, runtime):
    resp = post_ticket(client, ticket_payload("ext-1"))
    assert resp.status_code == 202
    body = resp.json()
    assert body["duplicate"] is False and body["status"] == "received"
    with runtime.sessions() as s:
        ticket = s.get(Ticket, body["ticket_id"])
        assert ticket.external_id == "ext-1" and ticket.source == "generic"
        outbox = s.scalars(select(OutboxMessage).where(OutboxMessage.ticket_id == ticket.id)).one()
        assert outbox.task == "triage.classify_ticket" and outbox.queue == "triage.classify"

    # Published off the request path, right after: the message reaches the broker.
    def published() -> bool:
        with runtime.sessions() as s:
            return s.get(OutboxMessage, outbox.id).sent_at is not None

    wait_until(published, 10, what="the outbox row published")
    with runtime.sessions() as s:
        assert s.get(Ticket, body["ticket_id"]).state == "queued"


def test_duplicate_delivery_returns_same_ticket_and_enqueues_nothing(client, runtime):
    first = post_ticket(client, ticket_payload("dup-1")).json()
    second = post_ticket(client, ticket_payload("dup-1", body="changed text")).json()
    assert second["ticket_id"] == first["ticket_id"] and second["duplicate"] is True
    assert count(runtime) == 1
    assert count(runtime, OutboxMessage) == 1


def test_nul_characters_are_stored_as_replacement_marks_not_lost(client, runtime):
    # Valid JSON that PostgreSQL text cannot hold: it used to fail the INSERT with a 500 on
    # every retry of the helpdesk, so the ticket was never stored.
    payload = ticket_payload(
        "nul\u0000-1",
        subject="Re\u0000fund",
        body="Charged twice\u0000 for order 1234",
        metadata={"k\u0000": ["v\u0000", {"deep": "x\u0000"}]},
    )
    payload["requester"]["name"] = "Ann\u0000"
    first = post_ticket(client, payload)
    assert first.status_code == 202, first.text
    again = post_ticket(client, payload).json()
    assert again["ticket_id"] == first.json()["ticket_id"] and again["duplicate"] is True
    with runtime.sessions() as s:
        ticket = s.get(Ticket, first.json()["ticket_id"])
        assert ticket.external_id == "nul\ufffd-1"
        assert ticket.subject == "Re\ufffdfund"
        assert ticket.body == "Charged twice\ufffd for order 1234"
        assert ticket.requester_name == "Ann\ufffd"
        assert ticket.extra["k\ufffd"] == ["v\ufffd", {"deep": "x\ufffd"}]
    assert count(runtime) == 1


def test_ticket_view_shows_state(client):
    tid = post_ticket(client, ticket_payload("view-1")).json()["ticket_id"]
    view = client.get(f"/tickets/{tid}").json()
    assert view["ticket_id"] == tid and view["state"] in ("received", "queued")
    assert view["labels"] is None and view["attempts"] == 0
    assert_problem(client.get("/tickets/999999"), 404, "not found")


def test_ticket_view_asks_for_the_read_token_when_one_is_set(pg_url, clean_redis):
    truncate(pg_url)
    token = "read-token-0123456789"
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_API_READ_TOKEN=token))
    with TestClient(create_app(rt, relay_interval=3600)) as c:
        # Webhooks keep their own authentication: the read token is not asked of them.
        tid = post_ticket(c, ticket_payload("read-token-1")).json()["ticket_id"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            answer = c.get(f"/tickets/{tid}", headers=headers)
            assert_problem(answer, 401, "bearer token")
            assert answer.headers["www-authenticate"] == "Bearer"
        # An unknown id says no more than a known one without the token.
        assert_problem(c.get("/tickets/999999"), 401, "bearer token")
        view = c.get(f"/tickets/{tid}", headers={"Authorization": f"Bearer {token}"})
        assert view.status_code == 200 and view.json()["ticket_id"] == tid


@pytest.mark.parametrize("ticket_id", [2**63, 99999999999999999999, -(2**63) - 1, 0])
def test_ticket_id_no_ticket_can_have_is_404_not_a_500(client, ticket_id):
    # Beyond bigint PostgreSQL refused the query with NumericValueOutOfRange (a 500).
    assert_problem(client.get(f"/tickets/{ticket_id}"), 404, "not found")


def test_bad_signature_is_401_and_stores_nothing(client, runtime):
    body = json.dumps(ticket_payload("sig-1")).encode()
    headers = signed_headers(body, secret="whsec_" + "d3Jvbmcgc2VjcmV0IGtleSAxMjM0NTY3OA==")
    assert_problem(client.post("/webhooks/generic", content=body, headers=headers), 401)
    assert count(runtime) == 0


def test_replayed_old_signature_is_401(client, runtime):
    body = json.dumps(ticket_payload("old-1")).encode()
    headers = signed_headers(body, ts=int(time.time()) - 3600)
    assert_problem(
        client.post("/webhooks/generic", content=body, headers=headers), 401, "tolerance"
    )
    assert count(runtime) == 0


def test_a_timestamp_of_hundreds_of_digits_is_401_not_a_500(client, runtime):
    # Checked before authentication, so anyone could cause the 500 (an OverflowError).
    body = json.dumps(ticket_payload("ts-1")).encode()
    headers = {**signed_headers(body), "webhook-timestamp": "1" + "0" * 400}
    assert_problem(
        client.post("/webhooks/generic", content=body, headers=headers), 401, "tolerance"
    )
    assert count(runtime) == 0


def test_malformed_json_is_400(client, runtime):
    body = b'{"external_id": "x", "body": '
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 400, "JSON")
    assert count(runtime) == 0


def test_a_lone_surrogate_half_is_stored_as_a_replacement_mark_not_refused(client, runtime):
    # An emoji escaped as a UTF-16 pair and cut between its halves: validation refused the
    # whole ticket (422). A whole pair stays the emoji it is.
    payload = json.dumps(ticket_payload("sur-1", body="BODY"))
    body = payload.replace("BODY", "cut \\ud83d here, whole \\ud83d\\ude00").encode()
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert resp.status_code == 202, resp.text
    with runtime.sessions() as s:
        assert s.get(Ticket, resp.json()["ticket_id"]).body == "cut \ufffd here, whole \U0001f600"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_body_not_in_utf8_is_400_not_a_500(client, runtime, encoding):
    # json.loads reads UTF-16 and UTF-32 too, and the \u0000 in them slipped past the NUL
    # cleaning (it looked for the escape in UTF-8 bytes): the INSERT failed with a 500.
    body = json.dumps(ticket_payload("enc-1", body="Charged twice\u0000")).encode(encoding)
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 400, "Malformed JSON", "UTF-8")
    assert count(runtime) == 0


def test_a_utf8_body_with_a_byte_order_mark_is_accepted_and_cleaned(client, runtime):
    body = json.dumps(ticket_payload("bom-1", body="Charged twice\u0000")).encode("utf-8-sig")
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert resp.status_code == 202, resp.text
    with runtime.sessions() as s:
        assert s.get(Ticket, resp.json()["ticket_id"]).body == "Charged twice\ufffd"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_and_get_400_not_a_500(client, runtime, constant):
    # Python's json reads them; the metadata column refused them at the INSERT (a 500).
    payload = json.dumps(ticket_payload("nan-1", metadata={"score": "X"}))
    body = payload.replace('"X"', constant).encode()
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 400, "Malformed JSON", constant)
    assert count(runtime) == 0


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1.5e309"])
def test_a_number_beyond_a_double_is_not_json_and_gets_400_not_a_500(client, runtime, number):
    # Python reads it as Infinity, which the metadata column refused at the INSERT (a 500).
    payload = json.dumps(ticket_payload("big-number-1", metadata={"amount": "X", "ok": 1e300}))
    body = payload.replace('"X"', number).encode()
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 400, "Malformed JSON", number)
    assert count(runtime) == 0


def test_numbers_a_double_holds_are_stored_as_sent(client, runtime):
    metadata = {"amount": 1e300, "tiny": 1e-400, "price": 12.5, "count": 10**30}
    resp = post_ticket(client, ticket_payload("numbers-1", metadata=metadata))
    assert resp.status_code == 202, resp.text
    with runtime.sessions() as s:
        extra = s.get(Ticket, resp.json()["ticket_id"]).extra
    assert extra == {"amount": 1e300, "tiny": 0.0, "price": 12.5, "count": 10**30}


@pytest.mark.parametrize("depth", [40, 1500], ids=["past the limit", "past the parser's stack"])
def test_json_nested_too_deep_is_400_not_a_500(client, runtime, depth):
    body = b'{"external_id": "deep-1", "body": "b", "metadata": {"x": ' + b"[" * depth
    body += b"]" * depth + b"}}"
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 400, "nested deeper than 32")
    assert count(runtime) == 0


def test_metadata_nested_a_few_levels_is_kept(client, runtime):
    payload = ticket_payload("nest-1", metadata={"a": {"b": [{"c": [1, 2, {"d": "e"}]}]}})
    resp = post_ticket(client, payload)
    assert resp.status_code == 202, resp.text
    with runtime.sessions() as s:
        assert s.get(Ticket, resp.json()["ticket_id"]).extra == payload["metadata"]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-11-24T10:00:00", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24", datetime(2026, 11, 24, tzinfo=UTC)),
        ("2026-11-24T11:00:00+01:00", datetime(2026, 11, 24, 10, tzinfo=UTC)),
    ],
    ids=["no offset", "date only", "offset"],
)
def test_created_at_without_an_offset_is_stored_as_utc_not_a_500(client, runtime, sent, stored):
    # A naive time reached the UTC column as it was and failed the INSERT on every retry.
    resp = post_ticket(client, ticket_payload("naive-1", created_at=sent))
    assert resp.status_code == 202, resp.text
    with runtime.sessions() as s:
        assert s.get(Ticket, resp.json()["ticket_id"]).external_created_at == stored


@pytest.mark.parametrize("sent", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_created_at_that_utc_cannot_hold_is_422_naming_it_not_a_500(client, runtime, sent):
    resp = post_ticket(client, ticket_payload("edge-1", created_at=sent))
    problem = assert_problem(resp, 422, "created_at", "years 1 to 9999")
    assert [e["field"] for e in problem["errors"]] == ["created_at"]
    assert count(runtime) == 0


def test_missing_fields_are_422_naming_them(client, runtime):
    body = json.dumps({"subject": "no id, no body"}).encode()
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    problem = assert_problem(resp, 422, "external_id", "body")
    assert {e["field"] for e in problem["errors"]} >= {"external_id", "body"}
    assert count(runtime) == 0


def test_oversized_body_is_413_without_storing(client, runtime):
    payload = ticket_payload("big-1", body="x" * 10_000)
    body = json.dumps(payload).encode()
    resp = client.post("/webhooks/generic", content=body, headers=signed_headers(body))
    assert_problem(resp, 413, "limit")
    assert count(runtime) == 0


def test_oversized_chunked_body_without_content_length_is_413(client, runtime):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    resp = client.post(
        "/webhooks/generic", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(resp, 413)
    assert count(runtime) == 0


def test_wrong_content_type_is_415(client, runtime):
    body = json.dumps(ticket_payload("ct-1")).encode()
    headers = {**signed_headers(body), "content-type": "text/plain"}
    assert_problem(client.post("/webhooks/generic", content=body, headers=headers), 415)
    assert count(runtime) == 0


def test_unknown_source_is_404(client, runtime):
    body = json.dumps(ticket_payload("src-1")).encode()
    resp = client.post("/webhooks/mailchimp", content=body, headers=signed_headers(body))
    assert_problem(resp, 404, "unknown source", "generic")
    assert count(runtime) == 0


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    post_ticket(client, ticket_payload("m-1"))
    metrics = client.get("/metrics").text
    assert 'triage_webhooks_total{source="generic",status="202"}' in metrics

"""How a sink's HTTP exchange becomes a typed error, against a real local HTTP server: redirects,
Retry-After in both of its forms, and what an error stored in the database may show."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.test_sinks import WEBHOOK_SECRET, delivery, zendesk
from tests.support.fakehttp import FakeApi, Reply, running_api
from triage.errors import PermanentError, RateLimited, TransientError
from triage.sinks.django_helpdesk import DjangoHelpdeskWriter
from triage.sinks.http import MAX_BODY_BYTES
from triage.sinks.webhook import WebhookSink


def test_redirect_is_a_permanent_error_not_a_delivery_and_is_not_followed(api):
    moved = Reply(status=301, headers={"Location": api.url + "/elsewhere.json"})
    api.script("PUT", "/api/v2/tickets/101.json", moved)
    with pytest.raises(PermanentError, match="301") as err:
        zendesk(api).deliver(delivery())
    assert "/elsewhere.json" in str(err.value)
    assert api.calls()[-1] == ("PUT", "/api/v2/tickets/101.json")
    assert all("/elsewhere" not in path for _method, path in api.calls())


def test_429_with_http_date_retry_after_waits_until_that_date(api):
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=429, headers={"Retry-After": later}))
    with pytest.raises(RateLimited) as err:
        zendesk(api).deliver(delivery())
    assert err.value.retry_after is not None
    assert 100 <= err.value.retry_after <= 121


def test_503_with_http_date_retry_after_is_rate_limited(api):
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    api.script("PUT", "/api/v2/tickets/101.json", Reply(status=503, headers={"Retry-After": later}))
    with pytest.raises(RateLimited) as err:
        zendesk(api).deliver(delivery())
    assert err.value.retry_after is not None and 40 <= err.value.retry_after <= 61


def test_webhook_error_does_not_show_the_urls_credentials_or_token(api):
    host = api.url.removeprefix("http://")
    url = f"http://hookuser:hookpass@{host}/hooks/T0/B0?token=s3cr3t-query-token"
    sink = WebhookSink("crm", url, secret=WEBHOOK_SECRET, timeout_seconds=2)
    api.script("POST", "/hooks/T0/B0?token=s3cr3t-query-token", Reply(status=500))
    with pytest.raises(TransientError) as err:
        sink.deliver(delivery())
    text = str(err.value)
    assert "/hooks/T0/B0" in text and "500" in text
    assert "hookpass" not in text and "s3cr3t-query-token" not in text


def test_the_request_log_line_does_not_show_the_webhook_urls_credentials_or_token(api, caplog):
    # A worker logs at INFO, and httpx logs every request there with its URL.
    caplog.set_level(logging.INFO, logger="httpx")
    host = api.url.removeprefix("http://")
    url = f"http://hookuser:hookpass@{host}/hooks/T0/B0?token=s3cr3t-query-token"
    WebhookSink("crm", url, secret=WEBHOOK_SECRET, timeout_seconds=2).deliver(delivery())
    assert api.calls() == [("POST", "/hooks/T0/B0?token=s3cr3t-query-token")]
    assert "HTTP Request: POST" in caplog.text and "/hooks/T0/B0" in caplog.text
    assert "hookpass" not in caplog.text and "s3cr3t-query-token" not in caplog.text


def test_unreachable_webhook_error_does_not_show_the_urls_token():
    url = "http://127.0.0.1:9/hooks?token=s3cr3t-query-token"
    sink = WebhookSink("crm", url, secret=WEBHOOK_SECRET, timeout_seconds=1)
    with pytest.raises(TransientError) as err:
        sink.deliver(delivery())
    assert "s3cr3t-query-token" not in str(err.value)


# --- what is read of an answer ------------------------------------------------------------------


class _HtmlLoginPage(BaseHTTPRequestHandler):
    """A helpdesk behind an SSO proxy: every request answers 200 with an HTML page."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        page = b"<html><body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    do_GET = do_PATCH = do_POST = _answer  # noqa: N815 - http.server names

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def login_page() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlLoginPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_html_where_json_was_expected_is_a_permanent_error_naming_the_write_back(login_page):
    writer = DjangoHelpdeskWriter(
        login_page, username="u", password="p", queues={}, queue_ids={}, timeout_seconds=2
    )
    with pytest.raises(PermanentError, match="not JSON") as err:
        writer.deliver(delivery("django-helpdesk", "303"))
    assert "django-helpdesk write-back for ticket 42" in str(err.value)


def test_an_oversized_answer_is_not_read_whole(api):
    huge = "x" * (MAX_BODY_BYTES + 1024)
    api.script("GET", "/api/tickets/303/", Reply(body={"id": 303, "followup_set": [], "x": huge}))
    writer = DjangoHelpdeskWriter(
        api.url, username="u", password="p", queues={}, queue_ids={}, timeout_seconds=2
    )
    with pytest.raises(PermanentError, match="too large"):
        writer.deliver(delivery("django-helpdesk", "303"))
    assert ("POST", "/api/followups/") not in api.calls()


def test_an_oversized_answer_to_a_webhook_is_still_a_delivery(api):
    api.script("POST", "/hooks", Reply(body={"echo": "x" * (MAX_BODY_BYTES + 1024)}))
    WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=2).deliver(
        delivery()
    )
    assert api.calls() == [("POST", "/hooks")]


def test_an_answer_that_does_not_decode_is_a_transient_error_naming_the_sink(api):
    # Says gzip, is not: httpx raised its own DecodingError, which the retry policy took for
    # a bug (permanent, dead-lettered at once) and whose text named neither sink nor URL.
    listing = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
    api.script("GET", listing, Reply(headers={"content-encoding": "gzip"}))
    with pytest.raises(TransientError, match="zendesk write-back for ticket 42: GET") as err:
        zendesk(api).deliver(delivery())
    assert "DecodingError" in str(err.value)
    assert ("PUT", "/api/v2/tickets/101.json") not in api.calls()


# --- the delivery's deadline --------------------------------------------------------------------


def test_no_request_is_started_once_the_deliverys_deadline_has_passed(api):
    # Its lease is over, or about to be: a second copy of its message may be sending it now.
    with pytest.raises(TransientError, match="not sent: the delivery's deadline had passed"):
        zendesk(api).deliver(delivery(deadline=time.monotonic() - 0.01))
    assert api.calls() == []


def test_an_answer_still_arriving_at_the_deliverys_deadline_is_cut_there_as_transient(api):
    # Each piece of it well within the 2 s timeout, the whole far past the deadline.
    listing = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
    api.script("GET", listing, Reply(body={"comments": []}, delay=0.2, trickle=2.0))
    began = time.monotonic()
    with pytest.raises(TransientError, match="deadline"):
        zendesk(api).deliver(delivery(deadline=began + 0.8))
    assert time.monotonic() - began < 1.3
    assert ("PUT", "/api/v2/tickets/101.json") not in api.calls()


def test_a_webhook_answered_before_the_deadline_is_delivered_though_its_body_is_cut(api):
    # The 2xx is the receiver's word; the body is not read for anything.
    api.script("POST", "/hooks", Reply(body={"echo": "x" * 1000}, trickle=2.0))
    sink = WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=2)
    began = time.monotonic()
    sink.deliver(delivery(deadline=began + 0.5))
    assert time.monotonic() - began < 1.0
    assert api.calls() == [("POST", "/hooks")]


def test_a_request_waiting_for_its_answer_at_the_deliverys_deadline_times_out_there(api):
    api.script("PUT", "/api/v2/tickets/101.json", Reply(delay=2.0))
    began = time.monotonic()
    with pytest.raises(TransientError, match="timed out at the delivery's deadline"):
        zendesk(api, timeout=5).deliver(delivery(deadline=began + 0.5))
    assert time.monotonic() - began < 1.0


def test_headers_trickling_in_past_the_deliverys_deadline_time_out_there(api):
    # A byte every 0.3 s: no read waits the 1 s read timeout, and the headers never end.
    api.script("POST", "/hooks", Reply(header_pace=0.3))
    sink = WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=1)
    began = time.monotonic()
    with pytest.raises(TransientError, match="timed out at the delivery's deadline"):
        sink.deliver(delivery(deadline=began + 1.5))
    assert time.monotonic() - began < 2.0


def test_headers_trickling_in_past_the_deadline_through_an_environment_proxy_time_out_there(
    api, monkeypatch
):
    # HTTP_PROXY is honoured as httpx honours it, and the deadline holds through the proxy.
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", api.url)
    url = "http://hooks.example.invalid/hooks"
    api.script("POST", url, Reply(header_pace=0.3))
    sink = WebhookSink("crm", url, secret=WEBHOOK_SECRET, timeout_seconds=1)
    began = time.monotonic()
    with pytest.raises(TransientError, match="timed out at the delivery's deadline"):
        sink.deliver(delivery(deadline=began + 1.5))
    assert time.monotonic() - began < 2.0
    assert api.calls() == [("POST", url)]


def test_no_proxy_sends_directly(api, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=2).deliver(
        delivery()
    )
    assert api.calls() == [("POST", "/hooks")]


def test_a_body_stalled_at_the_deliverys_deadline_is_cut_there_not_at_its_next_chunk(api):
    # Pieces 0.9 s apart: the second, due at 1.8 s, is within a read timeout of the first and
    # of the time left when the body began, but past the deadline at 1 s.
    api.script("POST", "/hooks", Reply(body={"echo": "x" * 1000}, trickle=4.5))
    sink = WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=5)
    began = time.monotonic()
    sink.deliver(delivery(deadline=began + 1.0))
    assert time.monotonic() - began < 1.4
    assert api.calls() == [("POST", "/hooks")]


def test_a_webhook_whose_body_is_awaited_at_the_deliverys_deadline_is_still_delivered(api):
    # Answered 200 at once, its body's first piece due after the deadline: the 2xx stands.
    api.script("POST", "/hooks", Reply(body={"echo": "x" * 1000}, trickle=10.0))
    sink = WebhookSink("crm", api.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=5)
    began = time.monotonic()
    sink.deliver(delivery(deadline=began + 0.5))
    assert time.monotonic() - began < 1.0
    assert api.calls() == [("POST", "/hooks")]


def test_a_json_body_stalled_at_the_deliverys_deadline_is_a_transient_error_there(api):
    listing = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
    api.script("GET", listing, Reply(body={"comments": []}, trickle=10.0))
    began = time.monotonic()
    with pytest.raises(TransientError, match="body still arriving at the delivery's deadline"):
        zendesk(api, timeout=5).deliver(delivery(deadline=began + 0.5))
    assert time.monotonic() - began < 1.0
    assert ("PUT", "/api/v2/tickets/101.json") not in api.calls()


@pytest.fixture()
def kept_alive() -> Iterator[FakeApi]:
    """A receiver that keeps each connection open for the next request, as helpdesks do."""
    with running_api(keep_alive=True) as fake:
        yield fake


def test_quick_answers_are_delivered_and_share_one_connection(kept_alive):
    sink = WebhookSink("crm", kept_alive.url + "/hooks", secret=WEBHOOK_SECRET, timeout_seconds=2)
    sink.deliver(delivery())
    sink.deliver(delivery())
    first, second = kept_alive.requests
    assert (first.method, first.path) == (second.method, second.path) == ("POST", "/hooks")
    assert first.port == second.port

"""Retry-after is read in one place (`retry.retry_after_seconds`) for the Messages API and the
sinks alike: delta-seconds or an HTTP-date, and an absurd value (a year) is capped, so one
bad header can neither park a ticket until its age bound dead-letters it nor keep the shared
circuit (and every worker's classify consumption) closed for a year.

Real HTTP servers on loopback, the real SDK, real PostgreSQL and Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from sqlalchemy import select

from tests.fakeanthropic import Fault
from tests.integration.test_sinks import delivery as sink_delivery
from tests.integration.test_sinks import zendesk
from tests.support.fakehttp import Reply
from triage.classify.backends.anthropic import AnthropicBackend, ThreadClients
from triage.classify.backends.base import ClassificationRequest
from triage.config import get_config
from triage.db.models import OutboxMessage, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.errors import RateLimited
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.reliability.retry import MAX_RETRY_AFTER_SECONDS

A_YEAR = 365 * 24 * 3600


def _backend(base_url: str) -> AnthropicBackend:
    cfg = get_config()
    client = ThreadClients(api_key="sk-test", base_url=base_url, timeout=5.0)
    model = "claude-haiku-4-5"
    return AnthropicBackend(
        taxonomy=cfg.taxonomy, model=model, spec=cfg.models.spec(model), client=client
    )


def _request() -> ClassificationRequest:
    return ClassificationRequest(ticket_id=1, subject="Where is it", body="Lost parcel")


def _overloaded(retry_after: str) -> Reply:
    return Reply(
        status=529,
        body={"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
        headers={"retry-after": retry_after},
    )


def test_an_api_overload_with_an_http_date_retry_after_waits_until_that_date(api):
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    api.script("POST", "/v1/messages", _overloaded(later))
    with pytest.raises(RateLimited) as err:
        _backend(api.url).classify(_request())
    assert err.value.retry_after is not None and 100 <= err.value.retry_after <= 121


@pytest.mark.parametrize("value", ["nan", "-5", "soon"])
def test_an_unreadable_api_retry_after_is_no_retry_after(api, value):
    api.script("POST", "/v1/messages", _overloaded(value))
    with pytest.raises(RateLimited) as err:
        _backend(api.url).classify(_request())
    assert err.value.retry_after is None


def test_an_api_retry_after_of_a_year_is_capped(api):
    api.script("POST", "/v1/messages", _overloaded(str(A_YEAR)))
    with pytest.raises(RateLimited) as err:
        _backend(api.url).classify(_request())
    assert err.value.retry_after == MAX_RETRY_AFTER_SECONDS


def test_a_sink_retry_after_of_a_year_is_capped(api):
    api.script(
        "PUT", "/api/v2/tickets/101.json", Reply(status=429, headers={"Retry-After": str(A_YEAR)})
    )
    with pytest.raises(RateLimited) as err:
        zendesk(api).deliver(sink_delivery())
    assert err.value.retry_after == MAX_RETRY_AFTER_SECONDS


def test_a_429_saying_come_back_in_a_year_neither_dead_letters_nor_pauses_the_fleet_for_a_year(
    runtime, fake
):
    rt = runtime(TRIAGE_CIRCUIT_THRESHOLD="1")
    with session_scope(rt.sessions) as session:
        tid = accept_ticket(
            session,
            InboundTicket(source="generic", external_id="ra-1", subject="Refund", body="Refund"),
        ).ticket_id
    fake.add_fault(Fault("rate_limit", retry_after=A_YEAR))

    assert classify_tickets_stage(rt, [tid]) == {tid: "retry"}
    assert rt.admission is not None
    assert 0 < rt.admission.breaker.open_seconds() <= MAX_RETRY_AFTER_SECONDS
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None and ticket.state == "queued"
        # The retry's row: the newest (the webhook's own row is older, and never sent here).
        due = session.scalar(
            select(OutboxMessage.available_at)
            .where(OutboxMessage.ticket_id == tid)
            .order_by(OutboxMessage.id.desc())
            .limit(1)
        )
    assert due is not None
    wait = (due - utcnow()).total_seconds()
    # Never sooner than the (capped) retry-after; the jitter adds at most max_delay on top.
    assert MAX_RETRY_AFTER_SECONDS - 60 <= wait <= MAX_RETRY_AFTER_SECONDS + 300

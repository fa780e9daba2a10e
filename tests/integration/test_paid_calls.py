"""Every paid call is on record with its tokens and cost, also when its answer is not kept: a
refused or cut-off answer, one that never validates, a repair or escalation that fails.
The real SDK against the fake Messages API; the pipeline part on real PostgreSQL and Redis."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import select

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.support.stack import anthropic_env, make_runtime, truncate
from triage.classify.backends.anthropic import AnthropicBackend, ThreadClients
from triage.classify.backends.base import ClassificationRequest
from triage.classify.backends.cascade import CascadeBackend
from triage.config import get_config
from triage.db.models import Attempt, Classification, Ticket
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.db.stats import Window, compute
from triage.errors import InvalidOutput, OutputTruncated, Refused, TransientError
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage

SURE = "My parcel never arrived [[intent:shipping]] [[confidence:0.93]]"
UNSURE = "hmm [[intent:sales]] [[confidence:0.4]]"


@pytest.fixture()
def fake():
    with FakeAnthropic() as server:
        yield server


def backend(fake: FakeAnthropic, model: str = "claude-haiku-4-5") -> AnthropicBackend:
    cfg = get_config()
    client = ThreadClients(api_key="sk-test", base_url=fake.base_url, timeout=5.0)
    return AnthropicBackend(
        taxonomy=cfg.taxonomy, model=model, spec=cfg.models.spec(model), client=client
    )


def request(body: str = SURE) -> ClassificationRequest:
    return ClassificationRequest(ticket_id=1, subject="Where is it", body=body, channel="email")


@pytest.mark.parametrize(("kind", "error"), [("refusal", Refused), ("truncated", OutputTruncated)])
def test_a_refused_or_cut_off_answer_carries_its_tokens_and_cost(fake, kind, error):
    fake.add_fault(Fault(kind))
    with pytest.raises(error) as info:
        backend(fake).classify(request())
    usage = info.value.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.cost_usd > 0


def test_two_invalid_answers_carry_the_cost_of_both_calls(fake):
    one_call = backend(fake).classify(request()).usage
    fake.add_fault(Fault("malformed_json", times=2))
    with pytest.raises(InvalidOutput) as info:
        backend(fake).classify(request())
    usage = info.value.usage
    assert info.value.api_calls == 2 and usage is not None
    # The repair call sends the first answer back, so it reads more than a single call.
    assert usage.input_tokens > 2 * one_call.input_tokens
    assert usage.cost_usd > one_call.cost_usd


def test_a_repair_call_that_fails_keeps_the_first_answers_cost(fake):
    fake.add_fault(Fault("schema_violation"))
    fake.add_fault(Fault("server_error"))
    with pytest.raises(TransientError) as info:
        backend(fake).classify(request())
    usage = info.value.usage
    assert info.value.api_calls == 2
    assert usage is not None and usage.input_tokens > 0 and usage.cost_usd > 0


def cascade(primary: FakeAnthropic, escalation: FakeAnthropic) -> CascadeBackend:
    return CascadeBackend(
        backend(primary),
        backend(escalation, model="claude-sonnet-5"),
        escalate_below=get_config().taxonomy.routing.escalate_below_confidence,
    )


def test_a_failed_escalation_carries_the_primarys_cost(fake):
    first = backend(fake).classify(request(UNSURE)).usage
    with FakeAnthropic() as other:
        other.add_fault(Fault("server_error"))
        with pytest.raises(TransientError) as info:
            cascade(fake, other).classify(request(UNSURE))
    assert info.value.api_calls == 2
    assert info.value.usage == first


def test_an_escalation_refused_for_good_adds_its_cost_to_the_label_sent_to_review(fake):
    first = backend(fake).classify(request(UNSURE)).usage
    with FakeAnthropic() as other:
        other.add_fault(Fault("refusal"))
        result = cascade(fake, other).classify(request(UNSURE))
    assert result.review_reason is not None and result.calls == 2
    assert result.usage.input_tokens > first.input_tokens
    assert result.usage.cost_usd > first.cost_usd


def test_a_dead_lettered_tickets_paid_call_is_in_its_attempt_and_in_stats(
    pg_url, clean_redis, fake
):
    truncate(pg_url)
    rt = make_runtime(anthropic_env(pg_url, clean_redis, fake.base_url))
    with session_scope(rt.sessions) as session:
        refused = accept_ticket(
            session, InboundTicket(source="generic", external_id="r", subject="x", body=SURE)
        ).ticket_id
        labelled = accept_ticket(
            session,
            InboundTicket(
                source="generic", external_id="l", subject="y", body="Invoice? [[intent:billing]]"
            ),
        ).ticket_id
    fake.add_fault(Fault("refusal", match="parcel"))
    outcomes = classify_tickets_stage(rt, [refused, labelled])
    assert outcomes == {refused: "dead", labelled: "routed"}

    with rt.sessions() as session:
        attempt = session.scalars(select(Attempt).where(Attempt.ticket_id == refused)).one()
        label = session.scalars(
            select(Classification).where(Classification.ticket_id == labelled)
        ).one()
        kept = session.scalars(select(Attempt).where(Attempt.ticket_id == labelled)).one()
        assert session.get(Ticket, refused).state == "dead_lettered"  # type: ignore[union-attr]
        stats = compute(session, Window(None, None))
    assert attempt.outcome == "dead" and attempt.api_calls == 1
    assert attempt.input_tokens > 0 and attempt.cost_usd > 0
    # A kept answer's attempt carries the same cost as its label (and stats count it once).
    assert (kept.input_tokens, kept.cost_usd) == (label.input_tokens, label.cost_usd)
    usage = stats["usage"]
    assert usage["api_calls"] == 2
    assert usage["input_tokens"] == attempt.input_tokens + label.input_tokens
    assert Decimal(usage["cost_usd"]) == attempt.cost_usd + label.cost_usd
    assert usage["without_label"] == {"api_calls": 1, "cost_usd": str(attempt.cost_usd)}


def test_a_repair_call_is_charged_to_the_shared_budget(pg_url, clean_redis, fake):
    # One call a second: the admitted call and the repair call it needed use two seconds of
    # budget, so a ticket right after them waits about a second more than after one call.
    truncate(pg_url)
    rt = make_runtime(
        anthropic_env(pg_url, clean_redis, fake.base_url, TRIAGE_API_CALLS_PER_MINUTE="60")
    )
    with session_scope(rt.sessions) as session:
        ticket = accept_ticket(
            session, InboundTicket(source="generic", external_id="a", subject="x", body=SURE)
        ).ticket_id
    fake.add_fault(Fault("schema_violation"))
    started_ms = time.time() * 1000
    assert classify_tickets_stage(rt, [ticket]) == {ticket: "routed"}
    ended_ms = time.time() * 1000
    assert fake.call_count() == 2
    client = redis.Redis.from_url(clean_redis)
    (key,) = client.keys("triage:limit:calls")
    # The budget's next free moment: two seconds past the admission (at or after `started_ms`)
    # when both calls were charged, one second when only the admitted one was. Bounded by the
    # stage's own start and end, so a slow machine moves neither bound.
    next_free_ms = float(client.get(key) or 0)
    assert started_ms + 1_950 <= next_free_ms <= ended_ms + 2_050


def _spent(model: str) -> float:
    return REGISTRY.get_sample_value("triage_cost_usd_total", {"model": model}) or 0.0


def test_spend_metrics_count_every_answer_under_the_model_that_gave_it(fake):
    haiku, sonnet = "claude-haiku-4-5", "claude-sonnet-5"
    before = _spent(haiku), _spent(sonnet)
    fake.add_fault(Fault("refusal"))
    with pytest.raises(Refused) as info:
        backend(fake).classify(request())
    assert info.value.usage is not None
    refused_cost = float(info.value.usage.cost_usd)
    assert _spent(haiku) == pytest.approx(before[0] + refused_cost)

    mid = _spent(haiku), _spent(sonnet)
    result = cascade(fake, fake).classify(request(UNSURE))
    assert result.model == sonnet and result.calls == 2
    # The cheap model's answer is billed at its price, the escalation's at its own.
    assert _spent(haiku) > mid[0] and _spent(sonnet) > mid[1]
    assert _spent(haiku) - mid[0] + _spent(sonnet) - mid[1] == pytest.approx(
        float(result.usage.cost_usd)
    )

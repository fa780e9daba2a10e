"""The Anthropic backend through the real SDK against the fake Messages API: what it sends,
and how each kind of answer or failure comes back."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from tests.fakeanthropic import FakeAnthropic, Fault
from triage.classify.backends.anthropic import AnthropicBackend, ThreadClients
from triage.classify.backends.base import ClassificationRequest
from triage.classify.backends.cascade import CascadeBackend
from triage.classify.schema import output_schema
from triage.config import get_config
from triage.errors import (
    ApiKeyRejected,
    InvalidOutput,
    OutputTruncated,
    PermanentError,
    RateLimited,
    Refused,
    TransientError,
)


@pytest.fixture(scope="module")
def fake():
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(fake):
    fake.clear_faults()
    fake.requests.clear()
    yield


def backend(fake, model="claude-haiku-4-5", timeout=5.0) -> AnthropicBackend:
    cfg = get_config()
    client = ThreadClients(api_key="sk-test", base_url=fake.base_url, timeout=timeout)
    return AnthropicBackend(
        taxonomy=cfg.taxonomy, model=model, spec=cfg.models.spec(model), client=client
    )


def request(body="My parcel never arrived [[intent:shipping]] [[confidence:0.93]]"):
    return ClassificationRequest(ticket_id=1, subject="Where is it", body=body, channel="email")


def test_request_carries_schema_model_small_max_tokens_and_temperature_zero(fake):
    result = backend(fake).classify(request())
    sent = fake.requests[-1].body
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["max_tokens"] == 256
    assert sent["temperature"] == 0
    assert sent["output_config"]["format"] == {
        "type": "json_schema",
        "schema": output_schema(get_config().taxonomy),
    }
    assert "shipping" in sent["system"][0]["text"]
    assert result.label.intent == "shipping" and result.label.confidence == pytest.approx(0.93)
    assert result.model == "claude-haiku-4-5" and result.calls == 1
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert result.usage.cost_usd > Decimal("0") and result.latency_ms > 0
    assert result.request_id and result.request_id.startswith("req_")


def test_model_that_rejects_sampling_gets_no_temperature(fake):
    result = backend(fake, model="claude-haiku-5-5").classify(request())
    sent = fake.requests[-1].body
    assert sent["model"] == "claude-haiku-5-5"
    assert "temperature" not in sent and "top_p" not in sent and "top_k" not in sent
    assert result.label.intent == "shipping"


def test_cost_follows_the_price_table(fake):
    result = backend(fake).classify(request())
    spec = get_config().models.spec("claude-haiku-4-5")
    u = result.usage
    assert u.cost_usd == spec.cost(u.input_tokens, u.output_tokens)


def test_rate_limit_is_transient_with_retry_after(fake):
    fake.add_fault(Fault("rate_limit", retry_after=7))
    with pytest.raises(RateLimited) as info:
        backend(fake).classify(request())
    assert info.value.retry_after == pytest.approx(7)
    assert len(fake.requests) == 1  # the SDK did not retry behind our back


@pytest.mark.parametrize("kind", ["overloaded", "server_error", "drop"])
def test_overload_server_errors_and_dropped_connections_are_transient(fake, kind):
    fake.add_fault(Fault(kind))
    with pytest.raises(TransientError):
        backend(fake).classify(request())


def test_a_200_whose_body_is_not_a_message_is_transient_and_names_the_request(fake):
    fake.add_fault(Fault("cut_body"))
    with pytest.raises(TransientError, match="not a Message") as info:
        backend(fake).classify(request())
    assert info.value.request_id and info.value.request_id.startswith("req_")
    assert info.value.api_calls == 1
    assert len(fake.requests) == 1


def test_request_id_and_usage_come_from_the_answer(fake):
    result = backend(fake).classify(request())
    assert result.request_id and result.request_id.startswith("req_")
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0


def test_timeout_is_transient(fake):
    fake.add_fault(Fault("timeout"))
    with pytest.raises(TransientError, match="timeout"):
        backend(fake, timeout=0.5).classify(request())


def test_an_answer_trickling_past_the_timeout_is_abandoned_at_the_timeout_as_transient(fake):
    # Every read gets bytes within milliseconds, so no read timeout fires; the whole answer
    # would take 5 s. The call must end at about its 0.5 s timeout, well inside the lease.
    fake.add_fault(Fault("trickle", delay=5.0))
    started = time.monotonic()
    with pytest.raises(TransientError, match="timeout"):
        backend(fake, timeout=0.5).classify(request())
    assert time.monotonic() - started < 1.5


def test_an_answer_trickling_within_the_timeout_is_read_whole(fake):
    fake.add_fault(Fault("trickle", delay=0.3))
    result = backend(fake, timeout=5.0).classify(request())
    assert result.label.intent == "shipping" and result.calls == 1


def test_a_bad_request_is_permanent(fake):
    fake.add_fault(Fault("bad_request"))
    with pytest.raises(PermanentError):
        backend(fake).classify(request())


def test_a_rejected_key_is_its_own_transient_error(fake):
    fake.add_fault(Fault("auth"))
    with pytest.raises(ApiKeyRejected, match="401 authentication_error") as info:
        backend(fake).classify(request())
    assert info.value.api_calls == 1 and "invalid x-api-key" in info.value.quoted


def test_refusal_is_a_typed_error_not_a_label(fake):
    fake.add_fault(Fault("refusal"))
    with pytest.raises(Refused):
        backend(fake).classify(request())


def test_truncated_output_is_a_typed_error(fake):
    fake.add_fault(Fault("truncated"))
    with pytest.raises(OutputTruncated):
        backend(fake).classify(request())


def test_an_answer_cut_off_by_the_context_window_is_truncated_not_repaired(fake):
    # The SDK's StopReason includes model_context_window_exceeded: the answer stopped where
    # the context ran out, like max_tokens. A repair call would add to that same context.
    fake.add_fault(Fault("context_window"))
    with pytest.raises(OutputTruncated, match="context window") as info:
        backend(fake).classify(request())
    assert info.value.api_calls == 1 and len(fake.requests) == 1


def test_invalid_output_gets_one_repair_call_that_shows_the_error(fake):
    fake.add_fault(Fault("schema_violation", times=1))
    result = backend(fake).classify(request())
    assert result.calls == 2 and result.label.intent == "shipping"
    repair = fake.requests[-1].body["messages"]
    assert [m["role"] for m in repair] == ["user", "assistant", "user"]
    assert "intent" in repair[-1]["content"]


def test_output_invalid_twice_is_permanent(fake):
    fake.add_fault(Fault("malformed_json", times=2))
    with pytest.raises(InvalidOutput) as info:
        backend(fake).classify(request())
    assert info.value.api_calls == 2


def test_cascade_escalates_only_unsure_tickets(fake):
    cfg = get_config()
    cascade = CascadeBackend(
        backend(fake),
        backend(fake, model="claude-sonnet-5"),
        escalate_below=cfg.taxonomy.routing.escalate_below_confidence,
    )
    sure = cascade.classify(request())
    assert sure.calls == 1 and sure.model == "claude-haiku-4-5"
    unsure = cascade.classify(request("hmm [[intent:sales]] [[confidence:0.4]]"))
    assert unsure.calls == 2 and unsure.model == "claude-sonnet-5"
    assert [r.body["model"] for r in fake.requests[-2:]] == ["claude-haiku-4-5", "claude-sonnet-5"]


@pytest.mark.parametrize(("kind", "error"), [("refusal", Refused), ("truncated", OutputTruncated)])
def test_a_refused_or_cut_off_answer_still_counts_its_paid_call(fake, kind, error):
    fake.add_fault(Fault(kind))
    with pytest.raises(error) as info:
        backend(fake).classify(request())
    assert info.value.api_calls == 1


def test_an_escalation_that_cannot_answer_sends_the_unsure_label_to_a_person(fake):
    cfg = get_config()
    # An escalation model the API refuses for good: this table entry offers it a
    # temperature, which the model answers with a 400.
    broken = AnthropicBackend(
        taxonomy=cfg.taxonomy,
        model="claude-sonnet-5",
        spec=cfg.models.spec("claude-haiku-4-5"),
        client=ThreadClients(api_key="sk-test", base_url=fake.base_url, timeout=5.0),
    )
    cascade = CascadeBackend(
        backend(fake), broken, escalate_below=cfg.taxonomy.routing.escalate_below_confidence
    )
    result = cascade.classify(request("hmm [[intent:sales]] [[confidence:0.4]]"))
    # The first label (paid for and valid, only unsure) stands, for a person to check.
    assert result.label.intent == "sales" and result.model == "claude-haiku-4-5"
    assert result.calls == 2 and result.review_reason is not None
    assert "escalation model could not answer" in result.review_reason
    assert [r.body["model"] for r in fake.requests[-2:]] == ["claude-haiku-4-5", "claude-sonnet-5"]

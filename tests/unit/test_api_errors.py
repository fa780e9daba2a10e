"""What an SDK failure means to the retry policy: a rejected key waits (and pauses the fleet),
a model the key may not use and a model that does not exist are permanent."""

from __future__ import annotations

import random

import anthropic
import httpx
import pytest

from triage.classify.backends.anthropic import translate_api_error
from triage.errors import ApiKeyRejected, PermanentError, RateLimited, TransientError
from triage.reliability.retry import RetryPolicy, decide

URL = "https://api.anthropic.com/v1/messages"


def status_error(status: int, kind: str, message: str) -> anthropic.APIStatusError:
    """The SDK's own error for an answer of the API's real error shape."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    response = httpx.Response(
        status, json=body, headers={"request-id": "req_1"}, request=httpx.Request("POST", URL)
    )
    client = anthropic.Anthropic(api_key="sk-test", max_retries=0)
    return client._make_status_error_from_response(response)


def test_a_401_is_a_rejected_key_retried_like_an_overload_not_dead_lettered():
    error = translate_api_error(
        status_error(401, "authentication_error", "invalid x-api-key"), ticket_id=7
    )
    assert isinstance(error, ApiKeyRejected) and isinstance(error, TransientError)
    assert not isinstance(error, PermanentError | RateLimited)
    assert error.summary == "API 401 authentication_error"
    assert error.ticket_id == 7 and error.request_id == "req_1"
    policy = RetryPolicy(max_attempts=6, base_delay=2.0, max_delay=300.0, max_age=6 * 3600.0)
    decision = decide(policy, error, attempt=1, age_seconds=0, rng=random.Random(1))
    assert decision.retry and decision.reason == "ApiKeyRejected"
    assert not decide(policy, error, attempt=6, age_seconds=0).retry


@pytest.mark.parametrize(("status", "kind"), [(403, "permission_error"), (404, "not_found_error")])
def test_a_403_or_404_stays_permanent(status, kind):
    error = translate_api_error(status_error(status, kind, "model: claude-sonnet-5"))
    assert type(error) is PermanentError
    assert error.summary == f"API {status} {kind}"

"""The one retry policy: transient errors back off with jitter, never before retry-after;
permanent errors and exhausted budgets dead-letter."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from triage.errors import InvalidOutput, PermanentError, RateLimited, Refused, TransientError
from triage.reliability.retry import (
    MAX_RETRY_AFTER_SECONDS,
    RetryPolicy,
    as_triage_error,
    decide,
    retry_after_seconds,
)

POLICY = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=30.0, max_age=3600.0)


def test_transient_error_is_retried_within_the_exponential_ceiling():
    rng = random.Random(7)
    for attempt in range(1, 5):
        d = decide(POLICY, TransientError("boom"), attempt=attempt, age_seconds=0, rng=rng)
        assert d.retry
        assert 0 <= d.delay <= min(30.0, 2 ** (attempt - 1))


def test_full_jitter_spreads_delays():
    rng = random.Random(1)
    delays = {
        round(decide(POLICY, TransientError("x"), attempt=4, age_seconds=0, rng=rng).delay, 3)
        for _ in range(50)
    }
    assert len(delays) > 40


def test_retry_after_is_a_floor():
    rng = random.Random(3)
    d = decide(POLICY, RateLimited("429", retry_after=12.5), attempt=1, age_seconds=0, rng=rng)
    assert d.retry and d.delay >= 12.5


def test_attempts_are_bounded():
    d = decide(POLICY, TransientError("x"), attempt=5, age_seconds=0)
    assert not d.retry and "exhausted" in d.reason


def test_age_is_bounded():
    d = decide(POLICY, RateLimited("x", retry_after=120), attempt=1, age_seconds=3500)
    assert not d.retry and "old" in d.reason


def test_permanent_errors_are_never_retried():
    for err in (PermanentError("400"), InvalidOutput("bad"), Refused("no")):
        assert not decide(POLICY, err, attempt=1, age_seconds=0).retry


def test_database_outage_is_transient_and_unknown_bugs_are_permanent():
    db_down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    assert isinstance(as_triage_error(db_down), TransientError)
    assert isinstance(as_triage_error(ConnectionResetError()), TransientError)
    assert isinstance(as_triage_error(KeyError("x")), PermanentError)


def test_truncated_output_is_transient_and_retried():
    from triage.errors import OutputTruncated

    d = decide(POLICY, OutputTruncated("cut off"), attempt=1, age_seconds=0)
    assert d.retry


def test_attempts_that_never_reported_count_against_the_bound():
    # A ticket claimed for the 7th time under a 5-attempt policy is dead-lettered, not called.
    d = decide(POLICY, TransientError("worker lost"), attempt=7, age_seconds=0)
    assert not d.retry and "exhausted" in d.reason


def test_database_outage_backs_off_briefly_within_the_broker_countdown_limit():
    from triage.pipeline.relay import MAX_BROKER_COUNTDOWN_SECONDS
    from triage.reliability.retry import infrastructure_delay, is_database_outage

    rng = random.Random(5)
    delays = [infrastructure_delay(n, rng) for n in range(40)]
    assert all(0.5 <= d <= MAX_BROKER_COUNTDOWN_SECONDS for d in delays)
    assert max(delays[:2]) <= 2 and max(delays[10:]) > 5
    assert is_database_outage(OperationalError("SELECT 1", {}, Exception("refused")))
    assert not is_database_outage(KeyError("x"))


def test_a_spooled_tickets_unbounded_retries_keep_a_short_delay_however_many():
    # A spooled webhook waits for the database without a bound: after 1,024 retries (about
    # two hours at 8 s each) 2.0**retries overflowed, and the ticket's only copy was dropped.
    from triage.pipeline.relay import MAX_BROKER_COUNTDOWN_SECONDS
    from triage.reliability.retry import infrastructure_delay

    rng = random.Random(5)
    for retries in (1_023, 1_024, 100_000):
        assert 0.5 <= infrastructure_delay(retries, rng) <= MAX_BROKER_COUNTDOWN_SECONDS


def test_the_sdk_never_retries_behind_the_policy():
    from triage.classify.backends.anthropic import ThreadClients, make_client

    assert make_client(api_key="k", base_url=None, timeout=5).max_retries == 0
    assert ThreadClients(api_key="k", base_url=None, timeout=5).get().max_retries == 0


def test_each_thread_gets_its_own_sdk_client_sharing_one_tls_context():
    import threading

    from triage.classify.backends.anthropic import ThreadClients

    clients = ThreadClients(api_key="k", base_url="http://127.0.0.1:9", timeout=5)
    mine = clients.get()
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(clients.get()))
    thread.start()
    thread.join()
    assert clients.get() is mine
    assert theirs[0] is not mine
    contexts = {
        id(client._client._transport._pool._ssl_context)  # type: ignore[attr-defined]
        for client in (mine, theirs[0])
    }
    assert len(contexts) == 1


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "12"}, 12.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date gone by: now
        ({"Retry-After": "9" * 400}, MAX_RETRY_AFTER_SECONDS),  # past a float's range
        ({"Retry-After": "31536000"}, MAX_RETRY_AFTER_SECONDS),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_in_both_forms_and_absurd_values_are_capped(headers, seconds):
    assert retry_after_seconds(httpx.Headers(headers)) == seconds


def test_an_http_date_retry_after_is_the_seconds_until_that_date():
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    seconds = retry_after_seconds(httpx.Headers({"Retry-After": later}))
    assert seconds is not None and 80 <= seconds <= 91

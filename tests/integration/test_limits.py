"""The shared API budget and circuit breaker, against the real Redis every worker shares."""

from __future__ import annotations

import time

import redis

from tests.support.stack import wait_until
from triage.reliability.limits import Admission, ApiLimiter, CircuitBreaker, Limits


def test_calls_per_minute_admits_one_minutes_burst_then_asks_to_wait(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    limiter = ApiLimiter(client, Limits(calls_per_minute=60))
    waits = [limiter.acquire(100) for _ in range(61)]
    assert waits[:60] == [0.0] * 60
    assert 0.5 < waits[60] <= 1.01  # one call per second once the burst is spent


def test_a_second_limiter_on_another_host_shares_the_budget(clean_redis):
    a = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(calls_per_minute=10))
    b = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(calls_per_minute=10))
    granted = sum(1 for i in range(20) if (a if i % 2 else b).acquire(1) == 0)
    assert granted == 10


def test_token_budget_counts_input_tokens(clean_redis):
    limiter = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(input_tokens_per_minute=1000))
    assert limiter.acquire(600) == 0
    assert limiter.acquire(300) == 0
    assert limiter.acquire(300) > 0  # 1,200 > 1,000 in the window


def test_a_refused_request_does_not_consume_budget(clean_redis):
    limiter = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(calls_per_minute=1))
    assert limiter.acquire(1) == 0
    first_wait = limiter.acquire(1)
    assert first_wait > 0
    assert limiter.acquire(1) <= first_wait


def test_breaker_opens_after_sustained_overload_and_honours_retry_after(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    breaker = CircuitBreaker(client, threshold=3, window=10, cooldown=5)
    assert breaker.record_overload() is False
    assert breaker.record_overload() is False
    assert breaker.wait_seconds() == 0
    assert breaker.record_overload(retry_after=20) is True
    assert 19 < breaker.wait_seconds() <= 20
    admission = Admission(ApiLimiter(client, Limits()), breaker)
    assert admission.wait_seconds(10) > 19


def test_unlimited_by_default(clean_redis):
    limiter = ApiLimiter(redis.Redis.from_url(clean_redis), Limits())
    assert all(limiter.acquire(10_000) == 0 for _ in range(100))


def test_sporadic_overloads_among_good_answers_do_not_open_the_breaker(clean_redis):
    breaker = CircuitBreaker(redis.Redis.from_url(clean_redis), threshold=3, window=10)
    for _ in range(10):
        for _ in range(5):
            breaker.record_success()
        assert breaker.record_overload() is False
    assert breaker.wait_seconds() == 0 and breaker.open_seconds() == 0


def test_an_outage_after_a_busy_spell_opens_the_breaker_after_threshold_overloads_in_a_row(
    clean_redis,
):
    breaker = CircuitBreaker(redis.Redis.from_url(clean_redis), threshold=20, window=30)
    # A busy spell: the window holds 1,000 good answers, so the ratio alone would need about
    # 1,000 overloads before it opened.
    breaker.record_success(1000)
    opened = [breaker.record_overload() for _ in range(20)]
    assert opened == [False] * 19 + [True]
    assert breaker.open_seconds() > 0


def test_a_good_answer_between_overloads_restarts_the_count_in_a_row(clean_redis):
    breaker = CircuitBreaker(redis.Redis.from_url(clean_redis), threshold=5, window=30)
    breaker.record_success(1000)
    for _ in range(4):
        for _ in range(4):
            assert breaker.record_overload() is False
        breaker.record_success()
    assert breaker.open_seconds() == 0


def test_after_the_cooldown_one_probe_goes_and_its_success_closes_the_breaker(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    breaker = CircuitBreaker(client, threshold=2, window=10, cooldown=0.2, probe_interval=5)
    breaker.record_overload()
    assert breaker.record_overload() is True
    assert breaker.open_seconds() > 0
    # Answers to calls sent before the circuit opened do not close it.
    breaker.record_success()
    wait_until(lambda: breaker.open_seconds() == 0, 5, what="cool-down over")
    assert breaker.wait_seconds() == 0  # this caller is the probe
    assert breaker.wait_seconds() > 0  # everyone else waits for it
    breaker.record_success()
    assert breaker.wait_seconds() == 0 and breaker.wait_seconds() == 0


def test_an_overload_during_the_probe_opens_the_breaker_again(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    breaker = CircuitBreaker(client, threshold=2, window=10, cooldown=0.2, probe_interval=5)
    breaker.record_overload()
    breaker.record_overload()
    wait_until(lambda: breaker.open_seconds() == 0, 5, what="cool-down over")
    assert breaker.wait_seconds() == 0
    assert breaker.record_overload() is True
    assert breaker.open_seconds() > 0


def test_one_rejected_key_opens_the_breaker_at_once_for_the_auth_cooldown(clean_redis):
    breaker = CircuitBreaker(
        redis.Redis.from_url(clean_redis), threshold=20, cooldown=5, auth_cooldown=40
    )
    breaker.record_success(1000)
    assert breaker.record_key_rejected() is True
    assert 39 < breaker.open_seconds() <= 40 and breaker.open_reason() == "api_key_rejected"
    # The calls in flight with it answer 401 too: the same opening, announced once.
    assert [breaker.record_key_rejected() for _ in range(5)] == [False] * 5
    assert 39 < breaker.open_seconds() <= 40


def test_a_rejected_key_probe_opens_the_breaker_again_and_a_good_one_closes_it(clean_redis):
    breaker = CircuitBreaker(redis.Redis.from_url(clean_redis), auth_cooldown=0.2, probe_interval=5)
    breaker.record_key_rejected()
    wait_until(lambda: breaker.open_seconds() == 0, 5, what="cool-down over")
    assert breaker.wait_seconds() == 0  # this caller is the probe
    assert breaker.wait_seconds() > 0  # everyone else waits for it
    assert breaker.record_key_rejected() is True  # the key is still bad
    assert breaker.open_seconds() > 0 and breaker.open_reason() == "api_key_rejected"
    wait_until(lambda: breaker.open_seconds() == 0, 5, what="second cool-down over")
    breaker.record_success()  # the key works again
    assert breaker.wait_seconds() == 0 and breaker.wait_seconds() == 0
    assert breaker.open_reason() is None


def test_a_rejected_key_while_open_for_overload_holds_it_open_for_the_key(clean_redis):
    breaker = CircuitBreaker(
        redis.Redis.from_url(clean_redis), threshold=1, cooldown=5, auth_cooldown=40
    )
    assert breaker.record_overload() is True and breaker.open_reason() == "overload"
    assert breaker.record_key_rejected() is True
    assert 39 < breaker.open_seconds() <= 40 and breaker.open_reason() == "api_key_rejected"
    # A later overload answer neither shortens it nor changes why.
    assert breaker.record_overload() is False and breaker.open_reason() == "api_key_rejected"


def test_calls_made_without_asking_are_charged_and_later_calls_wait_for_them(clean_redis):
    limiter = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(calls_per_minute=60))
    assert [limiter.acquire(1) for _ in range(50)] == [0.0] * 50
    # A repair call and escalations that went without admission use up the rest.
    limiter.charge(10, 5_000)
    assert 0.5 < limiter.acquire(1) <= 1.01


def test_input_beyond_the_estimate_is_charged_to_the_token_budget(clean_redis):
    limiter = ApiLimiter(redis.Redis.from_url(clean_redis), Limits(input_tokens_per_minute=1000))
    assert limiter.acquire(500) == 0
    limiter.charge(0, 400)
    assert limiter.acquire(200) > 0  # 1,100 > 1,000 in the window
    assert limiter.acquire(100) == 0


def test_charging_an_unlimited_budget_does_nothing(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    ApiLimiter(client, Limits()).charge(5, 5_000)
    assert client.keys("triage:limit:*") == []


def test_a_call_told_to_go_is_always_charged_even_when_its_wait_was_under_a_millisecond(
    clean_redis,
):
    # 1,000 tokens per ms: a 500-token call is half a millisecond of the budget.
    limiter = ApiLimiter(
        redis.Redis.from_url(clean_redis), Limits(input_tokens_per_minute=60_000_000)
    )
    assert limiter.acquire(60_000_000) == 0  # the minute's burst, spent
    started = time.monotonic()
    admitted = sum(1 for _ in range(200) if limiter.acquire(500) == 0)
    elapsed_ms = (time.monotonic() - started) * 1000
    # Each admitted call moves the budget on by 0.5 ms: no more can go than time allows.
    # (Before, a wait under 1 ms came back as 0, "go", without being charged: all 200 went.)
    assert admitted <= elapsed_ms / 0.5 + 2


def test_a_process_knows_of_an_opening_without_asking_redis_until_it_reads_the_circuit(
    clean_redis,
):
    client = redis.Redis.from_url(clean_redis)
    here = CircuitBreaker(client, threshold=1, cooldown=30)
    elsewhere = CircuitBreaker(client, threshold=1, cooldown=30)
    assert here.known_open_seconds() == 0
    # Its own answer opened the circuit: it knows at once.
    assert here.record_overload() is True
    assert 29 < here.known_open_seconds() <= 30
    # Another process learns of it when it next reads the circuit, not before.
    assert elsewhere.known_open_seconds() == 0
    assert elsewhere.open_seconds() > 29
    assert 29 < elsewhere.known_open_seconds() <= 30
    # What it knows is what it last read: closed in Redis (a person reset it), still open
    # here until the next read says otherwise.
    client.delete("triage:circuit:open-until")
    assert here.known_open_seconds() > 29
    assert here.wait_seconds() == 0
    assert here.known_open_seconds() == 0


def test_a_process_that_meets_a_401_after_another_opened_the_circuit_knows_it_is_open(
    clean_redis,
):
    client = redis.Redis.from_url(clean_redis)
    first = CircuitBreaker(client, auth_cooldown=60)
    second = CircuitBreaker(client, auth_cooldown=60)
    assert first.record_key_rejected() is True
    # The same opening, announced once; but the thread that met this 401 knows of it too,
    # before it hands its call slot to the next call in line.
    assert second.record_key_rejected() is False
    assert 59 < second.known_open_seconds() <= 60
    # Likewise an overload answer while the circuit is open.
    third = CircuitBreaker(client, auth_cooldown=60)
    assert third.record_overload() is False
    assert 59 < third.known_open_seconds() <= 60


def test_a_batch_is_decided_in_one_call_as_calls_one_by_one_would_decide_it(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    limits = Limits(calls_per_minute=60, input_tokens_per_minute=1_000)
    batch = ApiLimiter(client, limits, prefix="triage:limit:batch")
    single = ApiLimiter(client, limits, prefix="triage:limit:single")
    # 600 and 300 fit the minute's 1,000 tokens; 300 more must wait, and is not charged, so
    # the 100 after it still fits; then the tokens are spent.
    tokens = [600, 300, 300, 100, 50]
    script, scripts_run = batch._script, []
    batch._script = lambda **kw: scripts_run.append(kw) or script(**kw)
    waits = batch.acquire_each(tokens)
    assert len(scripts_run) == 1  # one round trip for the five
    assert waits[:2] == [0.0, 0.0] and waits[3] == 0.0
    assert waits[2] > 0 and waits[4] > 0
    one_by_one = [single.acquire(t) for t in tokens]
    assert [w == 0 for w in waits] == [w == 0 for w in one_by_one]
    assert abs(waits[2] - one_by_one[2]) < 0.5 and abs(waits[4] - one_by_one[4]) < 0.5
    # Both budgets now hold the same charge: 1,000 tokens and four calls.
    assert batch.acquire(1) > 0 and single.acquire(1) > 0


def test_admission_charges_a_batch_in_one_call_and_only_the_probe_when_half_open(clean_redis):
    client = redis.Redis.from_url(clean_redis)
    breaker = CircuitBreaker(client, threshold=2, window=10, cooldown=0.2, probe_interval=5)
    admission = Admission(ApiLimiter(client, Limits(calls_per_minute=5)), breaker)
    waits = admission.admit([10, 10, 10])
    assert waits == [0.0, 0.0, 0.0]
    breaker.record_overload()
    assert breaker.record_overload() is True
    wait_until(lambda: breaker.open_seconds() == 0, 5, what="cool-down over")
    # Half open: the first ticket is the probe, the others wait the probe interval.
    assert admission.admit([10, 10, 10]) == [0.0, 5.0, 5.0]
    breaker.record_success()
    # The probe was the only one of those charged: one call of the burst of five is left.
    waits = admission.admit([10, 10])
    assert waits[0] == 0.0 and waits[1] > 0

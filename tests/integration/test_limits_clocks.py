"""The shared budget and circuit breaker go by Redis's clock, not each host's: workers on
hosts whose clocks differ by minutes (a VM without NTP, a container after a suspend) still
share one budget and see one circuit, open for its cool-down.

Real Redis. A host's clock is this process's `time.time`, set ahead or behind for the calls
that host makes (nothing else here reads it); Redis and the network are real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from tests.support.stack import wait_until
from triage.reliability.limits import ApiLimiter, CircuitBreaker, Limits

TEN_MINUTES = 600.0


@contextmanager
def clock_off_by(seconds: float) -> Iterator[None]:
    """This process's wall clock, `seconds` off while inside (another host's view of time)."""
    real: Callable[[], float] = time.time
    time.time = lambda: real() + seconds  # type: ignore[assignment]
    try:
        yield
    finally:
        time.time = real  # type: ignore[assignment]


@pytest.mark.parametrize("skew", [TEN_MINUTES, -TEN_MINUTES], ids=["ahead", "behind"])
def test_a_circuit_opened_by_a_host_with_a_wrong_clock_is_open_for_its_cooldown_everywhere(
    clean_redis, skew
):
    def breaker() -> CircuitBreaker:
        return CircuitBreaker(redis.Redis.from_url(clean_redis), threshold=1, cooldown=30)

    with clock_off_by(skew):
        assert breaker().record_overload() is True
    other = breaker()
    assert 25 < other.open_seconds() <= 30
    assert 25 < other.wait_seconds() <= 30


def test_a_good_answer_on_a_host_with_a_wrong_clock_does_not_skip_the_half_open_probe(
    clean_redis,
):
    def breaker() -> CircuitBreaker:
        return CircuitBreaker(
            redis.Redis.from_url(clean_redis), threshold=1, cooldown=0.5, probe_interval=5
        )

    assert breaker().record_overload() is True
    with clock_off_by(TEN_MINUTES):
        # An answer to a call sent before the circuit opened, on a host that thinks the
        # cool-down ended long ago: it proves nothing about the API now.
        breaker().record_success()
    wait_until(lambda: breaker().open_seconds() == 0, 5, what="cool-down over")
    # Half-open: one probe goes, everyone else waits for it.
    assert breaker().check() == (0.0, True)
    assert breaker().check() == (5, False)


def test_hosts_whose_clocks_differ_share_one_budget(clean_redis):
    def limiter() -> ApiLimiter:
        return ApiLimiter(redis.Redis.from_url(clean_redis), Limits(calls_per_minute=60))

    with clock_off_by(TEN_MINUTES):
        assert limiter().acquire(1) == 0
    # A minute's burst is 60 calls; one is spent.
    assert [limiter().acquire(1) for _ in range(59)] == [0.0] * 59
    assert 0 < limiter().acquire(1) <= 1.01

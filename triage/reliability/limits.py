"""Backpressure shared by every worker on every host, kept in Redis.

- `ApiLimiter`: calls and input tokens per minute (GCRA: a ticket may go when the account's
  rate allows it; bursts up to one minute's budget). Configure it to the account's tier.
- `CircuitBreaker`: after sustained 429/529 answers the API is left alone for a cool-down, and
  tickets wait on the broker instead of spending their attempts into the dead-letter queue:
  workers stop consuming `triage.classify` while it is open (see
  `triage/pipeline/consumption.py`) and resume by themselves when a probe call succeeds.

Both answer "go now" or "come back in N seconds"; the classify stage decides what to do with
that (sleep briefly, or put the ticket back on the queue without using an attempt).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from triage.reliability.retry import MAX_RETRY_AFTER_SECONDS

# KEYS: one GCRA key per limit. ARGV: now_ms, then (interval_ms, burst_ms, quantity) per key.
# Returns 0 when every limit admits the request (and records it), else ms to wait.
_GCRA = """
local now = tonumber(ARGV[1])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 + (i - 1) * 3])
  local burst = tonumber(ARGV[3 + (i - 1) * 3])
  local qty = tonumber(ARGV[4 + (i - 1) * 3])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * qty
  local allow_at = new_tat - burst
  if allow_at > now and (allow_at - now) > wait then wait = allow_at - now end
  tats[i] = new_tat
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
end
return 0
"""

# The same buckets, charged without asking: for calls that went without admission (a repair
# call, an escalation) and input beyond what was estimated. Later calls wait for them.
# KEYS and ARGV as _GCRA's (burst unused).
_CHARGE = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 + (i - 1) * 3])
  local qty = tonumber(ARGV[4 + (i - 1) * 3])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * qty
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Limits:
    calls_per_minute: int = 0
    input_tokens_per_minute: int = 0

    @property
    def enabled(self) -> bool:
        return self.calls_per_minute > 0 or self.input_tokens_per_minute > 0


class ApiLimiter:
    def __init__(
        self, client: redis.Redis[bytes], limits: Limits, prefix: str = "triage:limit"
    ) -> None:
        self._client = client
        self._limits = limits
        self._prefix = prefix
        self._script: Any = client.register_script(_GCRA)
        self._charge: Any = client.register_script(_CHARGE)

    @property
    def enabled(self) -> bool:
        return self._limits.enabled

    def acquire(self, input_tokens: int) -> float:
        """0.0 when the call may go now (and is counted); otherwise seconds to wait."""
        keys, args = self._buckets(1, max(1, input_tokens))
        if not keys:
            return 0.0
        wait_ms = float(self._script(keys=keys, args=args))
        return wait_ms / 1000

    def charge(self, calls: int, input_tokens: int) -> None:
        """Count calls and input tokens already spent without `acquire` (a repair call, an
        escalation, input beyond the estimate): the budget is the account's, whatever asked."""
        keys, args = self._buckets(calls, input_tokens)
        if keys:
            self._charge(keys=keys, args=args)

    def _buckets(self, calls: int, input_tokens: int) -> tuple[list[str], list[float]]:
        keys: list[str] = []
        args: list[float] = [time.time() * 1000]
        for name, per_minute, qty in (
            ("calls", self._limits.calls_per_minute, calls),
            ("tokens", self._limits.input_tokens_per_minute, input_tokens),
        ):
            if per_minute <= 0 or qty <= 0:
                continue
            interval = 60_000 / per_minute
            # A single request larger than the whole minute's budget must still get through.
            burst = max(60_000.0, interval * qty)
            keys.append(f"{self._prefix}:{name}")
            args += [interval, burst, qty]
        return keys, args


# KEYS: calls bucket, overload bucket of this second, open-until key, half-open key.
# ARGV: now (s), second, window (s), threshold, min ratio, cooldown, retry_after, prefix.
# Counts one overload answer; opens the circuit when the window holds at least `threshold`
# overloads and they are at least `ratio` of the answers (or at once when half-open).
_OVERLOAD = """
local now = tonumber(ARGV[1])
local second = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local threshold = tonumber(ARGV[4])
local ratio = tonumber(ARGV[5])
local cooldown = tonumber(ARGV[6])
local retry_after = tonumber(ARGV[7])
local prefix = ARGV[8]
redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], window + 5)
redis.call('INCR', KEYS[2]); redis.call('EXPIRE', KEYS[2], window + 5)
local run = redis.call('INCR', KEYS[5]); redis.call('EXPIRE', KEYS[5], window + 5)
if tonumber(redis.call('GET', KEYS[3]) or 0) > now then return 0 end
local trip = redis.call('EXISTS', KEYS[4]) == 1 or run >= threshold
if not trip then
  local calls, over = 0, 0
  for s = second - window + 1, second do
    calls = calls + tonumber(redis.call('GET', prefix .. ':calls:' .. s) or 0)
    over = over + tonumber(redis.call('GET', prefix .. ':over:' .. s) or 0)
  end
  trip = over >= threshold and over >= ratio * calls
end
if not trip then return 0 end
local until_ = now + math.max(cooldown, retry_after)
redis.call('SET', KEYS[3], tostring(until_), 'PX', math.ceil((until_ - now) * 1000))
redis.call('SET', KEYS[4], '1', 'PX', math.ceil((until_ - now + 3600) * 1000))
return 1
"""


class CircuitBreaker:
    """Closed, open, half-open; the state lives in Redis, so every worker on every host sees
    the same circuit.

    Opens when, within `window` seconds, at least `threshold` answers were 429/529 *and* they
    were at least `ratio` of all answers: sporadic overloads at high throughput are the retry
    policy's business, sustained ones are the breaker's. Also when `threshold` answers in a
    row were 429/529, with no good answer between: after a busy spell the window holds
    hundreds of good answers, and an outage that began then took as many overloads (and the
    tickets' attempts) to reach the ratio. Stays open for `cooldown` seconds (or
    the server's retry-after, if longer); then half-open: one probe call per `probe_interval`
    is let through. A good answer closes the circuit; another overload opens it again."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        threshold: int = 20,
        window: float = 30.0,
        cooldown: float = 30.0,
        ratio: float = 0.5,
        probe_interval: float = 2.0,
        prefix: str = "triage:circuit",
    ) -> None:
        self._client = client
        self.threshold = threshold
        self.window = max(1, int(window))
        self.cooldown = cooldown
        self.ratio = ratio
        self.probe_interval = probe_interval
        self._prefix = prefix
        self._open_until = f"{prefix}:open-until"
        self._half_open = f"{prefix}:half-open"
        self._probe = f"{prefix}:probe"
        self._run = f"{prefix}:overloads-in-a-row"
        self._script: Any = client.register_script(_OVERLOAD)

    def open_seconds(self) -> float:
        """Seconds the circuit stays fully open (0.0 when closed or half-open). Consumers stop
        taking new work while it is open, and take it again for the half-open probe."""
        raw = self._client.get(self._open_until)
        return 0.0 if raw is None else max(0.0, float(raw) - time.time())

    def wait_seconds(self) -> float:
        """0.0 when a call may go (closed, or this caller won the half-open probe); otherwise
        how long to wait before asking again."""
        return self.check()[0]

    def check(self) -> tuple[float, bool]:
        """`wait_seconds`, and whether the caller holds the half-open probe (then only one
        call may go)."""
        open_until, half_open = self._client.mget(self._open_until, self._half_open)
        remaining = 0.0 if open_until is None else float(open_until) - time.time()
        if remaining > 0:
            return remaining, False
        if half_open is None:
            return 0.0, False
        won = self._client.set(self._probe, "1", nx=True, px=int(self.probe_interval * 1000))
        return (0.0, True) if won else (self.probe_interval, False)

    def record_overload(self, retry_after: float | None = None) -> bool:
        """Count one 429/529; returns True when this failure opened the circuit."""
        # However the caller read it: one absurd retry-after must not pause every worker's
        # classify consumption for days (nor an infinite one fail the script).
        wait = 0.0 if retry_after is None or math.isnan(retry_after) else retry_after
        wait = min(max(0.0, wait), MAX_RETRY_AFTER_SECONDS)
        now = time.time()
        second = int(now)
        opened = self._script(
            keys=[
                f"{self._prefix}:calls:{second}",
                f"{self._prefix}:over:{second}",
                self._open_until,
                self._half_open,
                self._run,
            ],
            args=[
                now,
                second,
                self.window,
                self.threshold,
                self.ratio,
                self.cooldown,
                wait,
                self._prefix,
            ],
        )
        return bool(opened)

    def record_success(self, count: int = 1) -> None:
        """Count good answers; while half-open, one closes the circuit."""
        second = int(time.time())
        key = f"{self._prefix}:calls:{second}"
        pipe = self._client.pipeline(transaction=False)
        pipe.incrby(key, count)
        pipe.expire(key, self.window + 5)
        pipe.delete(self._run)
        pipe.get(self._open_until)
        pipe.exists(self._half_open)
        _, _, _, open_until, half_open = pipe.execute()
        if half_open and (open_until is None or float(open_until) <= time.time()):
            # An answer to a call sent before the circuit opened proves nothing; only one
            # after the cool-down (the probe's) closes it.
            self._client.delete(self._half_open)


@dataclass(frozen=True, slots=True)
class Admission:
    """The breaker and the limiter together: may this call go now?"""

    limiter: ApiLimiter
    breaker: CircuitBreaker

    def wait_seconds(self, input_tokens: int) -> float:
        paused = self.breaker.wait_seconds()
        if paused > 0:
            return paused
        return self.limiter.acquire(input_tokens)

    def admit(self, input_tokens: Sequence[int]) -> list[float]:
        """`wait_seconds` for a batch of calls, asking the breaker once: 0.0 for each call that
        may go now (and is counted against the budget), else seconds to wait. A half-open
        circuit lets only the first call through, as the probe."""
        if not input_tokens:
            return []
        paused, probe = self.breaker.check()
        if paused > 0:
            return [paused] * len(input_tokens)
        waits = [self.limiter.acquire(input_tokens[0])]
        for tokens in input_tokens[1:]:
            waits.append(self.breaker.probe_interval if probe else self.limiter.acquire(tokens))
        return waits

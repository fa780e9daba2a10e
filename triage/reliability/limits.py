"""Backpressure shared by every worker on every host, kept in Redis.

- `ApiLimiter`: calls and input tokens per minute (GCRA: a ticket may go when the account's
  rate allows it; bursts up to one minute's budget). Configure it to the account's tier.
- `CircuitBreaker`: after sustained 429/529 answers, or a single 401 (the API key rejected),
  the API is left alone for a cool-down, and tickets wait on the broker instead of spending
  their attempts into the dead-letter queue: workers stop consuming `triage.classify` while
  it is open (see `triage/pipeline/consumption.py`) and resume by themselves when a probe
  call succeeds.

Both answer "go now" or "come back in N seconds"; the classify stage decides what to do with
that (sleep briefly, or put the ticket back on the queue without using an attempt).

Every time they go by is Redis's (`TIME` inside the scripts, key TTLs), never a host's own
clock: workers on hosts whose clocks differ must still share one budget and see one circuit.
A host minutes ahead would otherwise have taken the whole minute's budget for itself, or held
the circuit open minutes past its cool-down for everyone else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from triage.reliability.retry import MAX_RETRY_AFTER_SECONDS

# Redis's clock in ms, for the scripts below (allowed before writes: scripts replicate their
# effects, the default since Redis 5).
_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
"""

# KEYS: one GCRA key per limit. ARGV: for each request in turn, (interval_ms, burst_ms, quantity)
# per key. Returns, per request, 0 when every limit admits it (and it is recorded), else ms to
# wait. The requests are decided in order, as separate calls would decide them: one that must
# wait is not recorded, and a smaller one after it may still fit. One call for a batch's
# tickets instead of a round trip each.
_GCRA = (
    _NOW_MS
    + """
local tats = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  tats[i] = tat
end
local per = #KEYS * 3
local waits = {}
local admitted = false
for j = 0, #ARGV / per - 1 do
  local wait = 0
  local new_tats = {}
  for i = 1, #KEYS do
    local at = j * per + (i - 1) * 3
    local new_tat = tats[i] + tonumber(ARGV[at + 1]) * tonumber(ARGV[at + 3])
    local allow_at = new_tat - tonumber(ARGV[at + 2])
    if allow_at > now and (allow_at - now) > wait then wait = allow_at - now end
    new_tats[i] = new_tat
  end
  -- Whole ms, rounded up: the reply is an integer, and a wait under 1 ms truncated to 0 would
  -- read as "go" for a call that was not charged.
  waits[j + 1] = math.ceil(wait)
  if wait == 0 then
    tats = new_tats
    admitted = true
  end
end
if admitted then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
  end
end
return waits
"""
)

# The same buckets, charged without asking: for calls that went without admission (a repair
# call, an escalation) and input beyond what was estimated. Later calls wait for them.
# KEYS as _GCRA's; ARGV as one request's in _GCRA's (burst unused).
_CHARGE = (
    _NOW_MS
    + """
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[1 + (i - 1) * 3])
  local qty = tonumber(ARGV[3 + (i - 1) * 3])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * qty
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
end
return 0
"""
)


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
        return self.acquire_each([input_tokens])[0]

    def acquire_each(self, input_tokens: Sequence[int]) -> list[float]:
        """`acquire` for each of several calls in turn, in one round trip to Redis."""
        keys: list[str] = []
        args: list[float] = []
        for tokens in input_tokens:
            keys, call_args = self._buckets(1, max(1, tokens))
            args += call_args
        if not keys:
            return [0.0] * len(input_tokens)
        return [float(ms) / 1000 for ms in self._script(keys=keys, args=args)]

    def charge(self, calls: int, input_tokens: int) -> None:
        """Count calls and input tokens already spent without `acquire` (a repair call, an
        escalation, input beyond the estimate): the budget is the account's, whatever asked."""
        keys, args = self._buckets(calls, input_tokens)
        if keys:
            self._charge(keys=keys, args=args)

    def _buckets(self, calls: int, input_tokens: int) -> tuple[list[str], list[float]]:
        keys: list[str] = []
        args: list[float] = []
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


# Redis's clock in seconds, and the per-second answer buckets of now (by prefix, ARGV[1]).
_NOW_S = """
local clock = redis.call('TIME')
local second = tonumber(clock[1])
local now = second + tonumber(clock[2]) / 1000000
local calls_key = ARGV[1] .. ':calls:' .. second
"""

# Why the circuit is open, in its reason key: for the gauge and the operator.
OVERLOAD = "overload"
API_KEY_REJECTED = "api_key_rejected"
REASONS = (OVERLOAD, API_KEY_REJECTED)

# KEYS: open-until key, half-open key, overloads-in-a-row key, reason key.
# ARGV: prefix, window (s), threshold, min ratio, cooldown, retry_after.
# Counts one overload answer; opens the circuit when the window holds at least `threshold`
# overloads and they are at least `ratio` of the answers (or at once when half-open). Open is
# the open-until key's TTL; its value (Redis's time when it closes) is for people reading it.
_OVERLOAD = (
    _NOW_S
    + """
local prefix = ARGV[1]
local window = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local ratio = tonumber(ARGV[4])
local cooldown = tonumber(ARGV[5])
local retry_after = tonumber(ARGV[6])
local over_key = prefix .. ':over:' .. second
redis.call('INCR', calls_key); redis.call('EXPIRE', calls_key, window + 5)
redis.call('INCR', over_key); redis.call('EXPIRE', over_key, window + 5)
local run = redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], window + 5)
if redis.call('PTTL', KEYS[1]) > 0 then return 0 end
local trip = redis.call('EXISTS', KEYS[2]) == 1 or run >= threshold
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
redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil((until_ - now) * 1000))
redis.call('SET', KEYS[2], '1', 'PX', math.ceil((until_ - now + 3600) * 1000))
redis.call('SET', KEYS[4], 'overload', 'PX', math.ceil((until_ - now + 3600) * 1000))
return 1
"""
)

# KEYS: open-until key, half-open key, reason key. ARGV: cooldown (s).
# A rejected API key opens the circuit at once: one 401 is conclusive, every other call would
# get one too. Already open for that reason: nothing (returns 0, so an opening is announced
# once). Open for an overload: now for the key too, at least the key's cool-down, since the
# key must be fixed whatever the overload does (returns 1).
_KEY_REJECTED = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local open = redis.call('PTTL', KEYS[1])
if open > 0 and redis.call('GET', KEYS[3]) == 'api_key_rejected' then return 0 end
local until_ = now + math.max(tonumber(ARGV[1]), math.max(open, 0) / 1000)
redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil((until_ - now) * 1000))
redis.call('SET', KEYS[2], '1', 'PX', math.ceil((until_ - now + 3600) * 1000))
redis.call('SET', KEYS[3], 'api_key_rejected', 'PX', math.ceil((until_ - now + 3600) * 1000))
return 1
"""

# KEYS as _OVERLOAD's. ARGV: prefix, window (s), count. Counts good answers; one that comes
# while half-open, once the cool-down is over, closes the circuit (an answer to a call sent
# before the circuit opened proves nothing; only one after it, the probe's, does).
_SUCCESS = (
    _NOW_S
    + """
redis.call('INCRBY', calls_key, ARGV[3]); redis.call('EXPIRE', calls_key, tonumber(ARGV[2]) + 5)
redis.call('DEL', KEYS[3])
if redis.call('PTTL', KEYS[1]) <= 0 then redis.call('DEL', KEYS[2], KEYS[4]) end
return 0
"""
)

# KEYS: open-until key, half-open key, probe key. ARGV: probe interval (ms).
# Returns ms the circuit stays open (> 0), 0 when closed, -1 when the caller won the half-open
# probe, -2 when another caller holds it.
_CHECK = """
local open = redis.call('PTTL', KEYS[1])
if open > 0 then return open end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return -1 end
return -2
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
    is let through. A good answer closes the circuit; another overload opens it again.

    A 401 (`record_key_rejected`) opens it at once, for `auth_cooldown`: the key is wrong for
    every call, and only a person can fix it. The probe after the cool-down closes it (the key
    works again) or meets another 401 and opens it for another cool-down."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        threshold: int = 20,
        window: float = 30.0,
        cooldown: float = 30.0,
        auth_cooldown: float = 300.0,
        ratio: float = 0.5,
        probe_interval: float = 2.0,
        prefix: str = "triage:circuit",
    ) -> None:
        self._client = client
        self.threshold = threshold
        self.window = max(1, int(window))
        self.cooldown = cooldown
        self.auth_cooldown = auth_cooldown
        self.ratio = ratio
        self.probe_interval = probe_interval
        self._prefix = prefix
        self._open_until = f"{prefix}:open-until"
        self._half_open = f"{prefix}:half-open"
        self._probe = f"{prefix}:probe"
        self._run = f"{prefix}:overloads-in-a-row"
        self._reason = f"{prefix}:reason"
        self._keys = [self._open_until, self._half_open, self._run, self._reason]
        self._overload: Any = client.register_script(_OVERLOAD)
        self._key_rejected: Any = client.register_script(_KEY_REJECTED)
        self._success: Any = client.register_script(_SUCCESS)
        self._check: Any = client.register_script(_CHECK)
        # What this process last learned of the circuit (monotonic time it stays open to),
        # for a look that costs no round trip (`known_open_seconds`).
        self._known_open_until = 0.0

    def open_seconds(self) -> float:
        """Seconds the circuit stays fully open (0.0 when closed or half-open). Consumers stop
        taking new work while it is open, and take it again for the half-open probe."""
        seconds = max(0, int(self._client.pttl(self._open_until))) / 1000
        self._learn(seconds)
        return seconds

    def known_open_seconds(self) -> float:
        """`open_seconds` as this process last learned it, from its own reports and reads of
        the circuit, without asking Redis: a worker reads the circuit every second, and
        learns at once of an opening its own answers caused."""
        return max(0.0, self._known_open_until - time.monotonic())

    def _learn(self, open_for: float) -> None:
        self._known_open_until = time.monotonic() + open_for if open_for > 0 else 0.0

    def _learn_after_report(self, opened: bool, open_for: float) -> None:
        """After a 429 or 401 is reported: this answer opened the circuit for `open_for`, or
        it may have been opened by another, whose own learning this thread must not wait
        for (a thread that met a 401 at the same moment hands its call slot on at once)."""
        if opened:
            self._learn(open_for)
        else:
            self.open_seconds()

    def open_reason(self) -> str | None:
        """Why the circuit last opened (OVERLOAD or API_KEY_REJECTED), until a probe closes
        it; None when closed."""
        reason = self._client.get(self._reason)
        return reason.decode() if reason is not None else None

    def wait_seconds(self) -> float:
        """0.0 when a call may go (closed, or this caller won the half-open probe); otherwise
        how long to wait before asking again."""
        return self.check()[0]

    def check(self) -> tuple[float, bool]:
        """`wait_seconds`, and whether the caller holds the half-open probe (then only one
        call may go)."""
        state = int(
            self._check(
                keys=[self._open_until, self._half_open, self._probe],
                args=[max(1, int(self.probe_interval * 1000))],
            )
        )
        self._learn(state / 1000 if state > 0 else 0.0)
        if state > 0:
            return state / 1000, False
        if state == -1:
            return 0.0, True
        return (0.0, False) if state == 0 else (self.probe_interval, False)

    def record_overload(self, retry_after: float | None = None) -> bool:
        """Count one 429/529; returns True when this failure opened the circuit."""
        # However the caller read it: one absurd retry-after must not pause every worker's
        # classify consumption for days (nor an infinite one fail the script).
        wait = 0.0 if retry_after is None or math.isnan(retry_after) else retry_after
        wait = min(max(0.0, wait), MAX_RETRY_AFTER_SECONDS)
        opened = self._overload(
            keys=self._keys,
            args=[self._prefix, self.window, self.threshold, self.ratio, self.cooldown, wait],
        )
        self._learn_after_report(bool(opened), max(self.cooldown, wait))
        return bool(opened)

    def record_key_rejected(self) -> bool:
        """Open the circuit for `auth_cooldown` after a 401; True when this answer opened it
        for that reason (not when it already was), so an opening is announced once."""
        opened = self._key_rejected(
            keys=[self._open_until, self._half_open, self._reason], args=[self.auth_cooldown]
        )
        self._learn_after_report(bool(opened), self.auth_cooldown)
        return bool(opened)

    def record_success(self, count: int = 1) -> None:
        """Count good answers; while half-open, one closes the circuit."""
        self._success(keys=self._keys, args=[self._prefix, self.window, count])


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
        if probe:
            return self.limiter.acquire_each(input_tokens[:1]) + [self.breaker.probe_interval] * (
                len(input_tokens) - 1
            )
        return self.limiter.acquire_each(input_tokens)

"""Backpressure shared by every worker on every host, kept in Redis.

- `ApiLimiter`: calls and input tokens per minute (GCRA: a ticket may go when the account's
  rate allows it; bursts up to one minute's budget). Configure it to the account's tier.
- `CircuitBreaker`: after sustained 429/529 answers the API is left alone for a cool-down, and
  tickets wait on the broker instead of spending their attempts into the dead-letter queue.

Both answer "go now" or "come back in N seconds"; the classify stage decides what to do with
that (sleep briefly, or put the ticket back on the queue without using an attempt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

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

    def acquire(self, input_tokens: int) -> float:
        """0.0 when the call may go now (and is counted); otherwise seconds to wait."""
        keys: list[str] = []
        args: list[float] = [time.time() * 1000]
        for name, per_minute, qty in (
            ("calls", self._limits.calls_per_minute, 1),
            ("tokens", self._limits.input_tokens_per_minute, max(1, input_tokens)),
        ):
            if per_minute <= 0:
                continue
            interval = 60_000 / per_minute
            # A single request larger than the whole minute's budget must still get through.
            burst = max(60_000.0, interval * qty)
            keys.append(f"{self._prefix}:{name}")
            args += [interval, burst, qty]
        if not keys:
            return 0.0
        wait_ms = float(self._script(keys=keys, args=args))
        return wait_ms / 1000


class CircuitBreaker:
    """Opens after `threshold` overload answers within `window` seconds, for `cooldown`
    seconds (or the server's retry-after, if longer). Shared through Redis."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        threshold: int = 20,
        window: float = 30.0,
        cooldown: float = 30.0,
        prefix: str = "triage:circuit",
    ) -> None:
        self._client = client
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self._failures = f"{prefix}:failures"
        self._open_until = f"{prefix}:open-until"

    def wait_seconds(self) -> float:
        """0.0 when closed; otherwise how long until it half-opens."""
        raw = self._client.get(self._open_until)
        if raw is None:
            return 0.0
        return max(0.0, float(raw) - time.time())

    def record_overload(self, retry_after: float | None = None) -> bool:
        """Count one 429/529; returns True when this failure opened the circuit."""
        now = time.time()
        pipe = self._client.pipeline()
        pipe.zadd(self._failures, {f"{now}:{id(pipe)}": now})
        pipe.zremrangebyscore(self._failures, 0, now - self.window)
        pipe.zcard(self._failures)
        pipe.expire(self._failures, int(self.window) + 1)
        count = int(pipe.execute()[2])
        if count < self.threshold:
            return False
        until = now + max(self.cooldown, retry_after or 0.0)
        opened = bool(
            self._client.set(self._open_until, until, nx=True, px=int((until - now) * 1000))
        )
        if opened:
            self._client.delete(self._failures)
        return opened

    def record_success(self) -> None:
        # One good answer after a cool-down means the API is back: forget old failures.
        self._client.delete(self._failures)


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

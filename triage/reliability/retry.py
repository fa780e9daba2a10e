"""The one retry policy. Every stage asks `decide()` what to do with a failure.

Retries live here and only here:

- Transient (429, 529, 5xx, timeouts, dropped connections, truncated output, broker and
  database disconnects): retry after an exponential backoff with full jitter
  (`uniform(0, min(max_delay, base_delay * 2**(attempt-1)))`), never sooner than the server's
  retry-after, while the stage's attempts (`TRIAGE_<STAGE>_MAX_ATTEMPTS`) and age
  (`..._MAX_AGE`, counted from the stage's start: for classify, receipt or the start of the
  ticket's current generation (new text, a reprocess, a replay); for deliver, the dispatch or
  its latest replay) allow. Then dead letter. A 401 (`ApiKeyRejected`) is transient too: the
  key is at fault, not the ticket, and it opens the circuit breaker at once, so tickets wait
  for the key rather than spend their attempts (`triage/reliability/limits.py`).
- Permanent (400/403/404, output still invalid after the one repair call, refusal, a bug):
  dead letter at once.

SDK retries and task retries do not stack. The Anthropic client is built with
`max_retries=0`: the SDK's own retries would multiply attempts (2 SDK retries x 6 task attempts
= 18 calls), hide calls from the attempt log and the call budget, and sleep on a worker thread
ignoring the shared backoff and circuit breaker. Instead a transient failure frees the thread
and the ticket comes back through the outbox after `delay`: on the broker as a countdown for
short delays, kept in the outbox until due for long ones (`relay.MAX_BROKER_COUNTDOWN_SECONDS`),
so no retry waits unacked in a worker that may die.

The bound this gives: one classify attempt makes at most MAX_CALLS_PER_ATTEMPT calls (one per
model, plus one repair each; a single call with `TRIAGE_BACKEND=anthropic` and a valid answer),
so a ticket costs at most `max_attempts * MAX_CALLS_PER_ATTEMPT` calls, and a permanent error
exactly the calls of one attempt. Attempts that never reported (the worker died mid-call) count
too: a ticket claimed more than `max_attempts` times is dead-lettered without another call.
Waiting for the shared rate limit or an open circuit does not spend an attempt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from triage.config import Settings
from triage.errors import PermanentError, TransientError, TriageError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by age."""

    max_attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 300.0
    max_age: float = 6 * 3600.0

    def delay_for(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        delay = rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


# The longest retry-after honoured. Rate limits reset within minutes and maintenance windows
# within hours; a value of days or years (a misconfigured proxy, a date written by a clock far
# ahead) would hold a ticket until its age bound dead-letters it, and keep the shared circuit
# open (every worker's classify consumption paused) for as long.
MAX_RETRY_AFTER_SECONDS = 3600.0

# RFC 9110 delta-seconds (digits), with a fraction as some servers send.
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The server's "come back in N seconds", from `retry-after-ms` (Anthropic's) or
    `retry-after` in either form RFC 9110 allows: delta-seconds or an HTTP-date. A date in the
    past is 0; anything longer than MAX_RETRY_AFTER_SECONDS is taken as that. None when
    neither header is there or readable (`nan`, `-5`, a malformed date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = (headers.get(name) or "").strip()
        if not value:
            continue
        if _DELTA_SECONDS.fullmatch(value):
            seconds = float(value) * scale
        elif scale == 1.0:
            when = _http_date(value)
            if when is None:
                continue
            seconds = max(0.0, (when - datetime.now(UTC)).total_seconds())
        else:
            continue
        return min(seconds, MAX_RETRY_AFTER_SECONDS)
    return None


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay: float = 0.0
    reason: str = ""


_rng = random.Random()


def as_triage_error(exc: BaseException) -> TriageError:
    """Name an arbitrary failure by meaning: transient or permanent."""
    if isinstance(exc, TriageError):
        return exc
    if isinstance(exc, OperationalError | PoolTimeout):
        return TransientError(f"database unavailable: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return TransientError(f"database connection lost: {exc}")
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return TransientError(f"{exc.__class__.__name__}: {exc}")
    if _is_broker_error(exc):
        return TransientError(f"broker unavailable: {exc.__class__.__name__}: {exc}")
    # A bug: its text may hold whatever it was handed (a ticket's text, a row's values).
    return PermanentError(exc.__class__.__name__, quoted=str(exc))


def _is_broker_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, KombuOperationalError | RedisConnectionError | RedisTimeout)


def decide(
    policy: RetryPolicy,
    error: TriageError,
    *,
    attempt: int,
    age_seconds: float,
    rng: random.Random | None = None,
) -> Decision:
    """Retry a transient error while attempts and age allow; dead-letter everything else."""
    if isinstance(error, PermanentError) or not isinstance(error, TransientError):
        return Decision(retry=False, reason=f"permanent: {error.__class__.__name__}")
    if attempt >= policy.max_attempts:
        return Decision(retry=False, reason=f"attempts exhausted ({attempt}/{policy.max_attempts})")
    delay = policy.delay_for(attempt, error.retry_after, rng or _rng)
    if age_seconds + delay > policy.max_age:
        return Decision(retry=False, reason=f"too old to retry ({age_seconds:.0f}s)")
    return Decision(retry=True, delay=delay, reason=error.__class__.__name__)


# Calls one classify attempt may make: the primary and the escalation model, each with one
# repair call. The attempt bound times this is the most calls a ticket can cost.
MAX_CALLS_PER_ATTEMPT = 4


def classify_lease_seconds(settings: Settings) -> float:
    """The longest a healthy classify task can take, and so how long a ticket in
    `classifying` belongs to the worker that claimed it: every call of the attempt timing out,
    plus the admission wait (at most 1 s inline) and the database work. After it the holder is
    presumed dead; the ticket may be taken over, and the sweeper re-enqueues it."""
    return MAX_CALLS_PER_ATTEMPT * settings.api_timeout_seconds + settings.claim_grace_seconds


def deliver_seconds(requests: int, sink_timeout_seconds: float) -> float:
    """How long a delivery may spend on its sinks' requests: every one of them timing out,
    where `requests` is the most one delivery makes (its sinks' `Sink.max_requests`, summed:
    a Freshdesk write-back that pages through a long conversation makes 13). It is the
    delivery's deadline, counted from its `started` attempt: a request not started by then is
    not started, and one still running is cut (`triage/sinks/http.py`), so however slowly a
    helpdesk answers, the delivery's requests end within its lease."""
    return max(1, requests) * sink_timeout_seconds


def deliver_lease_seconds(requests: int, sink_timeout_seconds: float, settings: Settings) -> float:
    """How long a delivery in flight holds its dispatch: its requests' deadline
    (`deliver_seconds`) plus the database work. While a delivery is this fresh, a second copy
    of its message leaves it alone instead of sending it again; after it, the holder is
    presumed dead."""
    return deliver_seconds(requests, sink_timeout_seconds) + settings.claim_grace_seconds


def policy_for(stage: str, settings: Settings) -> RetryPolicy:
    """The configured policy of a stage (TRIAGE_<STAGE>_MAX_ATTEMPTS and friends)."""
    return RetryPolicy(
        max_attempts=getattr(settings, f"{stage}_max_attempts"),
        base_delay=getattr(settings, f"{stage}_base_delay"),
        max_delay=getattr(settings, f"{stage}_max_delay"),
        max_age=getattr(settings, f"{stage}_max_age"),
    )


# A database that cannot be reached at a task's boundary: the message goes back on the broker
# this many times, after `infrastructure_delay`, before the sweeper is left to recover it.
# Not for a spooled webhook (`triage.ingest.spool`): the message is the ticket's only copy, and
# it waits for the database however long that takes.
INFRASTRUCTURE_RETRIES = 40


def is_database_outage(exc: BaseException) -> bool:
    """The database itself is unreachable (not a constraint or a bug)."""
    if isinstance(exc, OperationalError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def infrastructure_delay(retries: int, rng: random.Random | None = None) -> float:
    """Full jitter up to 1, 2, 4 ... 15 s: short enough to ride on the broker as a countdown
    (see relay.MAX_BROKER_COUNTDOWN_SECONDS), spread so a recovering database is not hit by
    every waiting task in the same instant. Any count: a spooled ticket's retries have no
    bound, and 2.0**1024 overflows."""
    ceiling = 15.0 if retries >= 4 else 2.0**retries
    return (rng or _rng).uniform(0.5, ceiling)

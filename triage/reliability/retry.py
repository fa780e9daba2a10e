"""The one retry policy. Every stage asks `decide()` what to do with a failure.

Retries live here and only here. The Anthropic SDK's own retries are switched off
(`max_retries=0`): stacking them under the task's retries would multiply attempts, hide calls
from the attempt count and ignore the shared backoff. A transient failure instead frees the
worker thread and comes back through the broker after `delay`, never sooner than retry-after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
    return PermanentError(f"{exc.__class__.__name__}: {exc}")


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
    return MAX_CALLS_PER_ATTEMPT * settings.api_timeout_seconds + 31.0


def policy_for(stage: str, settings: Settings) -> RetryPolicy:
    """The configured policy of a stage (TRIAGE_<STAGE>_MAX_ATTEMPTS and friends)."""
    return RetryPolicy(
        max_attempts=getattr(settings, f"{stage}_max_attempts"),
        base_delay=getattr(settings, f"{stage}_base_delay"),
        max_delay=getattr(settings, f"{stage}_max_delay"),
        max_age=getattr(settings, f"{stage}_max_age"),
    )

"""The error types triage raises. Callers catch by meaning, not by message.

TriageError
├── ConfigError            bad settings or config/ files (start-up refuses to run)
├── IngestError            a webhook that cannot be accepted (carries an HTTP status)
├── TransientError         worth retrying: rate limits, overload, 5xx, timeouts, disconnects
│   ├── RateLimited        the server said when to come back (retry_after)
│   ├── ApiKeyRejected     401 authentication_error: the key, not the ticket (pauses the fleet)
│   └── OutputTruncated    stop_reason "max_tokens": the label was cut off (truncated JSON)
└── PermanentError         retrying cannot help: dead-letter at once
    ├── InvalidOutput      the model's answer failed the schema (after the repair attempt)
    ├── Refused            the model refused (stop_reason "refusal")
    └── SinkRejected       a sink's target answered 4xx (carries the status and body)

An error's text has two parts. `summary` is triage's own words (what failed, the HTTP status,
the error type): `str(error)`, and so every log line, traceback and Celery failure line, shows
only it, with the ticket, stage and request id. `quoted` is what the other side said (a
model's refusal, a helpdesk's error answer), which may echo the ticket: it is kept in
`message` and `detail`, for the database (attempt rows, dead letters, `tickets.last_error`)
and the operator's CLI, and never logged. Logs are shipped to places with wider access than
the database.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triage.classify.backends.base import ClassificationResult, Usage


class TriageError(Exception):
    """Base class. `ticket_id` and `stage` say where it happened when known."""

    def __init__(
        self,
        message: str,
        *,
        quoted: str = "",
        ticket_id: int | None = None,
        stage: str | None = None,
        request_id: str | None = None,
    ) -> None:
        # Error text is stored (attempts, dead letters) and may quote what a remote service
        # sent; PostgreSQL text cannot hold NUL.
        summary = message.replace("\x00", "\ufffd")
        quoted = quoted.replace("\x00", "\ufffd")
        # Only the summary in `args`: Celery and `repr()` show an exception by its args.
        super().__init__(summary)
        self.summary = summary
        self.quoted = quoted
        # The whole text, as stored.
        self.message = f"{summary}: {quoted}" if quoted else summary
        self.ticket_id = ticket_id
        self.stage = stage
        self.request_id = request_id
        # Paid API calls the failed attempt made, and their tokens and cost (a refused or
        # cut-off answer is billed like any other), for the attempt log and the call budget.
        self.api_calls = 0
        self.usage: Usage | None = None
        # An answer this attempt paid for that a retry can still use: the cascade's first
        # model's, when only the escalation failed. Kept on the attempt row (guard).
        self.first_answer: ClassificationResult | None = None

    def __str__(self) -> str:
        """What may be logged: the summary and where, never the quoted text."""
        return self._located(self.summary)

    @property
    def detail(self) -> str:
        """The whole text and where, for the database and the operator's CLI."""
        return self._located(self.message)

    def _located(self, text: str) -> str:
        where = []
        if self.ticket_id is not None:
            where.append(f"ticket {self.ticket_id}")
        if self.stage:
            where.append(f"stage {self.stage}")
        if self.request_id:
            where.append(f"request {self.request_id}")
        return f"{text} ({', '.join(where)})" if where else text


class ConfigError(TriageError):
    """A setting or config file is invalid; the message names the file, field and problem."""


class IngestError(TriageError):
    """A webhook request that is refused; `status` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        title: str,
        headers: dict[str, str] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        # Response headers (WWW-Authenticate, say); `kwargs` go into the problem body.
        self.headers = headers or {}
        self.extra = kwargs


class TransientError(TriageError):
    """A failure that may succeed later."""

    retry_after: float | None = None


class CallNotStarted(TransientError):
    """A claimed ticket's call was not made: it waited too long for a free call slot
    (fanout.CallGate), or the circuit opened while it waited. The ticket goes back on the
    queue, to come back after `retry_in` seconds, without spending an attempt."""

    def __init__(self, reason: str, *, retry_in: float = 0.0) -> None:
        super().__init__(f"the call was not made: {reason}")
        self.retry_in = retry_in


class RateLimited(TransientError):
    """429/529 and friends, with the server's retry-after when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ApiKeyRejected(TransientError):
    """The API answered 401 authentication_error: the API key is wrong, revoked or expired.

    Transient although retrying the same call cannot help: the fault is the deployment's, not
    the ticket's, and every ticket would meet it. Dead-lettering each one would turn the whole
    inflow into dead letters an operator must replay; instead the first one opens the shared
    circuit breaker (see `triage/reliability/limits.py`), tickets wait on the broker, and a
    probe call after the cool-down finds out whether the key works again."""


class PermanentError(TriageError):
    """A failure that retrying cannot fix: the ticket is dead-lettered at once."""


class SinkRejected(PermanentError):
    """A sink's target (a helpdesk API, a webhook receiver) refused the request with a 4xx:
    `status` and the start of the body, for a sink that can tell a refusal it may accept
    (a ticket closed in the helpdesk) from a wrong request."""

    def __init__(self, message: str, *, status: int, body: str, **kwargs: object) -> None:
        super().__init__(message, quoted=body, **kwargs)  # type: ignore[arg-type]
        self.status = status
        self.body = body


class InvalidOutput(PermanentError):
    """The model's output did not validate against the label schema."""


class RequestNotPrepared(PermanentError):
    """Preparing a claimed ticket's request (its text, redaction, a reused label or first
    answer) raised: a bug or a stored row of a shape the code cannot read. Permanent: the
    same ticket would raise again on every attempt."""


class Refused(PermanentError):
    """The model refused to label the ticket."""


class OutputTruncated(TransientError):
    """The model hit max_tokens before finishing the label. Transient: the cut is a property
    of that one answer (issue 5 lists truncated JSON among transient faults), and the attempt
    bound caps what a model that always rambles can cost."""


def loggable(exc: BaseException) -> str:
    """How a log line names a failure. A triage error by its summary; any other exception by
    its type alone: its text may hold anything it was handed (a validation error prints the
    input it rejected, a driver error the row's values)."""
    return str(exc) if isinstance(exc, TriageError) else exc.__class__.__name__


def detail(exc: BaseException) -> str:
    """A failure's whole text, for the database and the operator's CLI."""
    return exc.detail if isinstance(exc, TriageError) else f"{exc.__class__.__name__}: {exc}"


def loggable_traceback(exc: BaseException) -> str:
    """A failure's traceback for a log line: its frames (code, not data) and, for it and each
    exception it was raised from, `loggable()` in place of the text `exc_info` would print."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    parts = []
    for link in reversed(chain):
        frames = "".join(traceback.format_tb(link.__traceback__))
        parts.append(f"Traceback (most recent call last):\n{frames}{loggable(link)}")
    return "\n\nThe above led to:\n\n".join(parts)

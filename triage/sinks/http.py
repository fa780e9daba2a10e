"""The one place an HTTP answer from a sink's target becomes a typed error.

Timeouts, dropped connections, bodies that do not decode, 408/409/425/429 and 5xx are
transient (the retry policy in triage/reliability decides when to try again, never sooner than
retry-after); any other 4xx is permanent: the request itself is wrong and repeating it cannot
help. So is a redirect: it is not followed (it would carry the credentials elsewhere) and it
is not a success either, since nothing was written. Sinks do not retry.

Every request belongs to a delivery with a deadline (`Delivery.deadline`, its lease less the
grace): past it no request is started, and a request started ends by it, whatever it is
waiting for: a connection, its headers (even arriving a byte at a time), the rest of its body
(cut there; a 2xx already answered still counts). httpx's timeouts bound each read, not a
request, so the sinks' transport (triage/sinks/transport.py) caps every socket operation at
the time left; without it a helpdesk answering a little under the timeout at every read could
hold a delivery past its lease, and a second copy of its message would write it again. A
delivery cut so fails as transient: nothing says which of its writes were applied, and its
retry looks for its note.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from triage.errors import PermanentError, RateLimited, SinkRejected, TransientError
from triage.reliability.retry import retry_after_seconds
from triage.reliability.timeleft import TimeLeft
from triage.sinks.transport import DeadlineTransport, ending_by, environment_mounts

# 409: Zendesk answers it to concurrent updates of one ticket; 425: "too early".
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
# What is read of an answer's body. Enough for a page of 100 Zendesk comments; the rest of a
# larger (or endlessly trickling) body is left unread rather than held in a worker's memory.
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer, its body read up to MAX_BODY_BYTES (and the client's read timeout
    once more, for a body that trickles in), and never past the delivery's deadline."""

    status: int
    body: bytes
    complete: bool
    what: str
    # The body was still arriving at the delivery's deadline.
    late: bool

    def json(self) -> Any:
        if self.late:
            raise TransientError(
                f"{self.what}: answered {self.status}, the body still arriving at the "
                "delivery's deadline"
            )
        if not self.complete:
            raise PermanentError(
                f"{self.what}: answered {self.status} with a body too large "
                f"or too slow to read (over {len(self.body)} bytes)"
            )
        try:
            return json.loads(self.body)
        except ValueError:
            raise PermanentError(
                f"{self.what}: answered {self.status} with a body that is not JSON "
                "(a login page or a wrong base_url?)",
                quoted=repr(self.body[:100]),
            ) from None


class _RedactedUrls(logging.Filter):
    """httpx logs every request at INFO with its full URL ("HTTP Request: POST <url> ..."),
    and a worker logs INFO: a webhook's user:password or `?token=` would be in every log line.
    The URL is shown as errors show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, httpx.URL) for arg in record.args
        ):
            record.args = tuple(
                shown_url(str(arg)) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


_URL_FILTER = _RedactedUrls()
logging.getLogger("httpx").addFilter(_URL_FILTER)


def make_client(timeout_seconds: float, **kwargs: Any) -> httpx.Client:
    """A client with explicit timeouts (a helpdesk that hangs must not hold a worker thread)
    whose requests `send` ends by their delivery's deadline; `kwargs` are the client's own
    (base_url, auth, headers), the transport being fixed."""
    timeout = httpx.Timeout(timeout_seconds, connect=min(5.0, timeout_seconds))
    return httpx.Client(
        timeout=timeout, transport=DeadlineTransport(), mounts=environment_mounts(), **kwargs
    )


def send(
    client: httpx.Client, method: str, url: str, *, what: str, deadline: float, **kwargs: Any
) -> Answer:
    """Make one request, ended by `deadline` (`time.monotonic()`'s clock); return the answer
    if it is a success, else raise by meaning."""
    where = shown_url(url)
    if time.monotonic() >= deadline:
        raise TransientError(
            f"{what}: {method} {where} not sent: the delivery's deadline had passed "
            "(its earlier requests, or its wait for a thread behind other deliveries, took "
            "that long)"
        )
    try:
        request = client.build_request(method, url, **kwargs)
        request.extensions["timeout"] = TimeLeft(request.extensions.get("timeout", {}), deadline)
        with ending_by(deadline):
            response = client.send(request, stream=True)
            try:
                body, complete, late = _read_bounded(response, client.timeout.read, deadline)
            finally:
                response.close()
    except httpx.TimeoutException as exc:
        at = " at the delivery's deadline" if time.monotonic() >= deadline else ""
        raise TransientError(
            f"{what}: {method} {where} timed out{at} ({exc.__class__.__name__})"
        ) from exc
    except httpx.RequestError as exc:
        # A transport failure, or a body that does not decode as its content-encoding says
        # (cut short by a proxy, say): the sink's contract is typed errors, never httpx's.
        raise TransientError(
            f"{what}: {method} {where} failed: {exc.__class__.__name__}: {exc}"
        ) from exc
    status = response.status_code
    if status < 300:
        return Answer(status, body, complete, f"{what}: {method} {where}", late)
    if status < 400:
        location = shown_url(response.headers.get("location", ""))
        raise PermanentError(
            f"{what}: {method} {where} answered {status} redirecting to {location or '?'}; "
            "redirects are not followed: configure the final URL"
        )
    # The answer's body may echo the ticket (a validation error quoting the comment sent):
    # quoted, so that it is stored but not logged.
    text = body[:300].decode("utf-8", errors="replace")
    summary = f"{what}: {method} {where} answered {status}"
    retry_after = _retry_after(response)
    if status == 429 or (status == 503 and retry_after is not None):
        raise RateLimited(summary, quoted=text, retry_after=retry_after)
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise TransientError(summary, quoted=text)
    raise SinkRejected(summary, status=status, body=text)


def _read_bounded(
    response: httpx.Response, read_timeout: float | None, deadline: float
) -> tuple[bytes, bool, bool]:
    """The body up to MAX_BODY_BYTES, within one more read timeout and before the delivery's
    deadline; whether that was all, and whether the deadline cut it."""
    until = time.monotonic() + (read_timeout or 60.0)
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            now = time.monotonic()
            if size > MAX_BODY_BYTES or now > until or now > deadline:
                late = size <= MAX_BODY_BYTES and now > deadline
                return b"".join(chunks)[:MAX_BODY_BYTES], False, late
    except httpx.ReadTimeout:
        # The transport ends a read waiting at the deadline: the body is cut there, as at a
        # chunk past it. A read timing out before it is the helpdesk's, raised as ever.
        if time.monotonic() < deadline:
            raise
        return b"".join(chunks), False, True
    return b"".join(chunks), True, False


def shown_url(url: str) -> str:
    """The URL as errors (stored in the database) show it: without user:password or query,
    where webhook receivers commonly put their token."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "(unparsable URL)"
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))


def _retry_after(response: httpx.Response) -> float | None:
    return retry_after_seconds(response.headers)

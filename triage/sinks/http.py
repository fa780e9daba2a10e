"""The one place an HTTP answer from a sink's target becomes a typed error.

Timeouts, dropped connections, 408/409/425/429 and 5xx are transient (the retry policy in
triage/reliability decides when to try again, never sooner than retry-after); any other 4xx is
permanent: the request itself is wrong and repeating it cannot help. So is a redirect: it is
not followed (it would carry the credentials elsewhere) and it is not a success either, since
nothing was written. Sinks do not retry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from triage.errors import PermanentError, RateLimited, TransientError

# 409: Zendesk answers it to concurrent updates of one ticket; 425: "too early".
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def make_client(timeout_seconds: float, **kwargs: Any) -> httpx.Client:
    """A client with explicit timeouts: a helpdesk that hangs must not hold a worker thread."""
    timeout = httpx.Timeout(timeout_seconds, connect=min(5.0, timeout_seconds))
    return httpx.Client(timeout=timeout, **kwargs)


def send(
    client: httpx.Client, method: str, url: str, *, what: str, **kwargs: Any
) -> httpx.Response:
    """Make one request; return the response if it is a success, else raise by meaning."""
    where = shown_url(url)
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise TransientError(
            f"{what}: {method} {where} timed out ({exc.__class__.__name__})"
        ) from exc
    except httpx.TransportError as exc:
        raise TransientError(
            f"{what}: {method} {where} failed: {exc.__class__.__name__}: {exc}"
        ) from exc
    status = response.status_code
    if status < 300:
        return response
    if status < 400:
        location = shown_url(response.headers.get("location", ""))
        raise PermanentError(
            f"{what}: {method} {where} answered {status} redirecting to {location or '?'}; "
            "redirects are not followed: configure the final URL"
        )
    detail = f"{what}: {method} {where} answered {status}: {response.text[:300]}"
    retry_after = _retry_after(response)
    if status == 429 or (status == 503 and retry_after is not None):
        raise RateLimited(detail, retry_after=retry_after)
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise TransientError(detail)
    raise PermanentError(detail)


def shown_url(url: str) -> str:
    """The URL as errors (stored in the database) show it: without user:password or query,
    where webhook receivers commonly put their token."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "(unparsable URL)"
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in either form RFC 9110 allows: delta-seconds or an HTTP-date."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

"""The one place an HTTP answer from a sink's target becomes a typed error.

Timeouts, dropped connections, 408/409/425/429 and 5xx are transient (the retry policy in
triage/reliability decides when to try again, never sooner than retry-after); any other 4xx is
permanent: the request itself is wrong and repeating it cannot help. Sinks do not retry.
"""

from __future__ import annotations

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
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise TransientError(
            f"{what}: {method} {url} timed out ({exc.__class__.__name__})"
        ) from exc
    except httpx.TransportError as exc:
        raise TransientError(
            f"{what}: {method} {url} failed: {exc.__class__.__name__}: {exc}"
        ) from exc
    status = response.status_code
    if status < 400:
        return response
    detail = f"{what}: {method} {url} answered {status}: {response.text[:300]}"
    retry_after = _retry_after(response)
    if status == 429 or (status == 503 and retry_after is not None):
        raise RateLimited(detail, retry_after=retry_after)
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise TransientError(detail)
    raise PermanentError(detail)


def _retry_after(response: httpx.Response) -> float | None:
    # Only the delta-seconds form; helpdesk APIs do not send the HTTP-date form in practice.
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None

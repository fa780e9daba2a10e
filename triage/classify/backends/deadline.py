"""A wall-clock deadline for each API call, as httpx event hooks.

httpx's timeouts bound each read, not the call: an answer dribbled a few bytes at a time never
trips a read timeout, and can take far longer than `TRIAGE_API_TIMEOUT_SECONDS` in all. The
classify lease counts on a call taking at most that long (`retry.classify_lease_seconds`);
one that outlasts the lease is handed to another worker and paid for twice. So each request
gets a deadline: every timeout httpx applies is cut to the time left, and the body is
abandoned with a `ReadTimeout` (the SDK's `APITimeoutError`, a transient error) at the first
chunk that arrives after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2

from triage.reliability.timeleft import TimeLeft


class _BodyBeforeDeadline(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, request: httpx2.Request, deadline: float):
        self._stream = stream
        self._request = request
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            if time.monotonic() > self._deadline:
                raise httpx2.ReadTimeout(
                    "the answer was still arriving at the call's deadline", request=self._request
                )
            yield chunk

    def close(self) -> None:
        self._stream.close()


class CallDeadline:
    """Event hooks (`httpx2.Client(event_hooks=...)`) that end each call `seconds` after it
    was sent, however slowly its answer arrives."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self._on_request], "response": [self._on_response]}

    def _on_request(self, request: httpx2.Request) -> None:
        timeouts = request.extensions.get("timeout", {})
        if isinstance(timeouts, TimeLeft):
            return  # a redirect: the deadline is the first request's
        deadline = time.monotonic() + self.seconds
        request.extensions["timeout"] = TimeLeft(dict(timeouts), deadline)

    def _on_response(self, response: httpx2.Response) -> None:
        timeouts = response.request.extensions.get("timeout")
        if isinstance(timeouts, TimeLeft) and isinstance(response.stream, httpx2.SyncByteStream):
            response.stream = _BodyBeforeDeadline(
                response.stream, response.request, timeouts.deadline
            )

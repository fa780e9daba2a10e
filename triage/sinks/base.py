"""What a sink receives and must do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """A routed ticket as sinks see it."""

    ticket_id: int
    dispatch_id: int
    source: str
    external_id: str
    route: str
    department: str | None
    needs_review: bool
    review_reason: str | None
    label: dict[str, Any]
    metadata: dict[str, Any]
    # When triage routed the ticket (the dispatch was made): the event's time, the same on
    # every retry of its delivery.
    routed_at: datetime
    # This attempt's deadline, on `time.monotonic()`'s clock: its lease less the grace
    # (`retry.deliver_seconds`). The sinks' requests end by then (`http.send`).
    deadline: float


class Sink(Protocol):
    """Applies a delivery somewhere outside triage. Must be idempotent: a delivery can be
    retried after a timeout that in fact succeeded. Raises TransientError / PermanentError."""

    name: str

    @property
    def max_requests(self) -> int:
        """The most HTTP requests one delivery makes. With the sinks' timeout, it is how long
        a delivery may take before it is presumed dead and sent again
        (`retry.deliver_lease_seconds`)."""
        ...

    def deliver(self, delivery: Delivery) -> None: ...

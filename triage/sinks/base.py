"""What a sink receives and must do."""

from __future__ import annotations

from dataclasses import dataclass
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


class Sink(Protocol):
    """Applies a delivery somewhere outside triage. Must be idempotent: a delivery can be
    retried after a timeout that in fact succeeded. Raises TransientError / PermanentError."""

    name: str

    def deliver(self, delivery: Delivery) -> None: ...

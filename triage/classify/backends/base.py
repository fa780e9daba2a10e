"""What every backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from triage.classify.schema import TicketLabel


@dataclass(frozen=True, slots=True)
class ClassificationRequest:
    """The text a backend may see: already cleaned and redacted by the pipeline."""

    ticket_id: int
    subject: str
    body: str
    channel: str | None = None
    # The cascade's first-model answer that an earlier attempt of this ticket generation paid
    # for, when its escalation failed transiently: the cascade reuses it instead of paying for
    # it again. Other backends ignore it.
    first_answer: FirstAnswer | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: Decimal = Decimal("0")

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens - other.input_tokens,
            output_tokens=self.output_tokens - other.output_tokens,
            cache_read_tokens=self.cache_read_tokens - other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens - other.cache_write_tokens,
            cost_usd=self.cost_usd - other.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class PaidEarlier:
    """Calls that an earlier attempt made and has on its attempt row, with their usage."""

    attempt_id: int
    calls: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class ClassificationResult:
    label: TicketLabel
    backend: str
    model: str
    prompt_version: str
    latency_ms: float
    usage: Usage = field(default_factory=Usage)
    request_id: str | None = None
    # Calls made to produce this label, escalations and repairs included (usage sums them).
    calls: int = 1
    # Set when an identical ticket's label was reused instead of a new call.
    reused_from_id: int | None = None
    # Set when the backend wants a person to look whatever the label says (an escalation
    # that could not be had): the ticket goes to review with this reason.
    review_reason: str | None = None
    # The part of `calls` and `usage` an earlier attempt paid for (a cascade's first answer,
    # reused when its escalation is retried): this attempt's own row counts only the rest.
    paid_earlier: PaidEarlier | None = None

    def paid_now(self) -> tuple[int, Usage]:
        """The calls this attempt made, and their usage."""
        if self.paid_earlier is None:
            return self.calls, self.usage
        return self.calls - self.paid_earlier.calls, self.usage - self.paid_earlier.usage


@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """A cascade's first-model answer and the attempt row that paid for it."""

    attempt_id: int
    result: ClassificationResult


class ClassifierBackend(Protocol):
    """Turns one ticket's text into a validated label.

    Raises triage.errors.TransientError for failures worth retrying and PermanentError for
    those that are not; never returns a label that failed validation.
    """

    name: str
    # The models whose labels this backend hands out as configured now: a label another
    # ticket got from a model no longer configured is not reused for a new one.
    models: frozenset[str]

    def classify(self, request: ClassificationRequest) -> ClassificationResult: ...

"""Escalation: ask the cheap model first and a larger one only when the first is unsure.

Most tickets are clear and cost one Haiku call; the few below `escalate_below_confidence` get
a second opinion from the escalation model, whose label wins. If that is still below the review
threshold, routing sends the ticket to a person.

If the escalation model cannot answer for good (it refuses, or its answer never validates),
the ticket goes to a person with the first model's label: that label was paid for and is
valid, only unsure. A transient failure is retried like any other, but the first model is not
asked again: the failed attempt's row keeps its answer (`TriageError.first_answer`, stored by
the guard), and the retry hands it back in `ClassificationRequest.first_answer`, checked
against the taxonomy by the stage, so only the escalation is paid for again. A first answer
from a model that is no longer this cascade's first model is asked again.

Accounting: each attempt's row counts the calls it made, once (the first call on the attempt
that made it). The label's `calls` and `usage` are what the label cost in total, the reused
first answer included, as for a label made in one attempt; `paid_earlier` says how much of that
an earlier attempt's row already has.
"""

from __future__ import annotations

import time
from dataclasses import replace

from triage.classify.backends.base import (
    ClassificationRequest,
    ClassificationResult,
    ClassifierBackend,
    PaidEarlier,
    Usage,
)
from triage.errors import PermanentError, TriageError


class CascadeBackend:
    name = "cascade"

    def __init__(
        self, primary: ClassifierBackend, escalation: ClassifierBackend, *, escalate_below: float
    ) -> None:
        self._primary = primary
        self._escalation = escalation
        self.models = primary.models | escalation.models
        self._escalate_below = escalate_below

    def classify(self, request: ClassificationRequest) -> ClassificationResult:
        started = time.perf_counter()
        first, earlier = self._first(request)
        if first.label.confidence >= self._escalate_below:
            return _as_cascade(first, first, started, earlier)
        try:
            second = self._escalation.classify(request)
        except PermanentError as exc:
            unsure = _as_cascade(first, first, started, earlier)
            return replace(
                unsure,
                calls=unsure.calls + exc.api_calls,
                usage=unsure.usage + (exc.usage or Usage()),
                review_reason=(
                    f"confidence {first.label.confidence:.2f}, and the escalation model "
                    f"could not answer: {exc.message[:200]}"
                ),
            )
        except TriageError as exc:
            if earlier is None:
                # The primary's calls were paid for by this attempt: its row must count them,
                # and keep the answer for the retry.
                exc.api_calls += first.calls
                exc.usage = first.usage + (exc.usage or Usage())
                exc.first_answer = first
            raise
        return _as_cascade(second, first, started, earlier)

    def _first(
        self, request: ClassificationRequest
    ) -> tuple[ClassificationResult, PaidEarlier | None]:
        """The first model's answer: the one an earlier attempt paid for, or a new call."""
        known = request.first_answer
        if known is not None and known.result.model in self._primary.models:
            paid = PaidEarlier(known.attempt_id, known.result.calls, known.result.usage)
            return known.result, paid
        return self._primary.classify(request), None


def _as_cascade(
    chosen: ClassificationResult,
    first: ClassificationResult,
    started: float,
    earlier: PaidEarlier | None,
) -> ClassificationResult:
    escalated = chosen is not first
    return ClassificationResult(
        label=chosen.label,
        backend="cascade",
        model=chosen.model,
        prompt_version=chosen.prompt_version,
        latency_ms=(time.perf_counter() - started) * 1000,
        usage=chosen.usage + first.usage if escalated else first.usage,
        request_id=chosen.request_id,
        calls=chosen.calls + first.calls if escalated else first.calls,
        paid_earlier=earlier,
    )

"""Escalation: ask the cheap model first and a larger one only when the first is unsure.

Most tickets are clear and cost one Haiku call; the few below `escalate_below_confidence` get
a second opinion from the escalation model, whose label wins. If that is still below the review
threshold, routing sends the ticket to a person.

If the escalation model cannot answer for good (it refuses, or its answer never validates),
the ticket goes to a person with the first model's label: that label was paid for and is
valid, only unsure. A transient failure is retried like any other (the first call is made
again then; the attempt log counts both).
"""

from __future__ import annotations

import time
from dataclasses import replace

from triage.classify.backends.base import (
    ClassificationRequest,
    ClassificationResult,
    ClassifierBackend,
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
        first = self._primary.classify(request)
        if first.label.confidence >= self._escalate_below:
            return _as_cascade(first, first, started)
        try:
            second = self._escalation.classify(request)
        except PermanentError as exc:
            unsure = _as_cascade(first, first, started)
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
            # The primary's calls were paid for too: the attempt log must count them.
            exc.api_calls += first.calls
            exc.usage = first.usage + (exc.usage or Usage())
            raise
        return _as_cascade(second, first, started)


def _as_cascade(
    chosen: ClassificationResult, first: ClassificationResult, started: float
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
    )

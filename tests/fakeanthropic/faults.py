"""Faults the fake Messages API can inject, and the rule that picks one for a request."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

# Each kind is something the real API (or the network in front of it) does.
KINDS = frozenset(
    {
        "rate_limit",  # 429 rate_limit_error with retry-after
        "overloaded",  # 529 overloaded_error
        "server_error",  # 500 api_error
        "bad_request",  # 400 invalid_request_error
        "auth",  # 401 authentication_error
        "timeout",  # answer only after `delay` seconds (the client times out first)
        "trickle",  # 200, the body sent a few bytes at a time, spread over `delay` seconds
        "drop",  # close the connection without an answer
        "malformed_json",  # 200, but the text is not JSON
        "truncated",  # 200, stop_reason max_tokens, JSON cut in half
        "context_window",  # 200, stop_reason model_context_window_exceeded, JSON cut in half
        "cut_body",  # 200, but the HTTP body is a Message's JSON cut in half (a broken proxy)
        "refusal",  # 200, stop_reason refusal, its text quoting the ticket's subject
        "schema_violation",  # 200, valid JSON that breaks the schema
        "batch_errored",  # a batch item that ends `errored`
        "batch_expired",  # a batch item that ends `expired`
        "batch_refusal",  # a batch item that succeeds with stop_reason refusal (billed), as above
        "batch_create_error",  # creating a batch answers 500 api_error (no batch is created)
    }
)


@dataclass
class Fault:
    """Inject `kind` into requests whose text contains `match` (any request when None), and
    that ask for `model` when it is set (a cascade's escalation model, say).

    `times` counts injections (-1: forever); `probability` makes each matching request fail
    only sometimes (seeded, so a run is repeatable).
    """

    kind: str
    times: int = 1
    match: str | None = None
    retry_after: float | None = None
    probability: float = 1.0
    delay: float = 30.0
    model: str | None = None
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        allowed = {"kind", "times", "match", "retry_after", "probability", "delay", "model"}
        return cls(**{k: v for k, v in data.items() if k in allowed})

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "times": self.times,
            "match": self.match,
            "retry_after": self.retry_after,
            "probability": self.probability,
            "delay": self.delay,
            "model": self.model,
            "injected": self.injected,
        }


class FaultPlan:
    """The faults in force, consulted once per request, in the order they were added."""

    def __init__(self, seed: int = 7) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def snapshot(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def pick(
        self, text: str, kinds: frozenset[str] | None = None, model: str | None = None
    ) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if kinds is not None and fault.kind not in kinds:
                    continue
                if kinds is None and fault.kind.startswith("batch_"):
                    continue
                if fault.times == 0 or (fault.match is not None and fault.match not in text):
                    continue
                if fault.model is not None and fault.model != model:
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                if fault.times > 0:
                    fault.times -= 1
                fault.injected += 1
                return fault
        return None

"""The taxonomy: intents, departments and routing rules, loaded from config/taxonomy.yaml.

Its version is a content hash so that every label records exactly which label set produced it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Priority = Literal["low", "normal", "high", "urgent"]
Sentiment = Literal["negative", "neutral", "positive"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high", "urgent")
SENTIMENTS: tuple[Sentiment, ...] = ("negative", "neutral", "positive")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Department(_Strict):
    description: str = Field(min_length=1)


class Intent(_Strict):
    department: str
    description: str = Field(min_length=1)
    examples: tuple[str, ...] = ()


class RuleCondition(_Strict):
    intent: str | None = None
    department: str | None = None
    priority: Priority | None = None
    sentiment: Sentiment | None = None
    language: str | None = None


class RoutingOverride(_Strict):
    name: str
    when: RuleCondition
    department: str


class RoutingConfig(_Strict):
    review_below_confidence: float = Field(0.5, ge=0.0, le=1.0)
    escalate_below_confidence: float = Field(0.7, ge=0.0, le=1.0)
    overrides: tuple[RoutingOverride, ...] = ()


class Taxonomy(_Strict):
    name: str
    departments: dict[str, Department]
    intents: dict[str, Intent]
    routing: RoutingConfig = RoutingConfig()

    @model_validator(mode="after")
    def _references_resolve(self) -> Taxonomy:
        if not self.intents:
            raise ValueError("at least one intent is required")
        for name, intent in self.intents.items():
            if intent.department not in self.departments:
                raise ValueError(
                    f"intents.{name}.department: unknown department {intent.department!r}"
                )
        for i, rule in enumerate(self.routing.overrides):
            if rule.department not in self.departments:
                raise ValueError(
                    f"routing.overrides[{i}].department: unknown department {rule.department!r}"
                )
            if rule.when.intent is not None and rule.when.intent not in self.intents:
                raise ValueError(
                    f"routing.overrides[{i}].when.intent: unknown intent {rule.when.intent!r}"
                )
        return self

    @cached_property
    def version(self) -> str:
        """A short content hash: equal files give equal versions, any edit a new one."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def __hash__(self) -> int:
        # Frozen models hash their fields, and dict fields are unhashable; the content hash is
        # the identity that matters (it keys the per-taxonomy prompt and schema caches).
        return hash(self.version)

    @property
    def intent_names(self) -> tuple[str, ...]:
        return tuple(self.intents)

    @property
    def department_names(self) -> tuple[str, ...]:
        return tuple(self.departments)

    def department_for(self, intent: str) -> str:
        return self.intents[intent].department

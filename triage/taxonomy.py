"""The taxonomy: intents, departments and routing rules, loaded from config/taxonomy.yaml.

Its version is a content hash so that every label records exactly which label set produced it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

Priority = Literal["low", "normal", "high", "urgent"]
Sentiment = Literal["negative", "neutral", "positive"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high", "urgent")
SENTIMENTS: tuple[Sentiment, ...] = ("negative", "neutral", "positive")


class ConfigModel(BaseModel):
    """A section of a config/ file: unknown keys are errors (a misspelt key would otherwise
    be ignored without a word), and a key whose value is null is as if it were left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        # `overrides:` with every rule commented out loads as null: the operator means none,
        # not a start-up error. A required key stays required.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


class Department(ConfigModel):
    description: str = Field(min_length=1)


class Intent(ConfigModel):
    department: str
    description: str = Field(min_length=1)
    examples: tuple[str, ...] = ()


class RuleCondition(ConfigModel):
    intent: str | None = None
    department: str | None = None
    priority: Priority | None = None
    sentiment: Sentiment | None = None
    language: str | None = None


class RoutingOverride(ConfigModel):
    name: str
    when: RuleCondition
    department: str


class RoutingConfig(ConfigModel):
    review_below_confidence: float = Field(0.5, ge=0.0, le=1.0)
    escalate_below_confidence: float = Field(0.7, ge=0.0, le=1.0)
    overrides: tuple[RoutingOverride, ...] = ()


def _is_label_language(code: str) -> bool:
    """Whether a label's `language` can equal `code`: the label schema owns that rule."""
    # Imported here: the schema module imports this one.
    from triage.classify.schema import TicketLabel

    constraints = TicketLabel.model_fields["language"].metadata
    try:
        TypeAdapter(Annotated[str, *constraints]).validate_python(code)
    except ValidationError:
        return False
    return True


class Taxonomy(ConfigModel):
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
            # A condition naming nothing a label can carry never matches; the rule would be
            # dead without a word, so each reference must resolve.
            where = f"routing.overrides[{i}]"
            override = f"override {rule.name!r}"
            when = rule.when
            if rule.department not in self.departments:
                raise ValueError(
                    f"{where}.department: {override}: unknown department {rule.department!r}"
                )
            if when.intent is not None and when.intent not in self.intents:
                raise ValueError(f"{where}.when.intent: {override}: unknown intent {when.intent!r}")
            if when.department is not None and when.department not in self.departments:
                raise ValueError(
                    f"{where}.when.department: {override}: unknown department {when.department!r}"
                )
            if (
                when.intent is not None
                and when.department is not None
                and self.intents[when.intent].department != when.department
            ):
                # `when.department` is the department owning the label's intent.
                raise ValueError(
                    f"{where}.when: {override} can never match: intent {when.intent!r} belongs "
                    f"to {self.intents[when.intent].department!r}, not {when.department!r}"
                )
            if when.language is not None and not _is_label_language(when.language):
                raise ValueError(
                    f"{where}.when.language: {override}: {when.language!r} is not a "
                    "language a label can have (a lower-case ISO 639-1 code such as 'en')"
                )
        self._examples_distinct()
        self._rules_reachable()
        return self

    def _examples_distinct(self) -> None:
        """One example text under two intents (an intent block pasted and renamed, its
        examples kept) teaches the prompt and the offline model both labels for one ticket."""
        owner: dict[str, str] = {}
        for name, intent in self.intents.items():
            for i, text in enumerate(intent.examples):
                first = owner.setdefault(" ".join(text.casefold().split()), name)
                if first != name:
                    raise ValueError(
                        f"intents.{name}.examples[{i}]: {text!r} is also an example of intent "
                        f"{first!r}; a ticket has one intent"
                    )

    def _rules_reachable(self) -> None:
        """First match wins, so a rule every ticket of which an earlier rule takes would be
        dead without a word (a catch-all `when: {}` above it, or a narrower copy below a wider
        rule); a name used twice makes the rule recorded with each route ambiguous."""
        overrides = self.routing.overrides
        names: dict[str, int] = {}
        for j, rule in enumerate(overrides):
            first = names.setdefault(rule.name, j)
            if first != j:
                raise ValueError(
                    f"routing.overrides[{j}].name: {rule.name!r} is already the name of "
                    f"routing.overrides[{first}]; each override needs its own"
                )
            for i, earlier in enumerate(overrides[:j]):
                if self._takes_all_of(earlier.when, rule.when):
                    raise ValueError(
                        f"routing.overrides[{j}]: override {rule.name!r} can never match: "
                        f"override {earlier.name!r} (routing.overrides[{i}]) comes first and "
                        "matches every ticket it would; put the narrower rule first"
                    )

    def _takes_all_of(self, earlier: RuleCondition, later: RuleCondition) -> bool:
        """Whether every label `later` matches, `earlier` matches too."""
        for key in ("intent", "department", "priority", "sentiment", "language"):
            wanted = getattr(earlier, key)
            if wanted is None:
                continue
            given = getattr(later, key)
            if key == "department" and given is None and later.intent is not None:
                given = self.intents[later.intent].department
            if given != wanted:
                return False
        return True

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

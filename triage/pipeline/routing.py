"""Routing rules: a label in, a route out. Pure: no database, no broker."""

from __future__ import annotations

from dataclasses import dataclass

from triage.classify.schema import TicketLabel
from triage.taxonomy import RuleCondition, Taxonomy

REVIEW_QUEUE = "triage.review"
CLASSIFY_QUEUE = "triage.classify"
DEAD_QUEUE = "triage.dead"


def department_queue(department: str) -> str:
    return f"dept.{department}"


@dataclass(frozen=True, slots=True)
class Route:
    queue: str
    department: str
    rule: str
    needs_review: bool = False
    reason: str | None = None


def _matches(cond: RuleCondition, label: TicketLabel, owner: str) -> bool:
    checks = {
        "intent": label.intent,
        # The department that owns the intent, as for routing without overrides: the model's
        # own department guess may disagree with its intent, and is not trusted.
        "department": owner,
        "priority": label.priority,
        "sentiment": label.sentiment,
        "language": label.language,
    }
    return all(
        getattr(cond, key) is None or getattr(cond, key) == value for key, value in checks.items()
    )


def decide_route(taxonomy: Taxonomy, label: TicketLabel, review_reason: str | None = None) -> Route:
    """Low confidence, or a backend's `review_reason`, goes to a person; otherwise the first
    matching override, otherwise the department that owns the intent. The model's own
    `department` guess is recorded but not trusted for routing: the taxonomy owns that
    mapping."""
    routing = taxonomy.routing
    owner = taxonomy.department_for(label.intent)
    if review_reason is not None:
        return Route(
            queue=REVIEW_QUEUE,
            department=owner,
            rule="backend-review",
            needs_review=True,
            reason=review_reason,
        )
    if label.confidence < routing.review_below_confidence:
        return Route(
            queue=REVIEW_QUEUE,
            department=owner,
            rule="low-confidence",
            needs_review=True,
            reason=(
                f"confidence {label.confidence:.2f} below {routing.review_below_confidence:.2f}"
            ),
        )
    for rule in routing.overrides:
        if _matches(rule.when, label, owner):
            return Route(
                queue=department_queue(rule.department), department=rule.department, rule=rule.name
            )
    return Route(queue=department_queue(owner), department=owner, rule=f"intent:{label.intent}")

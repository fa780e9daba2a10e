"""Routing rules are a pure function of the label and the taxonomy."""

from __future__ import annotations

import pytest

from triage.classify.schema import TicketLabel
from triage.config import get_config
from triage.pipeline.routing import REVIEW_QUEUE, decide_route


@pytest.fixture(scope="module")
def taxonomy():
    return get_config().taxonomy


def label(**kw) -> TicketLabel:
    base = dict(
        intent="shipping",
        department="logistics",
        priority="normal",
        language="en",
        sentiment="neutral",
        confidence=0.9,
        summary="Where is my parcel",
    )
    base.update(kw)
    return TicketLabel(**base)


def test_intent_routes_to_its_department_queue(taxonomy):
    route = decide_route(taxonomy, label())
    assert (route.queue, route.department, route.needs_review) == (
        "dept.logistics",
        "logistics",
        False,
    )


def test_model_department_guess_does_not_override_the_taxonomy(taxonomy):
    assert decide_route(taxonomy, label(department="sales")).department == "logistics"


def test_urgent_priority_goes_to_escalations(taxonomy):
    route = decide_route(taxonomy, label(priority="urgent"))
    assert route.queue == "dept.escalations"
    assert route.rule == "urgent-to-escalations"


def test_low_confidence_goes_to_human_review_even_when_urgent(taxonomy):
    threshold = taxonomy.routing.review_below_confidence
    route = decide_route(taxonomy, label(priority="urgent", confidence=threshold - 0.01))
    assert route.queue == REVIEW_QUEUE and route.needs_review
    assert "below" in (route.reason or "")


def test_confidence_at_threshold_is_routed(taxonomy):
    threshold = taxonomy.routing.review_below_confidence
    assert not decide_route(taxonomy, label(confidence=threshold)).needs_review


def test_override_with_several_conditions_needs_all(taxonomy):
    hot = label(intent="account", department="accounts", sentiment="negative", priority="high")
    assert decide_route(taxonomy, hot).department == "escalations"
    assert decide_route(taxonomy, label(intent="account", priority="high")).department == "accounts"


def test_a_backend_review_reason_sends_even_a_sure_label_to_a_person(taxonomy):
    route = decide_route(taxonomy, label(confidence=0.95), "the escalation model refused")
    assert (route.queue, route.department, route.needs_review) == (
        REVIEW_QUEUE,
        "logistics",
        True,
    )
    assert route.reason == "the escalation model refused"


def _with_override(taxonomy, when: dict, department: str = "escalations"):
    data = taxonomy.model_dump()
    data["routing"]["overrides"] = [{"name": "rule", "when": when, "department": department}]
    return type(taxonomy).model_validate(data)


def test_a_department_condition_matches_the_department_owning_the_intent_not_the_models_guess(
    taxonomy,
):
    billing_high = _with_override(taxonomy, {"department": "billing", "priority": "high"})
    # A refund is billing's, whatever department the model named alongside it...
    refund = label(intent="refund", department="sales", priority="high")
    assert decide_route(billing_high, refund).department == "escalations"
    # ...and a shipping question stays logistics' even when the model guessed billing.
    shipping = label(intent="shipping", department="billing", priority="high")
    assert decide_route(billing_high, shipping).department == "logistics"

"""Answers carried by a classify message's retry (the database was down when they came): the
worker that takes the retry records them without a call, even when its taxonomy is newer than
the one that asked."""

from __future__ import annotations

import pytest

from tests.support.rows import add_ticket
from tests.support.stack import make_runtime, stack_env, truncate
from triage.classify.backends.base import ClassificationResult, Usage
from triage.classify.schema import TicketLabel
from triage.db.models import Attempt, Ticket, TicketState
from triage.db.session import session_scope
from triage.pipeline.classify_labels import carry_answers
from triage.pipeline.classify_stage import classify_tickets_stage


@pytest.fixture()
def rt(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(stack_env(pg_url, clean_redis))


def _classifying(rt, n: int) -> int:
    """A ticket a worker claimed (attempt 1) and whose answer it could not record."""
    with session_scope(rt.sessions) as s:
        body = f"My invoice {n} charged me twice"
        return add_ticket(
            s, body, subject="Billing", state=TicketState.CLASSIFYING.value, attempts=1
        ).id


def _answer(intent: str) -> ClassificationResult:
    label = TicketLabel(
        intent=intent,
        department="billing",
        priority="normal",
        language="en",
        sentiment="negative",
        confidence=0.95,
        summary="Customer was charged twice.",
    )
    return ClassificationResult(
        label=label,
        backend="anthropic",
        model="claude-haiku-4-5",
        prompt_version="p1",
        latency_ms=480.0,
        usage=Usage(input_tokens=900, output_tokens=60),
        request_id="req_carried",
    )


class _Held:
    def __init__(self, ticket_id: int) -> None:
        self.ticket_id, self.attempt, self.generation = ticket_id, 1, 0


def test_a_carried_answer_is_recorded_without_a_call_and_one_for_a_removed_intent_waits(rt):
    kept, orphan = _classifying(rt, 1), _classifying(rt, 2)
    carried = carry_answers([(_Held(kept), _answer("billing")), (_Held(orphan), _answer("gone"))])

    outcomes = classify_tickets_stage(rt, [kept, orphan], carried=carried)

    # The routable answer is recorded as the attempt that paid for it; the one whose intent
    # the taxonomy dropped cannot be routed, so its ticket is left to its claim's lease (and
    # asked again after it) instead of failing the whole message.
    assert outcomes == {kept: "routed", orphan: "deferred"}
    with rt.sessions() as s:
        assert s.get(Ticket, kept).state == TicketState.ROUTED
        assert s.get(Ticket, orphan).state == TicketState.CLASSIFYING
        attempts = s.query(Attempt.ticket_id, Attempt.number, Attempt.request_id).all()
    assert attempts == [(kept, 1, "req_carried")]

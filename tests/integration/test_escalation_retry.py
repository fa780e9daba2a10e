"""A cascade whose escalation fails transiently: the retry reuses the first model's answer,
which the failed attempt paid for and kept on its row, and asks only the escalation model
again. The real SDK against the fake Messages API; the stage on real PostgreSQL and Redis."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select, update

from tests.fakeanthropic import FakeAnthropic, Fault
from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.erasure import ERASED, erase_tickets
from triage.db.models import Attempt, Classification, Ticket
from triage.db.queries import TicketFilter
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.db.stats import Window, compute
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.reprocess import find_or_create_run, pending_items, reprocess_item

HAIKU, SONNET = "claude-haiku-4-5", "claude-sonnet-5"
# The cheap model is unsure of "sales"; the escalation model is sure of "billing".
UNSURE = (
    "maybe a quote? [[intent:sales]] [[confidence:0.4]] "
    "[[claude-sonnet-5/intent:billing]] [[claude-sonnet-5/confidence:0.95]]"
)


@pytest.fixture()
def fake():
    with FakeAnthropic() as server:
        yield server


@pytest.fixture()
def rt(pg_url, clean_redis, fake):
    truncate(pg_url)
    return make_runtime(
        stack_env(
            pg_url,
            clean_redis,
            TRIAGE_BACKEND="cascade",
            ANTHROPIC_API_KEY="sk-test",
            ANTHROPIC_BASE_URL=fake.base_url,
        )
    )


def _ticket(rt) -> int:
    inbound = InboundTicket(source="generic", external_id="unsure", subject="Hi", body=UNSURE)
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound).ticket_id


def _asked(fake) -> list[str]:
    return [r.body["model"] for r in fake.requests if r.path == "/v1/messages"]


def _attempts(rt, tid) -> list[Attempt]:
    with rt.sessions() as session:
        return list(
            session.scalars(select(Attempt).where(Attempt.ticket_id == tid).order_by(Attempt.id))
        )


def _label(rt, tid) -> Classification:
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        label = session.get(Classification, ticket.current_classification_id)
        assert label is not None
        return label


def _escalation_fails_once(rt, fake, tid) -> Attempt:
    """The first attempt: the cheap answer, then an escalation that answers 500."""
    fake.add_fault(Fault("server_error", times=1, model=SONNET))
    assert classify_tickets_stage(rt, [tid]) == {tid: "retry"}
    (failed,) = _attempts(rt, tid)
    assert failed.answer is not None
    return failed


def test_the_retry_asks_only_the_escalation_and_every_call_is_counted_once(rt, fake):
    tid = _ticket(rt)
    failed = _escalation_fails_once(rt, fake, tid)
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}

    assert _asked(fake) == [HAIKU, SONNET, SONNET]
    label = _label(rt, tid)
    _, ok = _attempts(rt, tid)
    assert (label.model, label.intent, label.department) == (SONNET, "billing", "billing")
    assert (failed.outcome, failed.api_calls, ok.outcome, ok.api_calls) == ("retry", 2, "ok", 1)
    # The label's row has what the label cost in total: the reused cheap answer too.
    assert label.calls == 2 and label.first_answer_attempt_id == failed.id
    assert label.cost_usd == failed.cost_usd + ok.cost_usd
    with rt.sessions() as session:
        usage = compute(session, Window(None, None))["usage"]
    # Three calls made, the cheap one counted once though it is on two rows; the 500 was free.
    assert usage["api_calls"] == 3
    assert usage["input_tokens"] == failed.input_tokens + ok.input_tokens
    assert Decimal(usage["cost_usd"]) == label.cost_usd
    assert usage["without_label"] == {"api_calls": 1, "cost_usd": "0.000000"}


def test_an_escalation_refused_on_the_retry_sends_the_paid_cheap_label_to_review(rt, fake):
    tid = _ticket(rt)
    failed = _escalation_fails_once(rt, fake, tid)
    fake.add_fault(Fault("refusal", times=1, model=SONNET))
    assert classify_tickets_stage(rt, [tid]) == {tid: "review"}

    assert _asked(fake) == [HAIKU, SONNET, SONNET]
    label = _label(rt, tid)
    _, ok = _attempts(rt, tid)
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        assert ticket.state == "needs_review"
        assert ticket.review_reason and "could not answer" in ticket.review_reason
    assert (label.model, label.intent) == (HAIKU, "sales")
    # The cheap call, and the refused escalation (billed) that the retry made.
    assert label.calls == 2 and ok.api_calls == 1 and ok.cost_usd > 0
    assert label.cost_usd == failed.cost_usd + ok.cost_usd


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        # A newer taxonomy has no such intent: the answer cannot be routed.
        (("result", "label"), "intent", "warranty_claim"),
        # The cascade's first model is another one now.
        (("result",), "model", "claude-3-haiku-20240307"),
    ],
)
def test_a_first_answer_that_no_longer_fits_is_asked_again(rt, fake, where, field, value):
    tid = _ticket(rt)
    failed = _escalation_fails_once(rt, fake, tid)
    answer = dict(failed.answer or {})
    node = answer
    for key in where:
        node = node[key]
    node[field] = value
    with session_scope(rt.sessions) as session:
        session.execute(update(Attempt).where(Attempt.id == failed.id).values(answer=answer))
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}

    assert _asked(fake) == [HAIKU, SONNET, HAIKU, SONNET]
    label = _label(rt, tid)
    _, ok = _attempts(rt, tid)
    assert label.model == SONNET and label.first_answer_attempt_id is None
    assert ok.api_calls == 2 and label.cost_usd == ok.cost_usd


def test_a_reprocess_asks_afresh_not_with_an_earlier_runs_first_answer(rt, fake):
    tid = _ticket(rt)
    _escalation_fails_once(rt, fake, tid)
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    fake.reset_stats()

    run, _ = find_or_create_run(rt, "inline", TicketFilter(ids=(tid,)))
    (item,) = pending_items(rt, run.id)
    # The reprocess's first attempt fails before any answer; its retry (a worker's) finds
    # only the earlier generation's first answer, and must not use it.
    fake.add_fault(Fault("server_error", times=1, model=HAIKU))
    assert reprocess_item(rt, item).outcome == "retry"
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}

    assert _asked(fake) == [HAIKU, HAIKU, SONNET]
    label = _label(rt, tid)
    assert label.generation == 1 and label.first_answer_attempt_id is None


def test_erasure_blanks_the_summary_of_a_kept_first_answer(rt, fake):
    tid = _ticket(rt)
    failed = _escalation_fails_once(rt, fake, tid)
    assert failed.answer is not None
    assert failed.answer["result"]["label"]["summary"] != ERASED
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    with session_scope(rt.sessions) as session:
        assert erase_tickets(session, [tid]).erased == [tid]
    kept, _ = _attempts(rt, tid)
    assert kept.answer is not None and kept.answer["result"]["label"]["summary"] == ERASED
    assert kept.answer["result"]["usage"] == failed.answer["result"]["usage"]

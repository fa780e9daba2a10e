"""New customer text makes a new generation of a ticket: work on an older one, still in
flight, must not finish, fail or dead-letter the newer one.

Real PostgreSQL and Redis, the real SDK against the fake Messages API; the stage functions
run on threads here, as a worker's task threads run them. The fake's `timeout` fault holds a
call open for a set time (or past the client's timeout), which sets the interleavings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from sqlalchemy import select

from tests.fakeanthropic.faults import Fault
from tests.support.fakehttp import Reply, running_api
from tests.support.stack import (
    SINK_SECRET,
    config_with_webhook_sink,
    in_background,
    wait_until,
)
from triage.db.models import Attempt, Classification, DeadLetter, Dispatch, Ticket
from triage.db.repo import APPLIED_UPDATES, accept_ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.deliver_stage import deliver_many_stage
from triage.pipeline.runtime import Runtime
from triage.reliability.deadletter import dead_letter, replay

BODY = "I was charged twice for order 5531. [[intent:billing]] [[confidence:0.95]]"


@pytest.fixture()
def runtime(runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    return partial(runtime, TRIAGE_UPDATE_POLICY="retriage")


def _post(
    rt: Runtime,
    *,
    key: str | None = None,
    text: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    inbound = InboundTicket(
        source="generic",
        external_id="gen-1",
        subject="Charged twice",
        body=BODY,
        update_key=key,
        update_text=text,
        metadata=metadata or {},
    )
    with session_scope(rt.sessions) as session:
        return accept_ticket(session, inbound, update_policy=rt.settings.update_policy).ticket_id


def _ticket(rt: Runtime, tid: int) -> Ticket:
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        return ticket


def test_an_answer_for_the_old_text_does_not_finish_the_new_generation(runtime, fake):
    rt = runtime()
    tid = _post(rt)
    # A's call (old text) answers after 1 s; B's (the new text) after 2.5 s: A answers while
    # B holds the ticket's new generation.
    fake.add_fault(Fault(kind="timeout", delay=1.0))
    a, a_out = in_background(lambda: classify_tickets_stage(rt, [tid]))
    wait_until(lambda: fake.in_flight() == 1, 10, what="A's call in flight")
    _post(rt, key="c1", text="Also, the app crashes when I open the invoice.")
    fake.add_fault(Fault(kind="timeout", delay=2.5))
    b, b_out = in_background(lambda: classify_tickets_stage(rt, [tid]))
    wait_until(lambda: fake.in_flight() == 2, 10, what="B's call in flight")
    a.join(30)
    b.join(30)

    assert a_out["result"] == {tid: "superseded"}
    assert b_out["result"] == {tid: "routed"}
    with rt.sessions() as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None and ticket.generation == 1 and ticket.state == "routed"
        label = session.get(Classification, ticket.current_classification_id)
        assert label is not None and label.generation == 1
        dispatches = session.scalars(select(Dispatch).where(Dispatch.ticket_id == tid)).all()
        assert [d.generation for d in dispatches] == [1]
        outcomes = sorted(
            session.scalars(
                select(Attempt.outcome).where(Attempt.ticket_id == tid, Attempt.stage == "classify")
            )
        )
    # Both calls were paid for, and both are on record.
    assert outcomes == ["ok", "superseded"]
    assert fake.call_count() == 2


def test_a_failing_call_for_the_old_text_does_not_take_the_new_claim_away(runtime, fake):
    rt = runtime(TRIAGE_API_TIMEOUT_SECONDS="3")
    tid = _post(rt)
    # A's call never answers in time: a transient failure at 3 s, while B (new text, started
    # at 1.5 s, answering after 2 s) is still in its call.
    fake.add_fault(Fault(kind="timeout", delay=30.0))
    a, a_out = in_background(lambda: classify_tickets_stage(rt, [tid]))
    wait_until(lambda: fake.in_flight() == 1, 10, what="A's call in flight")
    _post(rt, key="c1", text="Also, the app crashes when I open the invoice.")
    time.sleep(1.5)
    fake.add_fault(Fault(kind="timeout", delay=2.0))
    b, b_out = in_background(lambda: classify_tickets_stage(rt, [tid]))
    a.join(30)
    b.join(30)

    # A's claim was on text the ticket no longer has: its failure changes nothing.
    assert a_out["result"] == {tid: "superseded"}
    assert b_out["result"] == {tid: "routed"}
    ticket = _ticket(rt, tid)
    assert ticket.state == "routed" and ticket.generation == 1


def test_a_last_failing_attempt_on_the_old_text_does_not_dead_letter_the_new_one(runtime, fake):
    rt = runtime(TRIAGE_API_TIMEOUT_SECONDS="1.5", TRIAGE_CLASSIFY_MAX_ATTEMPTS="1")
    tid = _post(rt)
    fake.add_fault(Fault(kind="timeout", delay=30.0))
    a, a_out = in_background(lambda: classify_tickets_stage(rt, [tid]))
    wait_until(lambda: fake.in_flight() == 1, 10, what="A's call in flight")
    _post(rt, key="c1", text="Also, the app crashes when I open the invoice.")
    a.join(30)

    # Out of attempts, but for text the ticket no longer has: nothing to dead-letter.
    assert a_out["result"] == {tid: "superseded"}
    ticket = _ticket(rt, tid)
    assert ticket.state == "queued" and ticket.generation == 1 and ticket.attempts == 0
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    with rt.sessions() as session:
        assert session.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).all() == []


def test_a_failing_delivery_of_the_old_routing_does_not_dead_letter_the_new_one(
    runtime, tmp_path, monkeypatch
):
    # The sink table is read when first used, from this process's environment.
    monkeypatch.setenv("TRIAGE_SINK_SECRET_RECEIVER", SINK_SECRET)
    with running_api() as receiver:
        rt = runtime(
            TRIAGE_CONFIG_DIR=str(config_with_webhook_sink(tmp_path, receiver.url)),
            TRIAGE_SINK_SECRET_RECEIVER=SINK_SECRET,
        )
        tid = _post(rt)
        assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
        # The receiver refuses the first delivery for good, after 1.5 s; later ones succeed.
        receiver.script("POST", "/hook", Reply(status=422, body={"error": "no"}, delay=1.5))
        with rt.sessions() as session:
            (old,) = session.scalars(select(Dispatch.id).where(Dispatch.ticket_id == tid))
        d, d_out = in_background(lambda: deliver_many_stage(rt, [old]))
        wait_until(lambda: receiver.requests, 10, what="the old delivery sent")
        # Meanwhile the customer writes again, and the ticket is routed anew.
        _post(rt, key="c1", text="Also, the app crashes when I open the invoice.")
        assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
        d.join(30)
        assert d_out["result"] == {old: "noop"}
        ticket = _ticket(rt, tid)
        assert ticket.state == "routed" and ticket.generation == 1
        with rt.sessions() as session:
            (new,) = session.scalars(
                select(Dispatch.id).where(Dispatch.ticket_id == tid, Dispatch.generation == 1)
            )
        assert deliver_many_stage(rt, [new]) == {new: "delivered"}
    with rt.sessions() as session:
        assert session.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).all() == []


def test_the_webhook_carries_the_tickets_metadata_but_not_triages_record_of_updates(
    runtime, tmp_path, monkeypatch
):
    monkeypatch.setenv("TRIAGE_SINK_SECRET_RECEIVER", SINK_SECRET)
    with running_api() as receiver:
        rt = runtime(
            TRIAGE_CONFIG_DIR=str(config_with_webhook_sink(tmp_path, receiver.url)),
            TRIAGE_SINK_SECRET_RECEIVER=SINK_SECRET,
        )
        tid = _post(rt, metadata={"plan": "pro"})
        _post(rt, key="c1", text="Also, the app crashes when I open the invoice.")
        assert APPLIED_UPDATES in (_ticket(rt, tid).extra or {})
        assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
        with rt.sessions() as session:
            (dispatch,) = session.scalars(select(Dispatch.id).where(Dispatch.ticket_id == tid))
        assert deliver_many_stage(rt, [dispatch]) == {dispatch: "delivered"}
        (sent,) = receiver.requests
    # Triage's own bookkeeping (which updates it applied) is nobody else's business.
    assert sent.json()["data"]["metadata"] == {"plan": "pro"}


def test_new_text_for_a_dead_lettered_ticket_starts_afresh_and_closes_its_letter(runtime, fake):
    rt = runtime(TRIAGE_CLASSIFY_MAX_ATTEMPTS="2")
    tid = _post(rt)
    with session_scope(rt.sessions) as session:
        session.get(Ticket, tid).attempts = 2  # type: ignore[union-attr]
        lettered = dead_letter(
            session,
            ticket_id=tid,
            stage="classify",
            error=PermanentError("model refused"),
            attempts=2,
            payload={},
        )
        assert lettered is not None
        letter_id = lettered[0].id

    _post(rt, key="c1", text="Here is the order number you asked for: 5531.")
    ticket = _ticket(rt, tid)
    # A new generation with its own attempt budget: before, it kept the two spent attempts
    # and was dead-lettered again without a call.
    assert ticket.state == "queued" and ticket.generation == 1 and ticket.attempts == 0
    with rt.sessions() as session:
        letter = session.get(DeadLetter, letter_id)
        assert letter is not None and letter.replayed_at is not None
    assert classify_tickets_stage(rt, [tid]) == {tid: "routed"}
    assert fake.call_count() == 1
    # The old letter is closed: replaying it does nothing, and costs no call.
    with session_scope(rt.sessions) as session:
        assert replay(session, letter_id) is None
    assert _ticket(rt, tid).state == "routed"


def test_only_the_newest_dead_letter_of_a_ticket_can_be_replayed(runtime):
    rt = runtime()
    tid = _post(rt)
    with session_scope(rt.sessions) as session:
        older = dead_letter(
            session,
            ticket_id=tid,
            stage="classify",
            error=PermanentError("first failure"),
            attempts=1,
            payload={},
        )
        assert older is not None
        older_id = older[0].id
    # Data written before letters were closed on re-triage: an older letter still open when
    # the ticket was dead-lettered again later.
    with session_scope(rt.sessions) as session:
        ticket = session.get(Ticket, tid)
        assert ticket is not None
        ticket.state = "routed"
    with session_scope(rt.sessions) as session:
        newer = dead_letter(
            session,
            ticket_id=tid,
            stage="deliver",
            error=PermanentError("sink refused"),
            attempts=1,
            payload={},
        )
        assert newer is not None
        newer_id = newer[0].id
    with session_scope(rt.sessions) as session:
        assert replay(session, older_id) is None
    assert _ticket(rt, tid).state == "dead_lettered"
    with session_scope(rt.sessions) as session:
        assert replay(session, newer_id) is not None


def test_concurrent_updates_of_one_ticket_all_reach_it(runtime):
    rt = runtime()
    tid = _post(rt)
    texts = {f"c{i}": f"Comment number {i} from the customer." for i in range(8)}
    barrier = threading.Barrier(len(texts))

    def post(key: str) -> int:
        barrier.wait()
        return _post(rt, key=key, text=texts[key])

    with ThreadPoolExecutor(len(texts)) as pool:
        assert set(pool.map(post, texts)) == {tid}
    ticket = _ticket(rt, tid)
    assert sorted(ticket.extra[APPLIED_UPDATES]) == sorted(texts)
    assert all(text in ticket.body for text in texts.values())
    assert ticket.generation == len(texts)

"""A wave of answers recorded in one statement on PostgreSQL (`label_statement`) writes the rows
the transaction of `store_labels` writes, column by column, with the same outcomes and delivery
messages: routed and review tickets, a reused label, a cascade's escalation that paid for only
part of its calls, and a ticket another worker claimed meanwhile (superseded: no label, no
dispatch, its attempt on record). Real PostgreSQL; SQLite takes `store_labels` itself."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.support.rows import add_label, add_ticket
from tests.support.stack import make_runtime, stack_env, truncate
from triage.classify.backends.base import ClassificationResult, PaidEarlier, Usage
from triage.classify.schema import TicketLabel
from triage.db.models import Attempt, Classification, Dispatch, OutboxMessage, Ticket, TicketState
from triage.db.session import session_scope
from triage.pipeline.classify_claims import claim_chunk
from triage.pipeline.classify_labels import _record_in_one_statement, store_labels

# Per ticket of a wave: the answer's label fields and how it was had.
WAVE: list[dict[str, Any]] = [
    {"intent": "billing", "confidence": 0.93},
    {"intent": "refund", "confidence": 0.31},  # unsure: to review
    {"intent": "technical", "confidence": 0.9, "reused": True},
    {"intent": "account", "confidence": 0.88, "review_reason": "escalation unavailable"},
    {"intent": "shipping", "confidence": 0.95, "paid_earlier": True},
    {"intent": "billing", "confidence": 0.9, "superseded": True},
]


@pytest.fixture
def rt(pg_url, clean_redis):
    truncate(pg_url)
    return make_runtime(stack_env(pg_url, clean_redis))


def _result(rt, spec: dict[str, Any], source_label: int, n: int) -> ClassificationResult:
    label = TicketLabel(
        intent=spec["intent"],
        department=rt.config.taxonomy.department_for(spec["intent"]),
        priority="high",
        language="en",
        sentiment="negative",
        confidence=spec["confidence"],
        summary=f"answer {n}",
    )
    usage = Usage(input_tokens=400 + n, output_tokens=60, cost_usd=Decimal("0.000700"))
    if spec.get("reused"):
        return ClassificationResult(
            label=label,
            backend=rt.backend.name,
            model="claude-haiku-4-5",
            prompt_version="p1",
            latency_ms=0.0,
            calls=0,
            reused_from_id=source_label,
        )
    return ClassificationResult(
        label=label,
        backend=rt.backend.name,
        model="claude-haiku-4-5",
        prompt_version="p1",
        latency_ms=512.5 + n,
        usage=usage,
        request_id=f"req_{n}",
        calls=2 if spec.get("paid_earlier") else 1,
        review_reason=spec.get("review_reason"),
        paid_earlier=(
            PaidEarlier(attempt_id=7, calls=1, usage=Usage(input_tokens=300, output_tokens=50))
            if spec.get("paid_earlier")
            else None
        ),
    )


@pytest.fixture
def source_label(rt) -> int:
    """An earlier ticket's label, for the reused answers."""
    with session_scope(rt.sessions) as s:
        return add_label(s, add_ticket(s, "an older ticket")).id


def _claimed_wave(rt, tag: str, source_label: int) -> list[tuple[Any, ClassificationResult]]:
    """A wave's tickets, claimed as a worker claims them, and their answers; the last ticket
    then claimed again by someone else."""
    with session_scope(rt.sessions) as s:
        ids = [
            add_ticket(s, f"ticket {tag} {n}", state=TicketState.QUEUED.value).id
            for n in range(len(WAVE))
        ]
    claims = claim_chunk(rt, ids, False, {})
    assert [c.ticket_id for c in claims] == ids
    with session_scope(rt.sessions) as s:
        s.execute(update(Ticket).where(Ticket.id == ids[-1]).values(attempts=Ticket.attempts + 1))
    return [
        (claim, _result(rt, spec, source_label, n))
        for n, (claim, spec) in enumerate(zip(claims, WAVE, strict=True))
    ]


def _rows(rt, ticket_ids: list[int]) -> list[dict[str, Any]]:
    """What the database holds for each ticket, without ids and the moments rows were written
    (the ids of a ticket's own label, dispatch and message are compared as references)."""
    out = []
    with rt.sessions() as s:
        for ticket_id in ticket_ids:
            ticket = s.get(Ticket, ticket_id)
            labels = s.scalars(select(Classification).where(Classification.ticket_id == ticket_id))
            attempts = s.scalars(select(Attempt).where(Attempt.ticket_id == ticket_id))
            dispatches = s.scalars(select(Dispatch).where(Dispatch.ticket_id == ticket_id)).all()
            messages = s.scalars(
                select(OutboxMessage).where(OutboxMessage.ticket_id == ticket_id)
            ).all()
            assert ticket is not None
            label_rows = [_columns(c, "id", "ticket_id", "created_at") for c in labels]
            out.append(
                {
                    "ticket": _columns(
                        ticket,
                        "id",
                        "external_id",
                        "body",
                        "clean_text",
                        "content_hash",
                        "subject",
                        "received_at",
                        "state_changed_at",
                        "current_classification_id",
                    ),
                    "label is current": [
                        ticket.current_classification_id == c.id
                        for c in s.scalars(
                            select(Classification).where(Classification.ticket_id == ticket_id)
                        )
                    ],
                    "labels": label_rows,
                    "attempts": sorted(
                        (
                            _columns(a, "id", "ticket_id", "started_at", "finished_at")
                            for a in attempts
                        ),
                        key=repr,
                    ),
                    "dispatches": [
                        {
                            **_columns(d, "id", "ticket_id", "classification_id", "created_at"),
                            "of the current label": d.classification_id
                            == ticket.current_classification_id,
                        }
                        for d in dispatches
                    ],
                    "messages": [
                        {
                            **_columns(m, "id", "ticket_id", "args", "created_at", "available_at"),
                            "names its dispatch": [m.args]
                            == [{"dispatch_id": d.id} for d in dispatches]
                            or m.task != "triage.deliver",
                            "claimed for": round((m.available_at - m.created_at).total_seconds()),
                        }
                        for m in messages
                    ],
                }
            )
    return out


def _columns(row: Any, *leave_out: str) -> dict[str, Any]:
    return {
        column.key: getattr(row, column.key)
        for column in row.__table__.columns
        if column.key not in leave_out
    }


def test_one_statement_writes_what_the_transaction_writes(rt, source_label):
    by_transaction = _claimed_wave(rt, "a", source_label)
    in_one_statement = _claimed_wave(rt, "b", source_label)

    with session_scope(rt.sessions) as s:
        old = store_labels(rt, s, by_transaction, write=rt.publisher.write)
    new = _record_in_one_statement(rt, in_one_statement)

    old_ids = [claim.ticket_id for claim, _ in by_transaction]
    new_ids = [claim.ticket_id for claim, _ in in_one_statement]
    assert [old.outcomes[i] for i in old_ids] == [new.outcomes[i] for i in new_ids]
    assert [new.outcomes[i] for i in new_ids] == [
        "routed",
        "review",
        "routed",
        "review",
        "routed",
        "superseded",
    ]
    assert sorted(new.label_ids) == new_ids[:-1]
    assert [(p.task, p.queue, p.countdown) for p in old.outbox] == [
        (p.task, p.queue, p.countdown) for p in new.outbox
    ]

    old_rows, new_rows = _rows(rt, old_ids), _rows(rt, new_ids)
    for n, (was, now) in enumerate(zip(old_rows, new_rows, strict=True)):
        assert now == was, f"ticket {n} of the wave ({WAVE[n]})"
    # What each side said it wrote is what is there.
    with rt.sessions() as s:
        for ticket_id, label_id in new.label_ids.items():
            assert s.get(Ticket, ticket_id).current_classification_id == label_id
        for pending in new.outbox:
            message = s.get(OutboxMessage, pending.id)
            assert (message.ticket_id, message.queue, message.args) == (
                pending.ticket_id,
                pending.queue,
                pending.args,
            )
    superseded = new_rows[-1]
    assert superseded["labels"] == [] and superseded["dispatches"] == []
    assert [a["outcome"] for a in superseded["attempts"]] == ["superseded"]


def test_a_wave_of_one_and_a_wave_whose_tickets_all_moved_on(rt, source_label):
    (one,) = _claimed_wave(rt, "c", source_label)[:1]
    assert _record_in_one_statement(rt, [one]).outcomes == {one[0].ticket_id: "routed"}

    wave = _claimed_wave(rt, "d", source_label)
    with session_scope(rt.sessions) as s:
        s.execute(
            update(Ticket)
            .where(Ticket.id.in_([claim.ticket_id for claim, _ in wave]))
            .values(generation=Ticket.generation + 1, state=TicketState.QUEUED.value)
        )
    recorded = _record_in_one_statement(rt, wave)
    assert set(recorded.outcomes.values()) == {"superseded"}
    assert recorded.label_ids == {} and recorded.outbox == []
    with rt.sessions() as s:
        ids = [claim.ticket_id for claim, _ in wave]
        assert (
            s.scalars(select(Classification).where(Classification.ticket_id.in_(ids))).all() == []
        )
        outcomes = s.scalars(select(Attempt.outcome).where(Attempt.ticket_id.in_(ids))).all()
        assert sorted(outcomes) == ["superseded"] * len(ids)

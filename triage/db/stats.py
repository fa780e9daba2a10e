"""The numbers `triage stats` reports, over a window of received tickets.

Percentiles are computed here in Python (nearest rank) rather than in SQL: PostgreSQL has
`percentile_cont` and SQLite has nothing, and one definition on both is worth the row fetch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import ScalarSelect, Select, distinct, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from triage.classify.backends.base import Usage
from triage.db.models import (
    Attempt,
    Classification,
    DeadLetter,
    Dispatch,
    ReprocessItem,
    Ticket,
    TicketState,
)

BATCH_BACKEND = "anthropic-batch"
# Attempt outcomes whose answer became the label on record (its cost is on that label's row).
KEPT_OUTCOMES = ("ok", "reused")


# A text column tickets are counted by (state, intent, department, language).
_Grouping = InstrumentedAttribute[str] | InstrumentedAttribute[str | None]


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    return {
        "n": len(values),
        "p50_ms": _round(percentile(values, 50)),
        "p95_ms": _round(percentile(values, 95)),
        "p99_ms": _round(percentile(values, 99)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime | None
    until: datetime | None

    def tickets(self) -> Select[int]:
        stmt = select(Ticket.id)
        if self.since:
            stmt = stmt.where(Ticket.received_at >= self.since)
        if self.until:
            stmt = stmt.where(Ticket.received_at < self.until)
        return stmt


def compute(session: Session, window: Window) -> dict[str, Any]:
    in_window = window.tickets().scalar_subquery()
    total = int(session.scalar(select(func.count()).where(Ticket.id.in_(in_window))) or 0)
    current = Classification.id == Ticket.current_classification_id

    def grouped(column: _Grouping, *, join_label: bool = False) -> dict[str, int]:
        stmt = select(column, func.count()).select_from(Ticket).where(Ticket.id.in_(in_window))
        if join_label:
            stmt = stmt.join(Classification, current)
        rows = session.execute(stmt.group_by(column).order_by(func.count().desc())).all()
        return {str(key) if key is not None else "-": int(n) for key, n in rows}

    by_state = grouped(Ticket.state)
    return {
        "window": {
            "since": window.since.isoformat() if window.since else None,
            "until": window.until.isoformat() if window.until else None,
        },
        "tickets": total,
        "by_state": by_state,
        "by_intent": grouped(Classification.intent, join_label=True),
        "by_department": grouped(Ticket.department),
        "by_language": grouped(Classification.language, join_label=True),
        "latency": _latency(session, in_window),
        "usage": _usage(session, in_window, total),
        "rates": _rates(session, in_window, total, by_state),
        "reprocessing": _reprocessing(session, in_window),
    }


def _latency(session: Session, in_window: ScalarSelect[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = session.execute(
        select(Attempt.stage, Attempt.latency_ms).where(
            Attempt.ticket_id.in_(in_window),
            Attempt.latency_ms.is_not(None),
            Attempt.outcome == "ok",
        )
    ).all()
    stages: dict[str, list[float]] = {}
    for stage, latency in rows:
        stages.setdefault(stage, []).append(float(latency or 0.0))
    # The model call alone, from the labels (reused labels and batch results have none).
    stages["model_call"] = [
        float(v)
        for v in session.scalars(
            select(Classification.latency_ms).where(
                Classification.ticket_id.in_(in_window),
                Classification.reused_from_id.is_(None),
                Classification.backend != BATCH_BACKEND,
                Classification.latency_ms > 0,
            )
        )
    ]
    # Received to first dispatch: what a customer waits for triage.
    first_dispatch = (
        select(Dispatch.ticket_id, func.min(Dispatch.created_at).label("at"))
        .where(Dispatch.ticket_id.in_(in_window), Dispatch.generation == 0)
        .group_by(Dispatch.ticket_id)
        .subquery()
    )
    stages["received_to_dispatch"] = [
        (dispatched - received).total_seconds() * 1000
        for received, dispatched in session.execute(
            select(Ticket.received_at, first_dispatch.c.at).join(
                first_dispatch, first_dispatch.c.ticket_id == Ticket.id
            )
        ).all()
    ]
    for stage, values in sorted(stages.items()):
        out[stage] = latency_summary(values)
    return out


_USAGE: TypeAdapter[Usage] = TypeAdapter(Usage)


def _reused_first_answers(session: Session, in_window: ScalarSelect[int]) -> tuple[int, Usage]:
    """The calls and usage of the first answers that labels reused from failed attempts
    (`Classification.first_answer_attempt_id`): few rows, one per escalation retried."""
    answers = session.scalars(
        select(Attempt.answer)
        .join(Classification, Classification.first_answer_attempt_id == Attempt.id)
        .where(Classification.ticket_id.in_(in_window))
    )
    calls, usage = 0, Usage()
    for answer in answers:
        if answer is None:
            continue
        calls += int(answer["result"]["calls"])
        usage += _USAGE.validate_python(answer["result"]["usage"])
    return calls, usage


def _usage(session: Session, in_window: ScalarSelect[int], total: int) -> dict[str, Any]:
    row = session.execute(
        select(
            func.count(Classification.id),
            func.coalesce(func.sum(Classification.input_tokens), 0),
            func.coalesce(func.sum(Classification.output_tokens), 0),
            func.coalesce(func.sum(Classification.cache_read_tokens), 0),
            func.coalesce(func.sum(Classification.cost_usd), 0),
            func.coalesce(func.sum(Classification.calls), 0),
        ).where(Classification.ticket_id.in_(in_window))
    ).one()
    labels, tokens_in, tokens_out, cache_read, cost, calls = row
    # Attempts no label was kept from: answers refused, cut off, invalid or superseded, which
    # were paid for (their tokens and cost are on the attempt), and requests that failed (429,
    # 5xx, timeouts: calls made, not billed). A kept label's usage is on its row, counted above.
    unused = session.execute(
        select(
            func.coalesce(func.sum(Attempt.api_calls), 0),
            func.coalesce(func.sum(Attempt.input_tokens), 0),
            func.coalesce(func.sum(Attempt.output_tokens), 0),
            func.coalesce(func.sum(Attempt.cache_read_tokens), 0),
            func.coalesce(func.sum(Attempt.cost_usd), 0),
        ).where(
            Attempt.ticket_id.in_(in_window),
            Attempt.stage == "classify",
            Attempt.outcome.not_in(KEPT_OUTCOMES),
        )
    ).one()
    unused_calls, unused_in, unused_out, unused_cache, unused_cost = unused
    # A first answer that a failed attempt paid for and a retry's label reused is on both
    # rows (the attempt's calls, the label's total): counted once, with the label.
    first_calls, first = _reused_first_answers(session, in_window)
    unused_calls = int(unused_calls) - first_calls
    unused_in = int(unused_in) - first.input_tokens
    unused_out = int(unused_out) - first.output_tokens
    unused_cache = int(unused_cache) - first.cache_read_tokens
    unused_cost = Decimal(str(unused_cost)) - first.cost_usd
    calls, tokens_in = int(calls) + int(unused_calls), int(tokens_in) + int(unused_in)
    tokens_out, cache_read = int(tokens_out) + int(unused_out), int(cache_read) + int(unused_cache)
    cost = Decimal(str(cost)) + unused_cost
    per = Decimal(1000) / total if total else Decimal(0)
    return {
        "labels": int(labels),
        "api_calls": int(calls),
        "input_tokens": int(tokens_in),
        "output_tokens": int(tokens_out),
        "cache_read_tokens": int(cache_read),
        "cost_usd": str(cost.quantize(Decimal("0.000001"))),
        "without_label": {
            "api_calls": int(unused_calls),
            "cost_usd": str(unused_cost.quantize(Decimal("0.000001"))),
        },
        "per_1000_tickets": {
            "input_tokens": round(int(tokens_in) * float(per)),
            "output_tokens": round(int(tokens_out) * float(per)),
            "cost_usd": str((cost * per).quantize(Decimal("0.0001"))),
        },
    }


def _rates(
    session: Session, in_window: ScalarSelect[int], total: int, by_state: dict[str, int]
) -> dict[str, Any]:
    ever_dead = int(
        session.scalar(
            select(func.count(distinct(DeadLetter.ticket_id))).where(
                DeadLetter.ticket_id.in_(in_window)
            )
        )
        or 0
    )

    def rate(n: int) -> float | None:
        return round(n / total, 4) if total else None

    dead_now = by_state.get(TicketState.DEAD_LETTERED.value, 0)
    review = by_state.get(TicketState.NEEDS_REVIEW.value, 0)
    return {
        "dead_lettered_now": dead_now,
        "dead_letter_rate": rate(dead_now),
        "ever_dead_lettered": ever_dead,
        "ever_dead_letter_rate": rate(ever_dead),
        "needs_review": review,
        "review_rate": rate(review),
    }


def _reprocessing(session: Session, in_window: ScalarSelect[int]) -> dict[str, Any]:
    rows = session.execute(
        select(ReprocessItem.label_changed, func.count())
        .where(
            ReprocessItem.ticket_id.in_(in_window),
            ReprocessItem.done_at.is_not(None),
            ReprocessItem.label_changed.is_not(None),
        )
        .group_by(ReprocessItem.label_changed)
    ).all()
    counts = {bool(changed): int(n) for changed, n in rows}
    relabelled = sum(counts.values())
    changed = counts.get(True, 0)
    return {
        "relabelled": relabelled,
        "labels_changed": changed,
        "change_rate": round(changed / relabelled, 4) if relabelled else None,
    }

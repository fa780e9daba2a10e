"""What the backend is asked for a claimed ticket: its text, cut and redacted
(`build_request`); another ticket's label to reuse instead of a call (`reusable_labels`); and
a first answer an earlier attempt paid for.

Answers the database could not take go back on the broker with the task's retry
(classify_labels.AnswersNotRecorded). A cascade's first answer whose escalation failed
transiently is kept in the database instead, on the failed attempt's row (the database is up
then): the retry finds it there however it comes back (outbox, sweeper, another worker after
this one died) and pays only for the escalation (`first_answer_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import RowMapping, Select, bindparam, func, select, true
from sqlalchemy.orm import Session

from triage.classify.backends.base import (
    ClassificationRequest,
    ClassificationResult,
    FirstAnswer,
    Usage,
)
from triage.classify.redact import Redactor
from triage.classify.schema import TicketLabel, validate_label
from triage.db.models import Attempt, Classification, Ticket, utcnow
from triage.db.session import among, not_among
from triage.pipeline.runtime import Runtime

log = logging.getLogger(__name__)


RESULT_ADAPTER: TypeAdapter[ClassificationResult] = TypeAdapter(ClassificationResult)


class TicketText(Protocol):
    """What a classification request is built from: a Ticket, or a row of its columns."""

    @property
    def id(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def clean_text(self) -> str: ...
    @property
    def channel(self) -> str | None: ...
    @property
    def requester_name(self) -> str | None: ...
    @property
    def requester_email(self) -> str | None: ...


# How far past the cut the redactor reads, so that nothing personal is cut in half.
CUT_SLACK = 200


def build_request(rt: Runtime, ticket: TicketText) -> ClassificationRequest:
    """What the backend may see of a ticket: cleaned text, at most `max_ticket_chars` of it,
    personal data redacted."""
    limit = rt.settings.max_ticket_chars
    subject, body = ticket.subject, ticket.clean_text or ticket.body
    whole = len(body)
    # Redacting a megabyte costs more than the call, so cut first, reading CUT_SLACK past
    # the cut: an email or phone number across it is whole when the redactor sees it. Only
    # what the slack cut could have split is dropped, from the end, after redaction.
    if whole > limit:
        body = body[: limit + CUT_SLACK]
    if rt.settings.redact_personal_data:
        redactor = Redactor(
            names=[n for n in (ticket.requester_name,) if n],
            emails=[e for e in (ticket.requester_email,) if e],
        )
        subject, body = redactor(subject), redactor(body)
    if whole > limit:
        sliced = whole > limit + CUT_SLACK
        body = body[: min(limit, len(body) - CUT_SLACK) if sliced else limit]
        body += f"\n[... about {whole - limit} more characters of this ticket are not shown]"
    return ClassificationRequest(
        ticket_id=ticket.id, subject=subject, body=body, channel=ticket.channel
    )


def stored_first_answers(
    session: Session, tickets: Sequence[Any]
) -> dict[int, list[tuple[int, Any]]]:
    """For each ticket on a retry, the first answers (`Attempt.answer`) its earlier attempts
    stored, oldest first, as stored: each is read for its own ticket (`first_answer_for`)."""
    retried = sorted(t.id for t in tickets if t.attempts > 1)
    if not retried:
        return {}
    rows = session.execute(
        select(Attempt.id, Attempt.ticket_id, Attempt.answer)
        .where(
            Attempt.ticket_id.in_(retried),
            Attempt.stage == "classify",
            Attempt.answer.is_not(None),
        )
        .order_by(Attempt.id)
    ).all()
    stored: dict[int, list[tuple[int, Any]]] = {}
    for row in rows:
        stored.setdefault(row.ticket_id, []).append((row.id, row.answer))
    return stored


def first_answer_for(rt: Runtime, ticket: Any, stored: list[tuple[int, Any]]) -> FirstAnswer | None:
    """The newest first answer an earlier attempt of this ticket's generation paid for, for
    the cascade to reuse. Another generation's is never reused: re-triaged text, a reprocess
    and a replayed dead letter all ask afresh. An answer the taxonomy no longer accepts (its
    intent was dropped, say) is asked again."""
    newest = [
        (attempt_id, answer["result"])
        for attempt_id, answer in stored
        if answer.get("generation") == ticket.generation
    ]
    if not newest:
        return None
    attempt_id, data = newest[-1]
    try:
        result = RESULT_ADAPTER.validate_python(data)
        validate_label(rt.config.taxonomy, result.label.model_dump())
    except ValidationError as exc:
        log.warning(
            "classify: ticket %s: the first answer of attempt row %s no longer validates "
            "(%s); asking again",
            ticket.id,
            attempt_id,
            # The field, not the message: a value error's message quotes the stored answer.
            ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else "(root)",
        )
        return None
    return FirstAnswer(attempt_id, result)


def with_first_answer(
    request: ClassificationRequest, first: FirstAnswer | None
) -> ClassificationRequest:
    # Most tickets are on their first attempt: no copy for them.
    return request if first is None else replace(request, first_answer=first)


def first_answer_record(generation: int, result: ClassificationResult) -> dict[str, Any]:
    """What `Attempt.answer` holds: a paid first answer and the generation it answered."""
    return {"generation": generation, "result": RESULT_ADAPTER.dump_python(result, mode="json")}


def reusable_labels(
    rt: Runtime, session: Session, tickets: Sequence[Any]
) -> dict[int, Classification]:
    """For each ticket, the newest first-hand label of another ticket with the same text,
    within the reuse window, from this taxonomy, backend and its configured models."""
    window = rt.settings.reuse_window_hours
    if window <= 0 or not tickets:
        return {}
    connection = session.connection()
    rows = connection.execute(
        _reusable(connection.dialect.name),
        {
            "hashes": sorted({t.content_hash for t in tickets}),
            "ids": [t.id for t in tickets],
            "taxonomy": rt.config.taxonomy.version,
            "backend": rt.backend.name,
            "models": sorted(rt.backend.models),
            "since": utcnow() - timedelta(hours=window),
        },
    ).mappings()
    by_hash = {row["content_hash"]: _stored_label(row) for row in rows}
    return {t.id: by_hash[t.content_hash] for t in tickets if t.content_hash in by_hash}


_LABEL_COLUMNS = tuple(column.name for column in Classification.__table__.columns)


def _stored_label(row: RowMapping) -> Classification:
    """A stored label read as plain columns, detached from any session (it is only read).
    Not loaded by the ORM: mapping its entity onto the LATERAL subquery below (`aliased`)
    failed in one worker process of four in `make bench`, NoSuchColumnError on every lookup,
    which a single thread or a test never reproduced."""
    return Classification(**{name: row[name] for name in _LABEL_COLUMNS})


@lru_cache(maxsize=2)
def _reusable(dialect: str) -> Select[Any]:
    """Built once per dialect (every value is a parameter). Driven from the tickets with these
    hashes (their index), each one's newest label found through the classifications' ticket
    index (a correlated subquery, which SQLite runs too). A join that left the order to the
    planner scanned every label in the window for each claim on PostgreSQL, whose statistics
    lag a fast-growing table: 7.7 ms against 0.1 ms at 4,000 labels."""
    newest_label = (
        select(Classification.id)
        .where(
            Classification.ticket_id == Ticket.id,
            Classification.taxonomy_version == bindparam("taxonomy"),
            Classification.backend == bindparam("backend"),
            among(Classification.model, "models", dialect),
            Classification.reused_from_id.is_(None),
            Classification.created_at >= bindparam("since"),
        )
        .order_by(Classification.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    newest_per_hash = (
        select(func.max(newest_label).label("id"), Ticket.content_hash)
        .where(
            among(Ticket.content_hash, "hashes", dialect),
            not_among(Ticket.id, "ids", dialect),
        )
        .group_by(Ticket.content_hash)
        .subquery("per_hash")
    )
    labels = Classification.__table__
    if dialect != "postgresql":
        return select(labels, newest_per_hash.c.content_hash).join(
            newest_per_hash, labels.c.id == newest_per_hash.c.id
        )
    # Each label by its id, one primary-key lookup per hash found: a LATERAL subquery with a
    # LIMIT is never flattened into a join. As a join, a planner without statistics hashed
    # the whole classifications table to match the hashes found, which are usually none:
    # 5.4 ms for five tickets at 5,400 labels, and 5-12 ms in one lookup in five in
    # `make bench` (a database never analysed, as on a server without autovacuum).
    label = select(labels).where(labels.c.id == newest_per_hash.c.id).limit(1).lateral("label")
    return (
        select(label, newest_per_hash.c.content_hash)
        .select_from(newest_per_hash)
        .join(label, true())
    )


def reused_result(source: Classification) -> ClassificationResult:
    return ClassificationResult(
        label=TicketLabel(**source.label_fields()),
        backend=source.backend,
        model=source.model,
        prompt_version=source.prompt_version,
        latency_ms=0.0,
        usage=Usage(),
        calls=0,
        reused_from_id=source.id,
    )

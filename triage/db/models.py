"""SQLAlchemy 2 typed mappings. The database is the source of truth; the broker is transport.

Idempotency lives here as constraints: a ticket is unique per (source, external_id), a dispatch
per (ticket, route, generation), so at-least-once delivery has exactly-once effects.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")
# Row ids are PostgreSQL bigints: a number outside this range names no row, and sending it
# would only get "bigint out of range" back from the database.
MAX_ROW_ID = 2**63 - 1


def is_row_id(number: int) -> bool:
    """Whether `number` could be the id of a row (ticket, dead letter, run) at all."""
    return 1 <= number <= MAX_ROW_ID


def utcnow() -> datetime:
    return datetime.now(UTC)


class TicketState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    CLASSIFYING = "classifying"
    CLASSIFIED = "classified"
    ROUTED = "routed"
    NEEDS_REVIEW = "needs_review"
    DEAD_LETTERED = "dead_lettered"


TERMINAL_STATES = frozenset(
    {TicketState.ROUTED, TicketState.NEEDS_REVIEW, TicketState.DEAD_LETTERED}
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every database. SQLite has no time zones and would hand back
    naive values that cannot be compared with aware ones; this stores UTC and restores it."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; triage stores aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
    }


class Ticket(Base):
    __tablename__ = "tickets"
    __table_args__ = (
        UniqueConstraint("source", "external_id", name="uq_tickets_source_external_id"),
        Index("ix_tickets_state_changed", "state", "state_changed_at"),
        Index("ix_tickets_content_hash", "content_hash"),
        # Time windows: `triage stats --since`, reprocess and backfill selections.
        Index("ix_tickets_received", "received_at"),
        # `triage tickets erase --email` matches addresses case-insensitively (db.erasure):
        # without this each request read the whole table (128 ms at 200,000 tickets).
        Index("ix_tickets_requester_email", func.lower(text("requester_email"))),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(Text, default="")
    # The body exactly as the helpdesk sent it; `clean_text` is what classification sees.
    body: Mapped[str] = mapped_column(Text, default="")
    clean_text: Mapped[str] = mapped_column(Text, default="")
    content_hash: Mapped[str] = mapped_column(String(64))
    requester_email: Mapped[str | None] = mapped_column(String(320))
    requester_name: Mapped[str | None] = mapped_column(String(255))
    channel: Mapped[str | None] = mapped_column(String(32))
    external_created_at: Mapped[datetime | None]
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)

    state: Mapped[str] = mapped_column(String(16), default=TicketState.RECEIVED)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Classification attempts started, across retries and redeliveries.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by reprocessing; dispatches are unique per generation.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    # When the current generation began (new text, a reprocess, a replayed dead letter); None
    # for the first, which began at `received_at`. The classify stage's age bound counts from
    # here: a ticket received weeks ago and classified again today is fresh work.
    generation_started_at: Mapped[datetime | None]
    department: Mapped[str | None] = mapped_column(String(64))
    review_reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The label routing used. No foreign key: tickets and classifications reference each other,
    # and a cycle would need ALTER TABLE on SQLite.
    current_classification_id: Mapped[int | None] = mapped_column(BigInteger)
    # Set when the ticket's personal data was erased (db.erasure): its text is gone, so it is
    # never classified again.
    erased_at: Mapped[datetime | None]

    classifications: Mapped[list[Classification]] = relationship(
        back_populates="ticket", order_by="Classification.id"
    )


class Classification(Base):
    """One row per label produced; reprocessing adds rows and never overwrites history."""

    __tablename__ = "classifications"
    __table_args__ = (Index("ix_classifications_ticket", "ticket_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    intent: Mapped[str] = mapped_column(String(64))
    department: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    language: Mapped[str] = mapped_column(String(8))
    sentiment: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float]
    summary: Mapped[str] = mapped_column(Text)

    backend: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(64))
    taxonomy_version: Mapped[str] = mapped_column(String(32))
    prompt_version: Mapped[str] = mapped_column(String(32))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(12, 6), default=Decimal("0"))
    latency_ms: Mapped[float] = mapped_column(default=0.0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    calls: Mapped[int] = mapped_column(Integer, default=1)
    request_id: Mapped[str | None] = mapped_column(String(128))
    # Set when the label was reused from an identical ticket instead of a new paid call.
    reused_from_id: Mapped[int | None] = mapped_column(ForeignKey("classifications.id"))
    # Set when the label was built on a cascade's first answer that an earlier, failed attempt
    # paid for (its `Attempt.answer`): that attempt's row counts those calls, and this row's
    # calls and usage include them, as the label's total. No foreign key: attempts are a log,
    # and the column is added without rewriting the table on SQLite.
    first_answer_attempt_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    ticket: Mapped[Ticket] = relationship(back_populates="classifications")

    def label_fields(self) -> dict[str, Any]:
        """The label itself, as the API, sinks and CLI show it."""
        return {
            "intent": self.intent,
            "department": self.department,
            "priority": self.priority,
            "language": self.language,
            "sentiment": self.sentiment,
            "confidence": self.confidence,
            "summary": self.summary,
        }


class Dispatch(Base):
    """A ticket handed to a queue (a department's, or review). Unique per ticket, route and
    generation: a redelivered classify task finds the row and does not dispatch twice."""

    __tablename__ = "dispatches"
    __table_args__ = (
        UniqueConstraint("ticket_id", "route", "generation", name="uq_dispatches_ticket_route"),
        # The sweeper looks for undelivered dispatches every few seconds on every worker: only
        # those, a handful, are in this index. Without it each pass read the whole table (63
        # ms per query at 400,000 dispatches, and growing with the table).
        Index(
            "ix_dispatches_undelivered",
            "id",
            postgresql_where=text("delivered_at IS NULL"),
            sqlite_where=text("delivered_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    classification_id: Mapped[int | None] = mapped_column(ForeignKey("classifications.id"))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    route: Mapped[str] = mapped_column(String(96))
    department: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str | None] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The names of the sinks that accepted this dispatch in an attempt that then failed at a
    # later sink, in the order they ran: later attempts (retry, sweeper, replay) skip them, so
    # a webhook receiver is not sent the dispatch again. Written only with a failed attempt;
    # None when no attempt has failed part-way.
    sinks_done: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))


class OutboxMessage(Base):
    """A task message written in the same transaction as the state it announces, relayed to the
    broker after commit; a broker outage leaves it here until the relay succeeds."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_pending", "sent_at", "available_at"),
        # The sweeper asks, per stuck ticket or dispatch, whether a message for it is pending
        # or recent.
        Index("ix_outbox_ticket", "ticket_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(96))
    queue: Mapped[str] = mapped_column(String(96))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    countdown: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)


class DeadLetter(Base):
    """A ticket that could not complete a stage: visible, explained and replayable."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_open", "replayed_at"),
        # A ticket's letters: GET /tickets/{id}, closing them when the ticket is classified
        # again, a replay's newest-letter check. Without it each read the whole table.
        Index("ix_dead_letters_ticket", "ticket_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    error_type: Mapped[str] = mapped_column(String(96))
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    request_id: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    replayed_at: Mapped[datetime | None]


class Attempt(Base):
    """Every stage attempt, failed or not: what an operator reads in a ticket's timeline, and
    how API calls are counted against the retry policy's bound."""

    __tablename__ = "attempts"
    __table_args__ = (Index("ix_attempts_ticket", "ticket_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(16))  # ok | retry | dead | reused
    error_type: Mapped[str | None] = mapped_column(String(96))
    error: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(128))
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    # What the attempt's calls cost, an answer that was not kept too (refused, cut off,
    # invalid, or superseded by another worker's label): the spend on record is every paid
    # call, not only the labels'.
    input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(
        Numeric(12, 6), default=Decimal("0"), server_default="0"
    )
    latency_ms: Mapped[float | None]
    # A paid answer a retry may use instead of paying again: a cascade's first-model answer
    # when only its escalation failed (`{"generation": n, "result": ClassificationResult}`).
    # In the database rather than in the retry's message, so it outlives a lost message or a
    # worker that dies between attempts, and the retry finds it wherever it runs.
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class ReprocessRun(Base):
    """One `triage reprocess` or `triage backfill --batch` over a frozen selection of tickets.

    The selection is stored as items when the run starts, so a rerun after an interruption
    works through the same tickets and skips the finished ones."""

    __tablename__ = "reprocess_runs"
    __table_args__ = (Index("ix_reprocess_runs_key", "kind", "selection_key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # inline | batch
    # Hash of the filters (or ids) that chose the tickets: the same command resumes the run.
    selection_key: Mapped[str] = mapped_column(String(64))
    selection: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model: Mapped[str | None] = mapped_column(String(64))
    taxonomy_version: Mapped[str | None] = mapped_column(String(32))
    total: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | finished
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class ReprocessItem(Base):
    """One ticket of a run. `done_at` is the marker that makes a rerun skip it."""

    __tablename__ = "reprocess_items"
    __table_args__ = (
        UniqueConstraint("run_id", "ticket_id", name="uq_reprocess_items_run_ticket"),
        Index("ix_reprocess_items_batch", "batch_id"),
        # A ticket's items: its timeline, erasure, stats.
        Index("ix_reprocess_items_ticket", "ticket_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reprocess_runs.id", ondelete="CASCADE"))
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    # The ticket generation this run gave it; set when the item starts.
    generation: Mapped[int | None] = mapped_column(Integer)
    previous_classification_id: Mapped[int | None] = mapped_column(BigInteger)
    classification_id: Mapped[int | None] = mapped_column(BigInteger)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("message_batches.id"))
    custom_id: Mapped[str | None] = mapped_column(String(64))
    # routed | review | retry | dead | requeued | skipped | superseded
    outcome: Mapped[str | None] = mapped_column(String(16))
    label_changed: Mapped[bool | None]
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    done_at: Mapped[datetime | None]


class MessageBatch(Base):
    """A Message Batches API batch, persisted before it is polled so a restarted backfill
    resumes it instead of paying for a new one."""

    __tablename__ = "message_batches"
    __table_args__ = (UniqueConstraint("api_batch_id", name="uq_message_batches_api_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reprocess_runs.id", ondelete="CASCADE"))
    # Null until the API has accepted the batch.
    api_batch_id: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(64))
    # creating | submitted | ended | imported
    status: Mapped[str] = mapped_column(String(16), default="creating")
    requests: Mapped[int] = mapped_column(Integer, default=0)
    request_counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    imported_at: Mapped[datetime | None]

"""Bulk reclassification through the Message Batches API: half the price, for thousands of
tickets that are not urgent.

The order of things is what makes it survive a restart:
  1. the run freezes its selection (`reprocess_items`, shared with `triage reprocess`);
  2. each chunk becomes a `message_batches` row and its items get their custom ids, committed
     BEFORE the API is asked to create the batch; the API's batch id is committed right after;
  3. polling reads those rows, so a restarted backfill polls the batches it already paid for
     instead of creating new ones; a row still `creating` (killed between 2's two commits) is
     submitted again, which at worst pays once more for that chunk: every result is imported
     once, by its item's done marker;
  4. results become Classification rows (backend `anthropic-batch`, batch price) through the
     classify stage's `record_label` (classify_labels); errored, expired, canceled or
     unusable items go back to the normal path: the ticket is reopened and a classify message
     enqueued for the workers.

A ticket's personal data can be erased (`triage tickets erase`) at any point of this. Each
chunk's requests are built from the tickets as they are when it is sent, so one erased since
the run chose it is left out (skipped, "was erased"), not sent as empty text and paid for; one
erased after its chunk was sent gets no label from the answer and is not requeued.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
from anthropic.types import Message
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.classify.backends.anthropic import make_client, translate_api_error
from triage.classify.backends.base import ClassificationResult, Usage
from triage.classify.backends.messages import Answer, LabelRequest, answer_text, usage_of
from triage.classify.schema import validate_label
from triage.config import Settings
from triage.db.erasure import NOTHING_TO_CLASSIFY
from triage.db.models import (
    MessageBatch,
    ReprocessItem,
    ReprocessRun,
    Ticket,
    utcnow,
)
from triage.db.session import session_scope
from triage.errors import ApiKeyRejected, ConfigError, PermanentError, TransientError, detail
from triage.pipeline.classify_labels import REOPENABLE, record_label, reopen, unkept_answer
from triage.pipeline.classify_requests import build_request
from triage.pipeline.relay import enqueue_classify
from triage.pipeline.reprocess import label_changed
from triage.pipeline.runtime import Runtime

log = logging.getLogger(__name__)

BACKEND = "anthropic-batch"
# The API's limits per batch; chunks stay under both.
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
# A margin for the JSON around the requests.
_BYTES_BUDGET = int(MAX_BATCH_BYTES * 0.95)


def custom_id(ticket_id: int) -> str:
    return f"ticket-{ticket_id}"


@dataclass(frozen=True, slots=True)
class Progress:
    total: int
    done: int
    in_batches: int
    processed_in_batches: int
    batches_open: int


def _unsendable(ticket: Ticket | None) -> str | None:
    """Why a ticket of the run is not to be sent to the API now, or None."""
    if ticket is None:
        return "ticket deleted"
    if ticket.state not in REOPENABLE:
        return f"ticket is {ticket.state}"
    if ticket.erased_at is not None:
        return NOTHING_TO_CLASSIFY
    return None


def check_batch_settings(settings: Settings, chunk_size: int) -> None:
    """What a backfill needs before anything is recorded: the Anthropic backend with a key,
    and batches the API accepts."""
    if settings.effective_backend() == "local" or settings.anthropic_api_key is None:
        raise ConfigError("backfill --batch needs ANTHROPIC_API_KEY and an Anthropic backend")
    if not 1 <= chunk_size <= MAX_BATCH_REQUESTS:
        raise ConfigError(f"--chunk-size must be between 1 and {MAX_BATCH_REQUESTS}")


class BatchBackfill:
    def __init__(
        self,
        rt: Runtime,
        run_id: int,
        *,
        chunk_size: int = 1000,
        client: anthropic.Anthropic | None = None,
    ) -> None:
        settings = rt.settings
        check_batch_settings(settings, chunk_size)
        assert settings.anthropic_api_key is not None
        self.rt = rt
        self.run_id = run_id
        self.chunk_size = chunk_size
        self.model = settings.model
        self.spec = rt.config.models.spec(self.model)
        self.request = LabelRequest(
            taxonomy=rt.config.taxonomy,
            model=self.model,
            spec=self.spec,
            max_tokens=settings.max_tokens,
        )
        self.client = client or make_client(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url,
            timeout=max(60.0, settings.api_timeout_seconds),
        )

    # -- submitting --------------------------------------------------------------------------
    def submit(self) -> int:
        """Create batches for every item not in one yet (and resubmit any row the API never
        confirmed). Returns how many batches were created now."""
        created = 0
        for row_id in self._unconfirmed():
            created += self._create(row_id)
        while (chunk_id := self._next_chunk()) is not None:
            created += self._create(chunk_id)
        return created

    def _unconfirmed(self) -> list[int]:
        with self.rt.sessions() as session:
            return list(
                session.scalars(
                    select(MessageBatch.id).where(
                        MessageBatch.run_id == self.run_id, MessageBatch.status == "creating"
                    )
                )
            )

    def _next_chunk(self) -> int | None:
        """Persist the next chunk as a `creating` batch row with its items' custom ids."""
        with session_scope(self.rt.sessions) as session:
            items = session.scalars(
                select(ReprocessItem)
                .where(
                    ReprocessItem.run_id == self.run_id,
                    ReprocessItem.batch_id.is_(None),
                    ReprocessItem.done_at.is_(None),
                )
                .order_by(ReprocessItem.id)
                .limit(self.chunk_size)
            ).all()
            if not items:
                return None
            row = MessageBatch(run_id=self.run_id, model=self.model)
            session.add(row)
            session.flush()
            tickets = {
                t.id: t
                for t in session.scalars(
                    select(Ticket).where(Ticket.id.in_([i.ticket_id for i in items]))
                )
            }
            size = 0
            taken = 0
            for item in items:
                ticket = tickets.get(item.ticket_id)
                why = _unsendable(ticket)
                if why is not None:
                    item.outcome, item.done_at, item.error = "skipped", utcnow(), why
                    continue
                assert ticket is not None
                size += len(json.dumps(self._params(ticket))) + 64
                if taken and size > _BYTES_BUDGET:
                    break  # the rest goes in the next chunk
                item.batch_id = row.id
                item.custom_id = custom_id(ticket.id)
                item.generation = ticket.generation + 1
                item.previous_classification_id = ticket.current_classification_id
                item.started_at = utcnow()
                taken += 1
            if taken == 0:
                session.delete(row)
                return self._next_chunk_after(session)
            row.requests = taken
            return row.id

    def _next_chunk_after(self, session: Session) -> int | None:
        # Every item of this chunk was skipped; commit that, then try the next chunk.
        session.commit()
        return self._next_chunk()

    def _params(self, ticket: Ticket) -> dict[str, Any]:
        return self.request.params(build_request(self.rt, ticket))

    def _create(self, row_id: int) -> int:
        """Send the chunk of batch row `row_id` to the API; 1 if a batch was created, 0 if none
        of its tickets was left to send."""
        requests = self._requests(row_id)
        if not requests:
            return 0
        try:
            batch = self.client.messages.batches.create(requests=requests)
        except anthropic.APIError as exc:
            raise translate_api_error(exc) from exc
        with session_scope(self.rt.sessions) as session:
            row = session.get(MessageBatch, row_id)
            assert row is not None
            row.api_batch_id = batch.id
            row.status = "submitted"
            row.submitted_at = utcnow()
        log.info("batch %s created with %d requests", batch.id, len(requests))
        return 1

    def _requests(self, row_id: int) -> list[Any]:
        """The chunk's requests, built from its tickets as they are now (the chunk may have
        been planned by an earlier invocation that then failed): a ticket erased or moved on
        since is taken out of the chunk and its item marked skipped, so its text is not sent.
        A chunk left with no request is deleted. Committed before the API is asked."""
        with session_scope(self.rt.sessions) as session:
            items = session.scalars(
                select(ReprocessItem)
                .where(ReprocessItem.batch_id == row_id, ReprocessItem.done_at.is_(None))
                .order_by(ReprocessItem.id)
            ).all()
            # The state, the erasure mark and the text, in the one query.
            tickets = {
                t.id: t
                for t in session.scalars(
                    select(Ticket).where(Ticket.id.in_([i.ticket_id for i in items]))
                )
            }
            requests: list[Any] = []
            for item in items:
                ticket = tickets.get(item.ticket_id)
                why = _unsendable(ticket)
                if why is not None:
                    item.outcome, item.done_at, item.error = "skipped", utcnow(), why
                    item.batch_id = item.custom_id = None
                    continue
                assert ticket is not None
                requests.append({"custom_id": item.custom_id, "params": self._params(ticket)})
            row = session.get(MessageBatch, row_id)
            assert row is not None
            if requests:
                row.requests = len(requests)
            else:
                session.flush()  # the items let go of the row before it goes
                session.delete(row)
            return requests

    # -- polling and importing ---------------------------------------------------------------
    def poll_until_done(
        self, *, interval: float, on_progress: Callable[[Progress], None] | None = None
    ) -> Progress:
        while True:
            self.poll_once()
            progress = self.progress()
            if on_progress is not None:
                on_progress(progress)
            if progress.batches_open == 0:
                return progress
            time.sleep(interval)

    def poll_once(self) -> None:
        with self.rt.sessions() as session:
            rows = session.scalars(
                select(MessageBatch).where(
                    MessageBatch.run_id == self.run_id,
                    MessageBatch.status.in_(("submitted", "ended")),
                )
            ).all()
        for row in rows:
            if row.status == "submitted" and not self._refresh(row):
                continue
            self.import_results(row.id)

    def _refresh(self, row: MessageBatch) -> bool:
        """Update the row's counts; True once the batch has ended."""
        assert row.api_batch_id is not None
        try:
            batch = self.client.messages.batches.retrieve(row.api_batch_id)
        except anthropic.APIError as exc:
            error = translate_api_error(exc)
            # A rejected key is transient for the workers (they wait for it to be fixed);
            # here an operator waits at the terminal and is told now instead.
            if isinstance(error, TransientError) and not isinstance(error, ApiKeyRejected):
                log.warning("batch %s: %s; will poll again", row.api_batch_id, error)
                return False
            raise error from exc
        ended = batch.processing_status == "ended"
        with session_scope(self.rt.sessions) as session:
            fresh = session.get(MessageBatch, row.id)
            assert fresh is not None
            fresh.request_counts = batch.request_counts.model_dump()
            if ended:
                fresh.status = "ended"
                fresh.ended_at = utcnow()
        return ended

    def import_results(self, row_id: int) -> None:
        with self.rt.sessions() as session:
            row = session.get(MessageBatch, row_id)
            assert row is not None and row.api_batch_id is not None
            api_id = row.api_batch_id
            items = {
                i.custom_id: i.id
                for i in session.scalars(
                    select(ReprocessItem).where(
                        ReprocessItem.batch_id == row_id, ReprocessItem.done_at.is_(None)
                    )
                )
            }
        try:
            results = self.client.messages.batches.results(api_id)
            for entry in results:
                item_id = items.pop(entry.custom_id, None)
                if item_id is None:
                    continue  # imported before a restart, or not ours
                result = entry.result
                message = result.message if result.type == "succeeded" else None
                self._import_one(item_id, message, f"batch item {result.type}")
        except anthropic.APIError as exc:
            raise translate_api_error(exc) from exc
        for item_id in items.values():
            # The results file did not mention them: treat as errored, never as lost.
            self._import_one(item_id, None, "missing from the batch results")
        with session_scope(self.rt.sessions) as session:
            row = session.get(MessageBatch, row_id)
            assert row is not None
            row.status = "imported"
            row.imported_at = utcnow()

    def _import_one(self, item_id: int, message: Message | None, why: str) -> None:
        outbox_id: int | None = None
        with session_scope(self.rt.sessions) as session:
            item = session.get(ReprocessItem, item_id)
            assert item is not None
            if item.done_at is not None:
                return
            ticket = session.get(Ticket, item.ticket_id)
            answer: Answer | None = None
            usage = Usage()
            if message is not None:
                try:
                    answer = Answer.of(message)
                except ValidationError as exc:
                    why = f"unreadable batch answer: {exc}"
                else:
                    usage = usage_of(answer, self.spec, message.model or self.model, batch=True)
            if ticket is not None and ticket.erased_at is not None:
                # Erased after its chunk was sent: nothing to label or classify again. The
                # answer was billed all the same: on record as one whose label was not kept.
                item.outcome, item.done_at, item.error = "skipped", utcnow(), NOTHING_TO_CLASSIFY
                if message is not None:
                    session.add(
                        unkept_answer(
                            ticket.id, message.id, usage, "superseded", why=NOTHING_TO_CLASSIFY
                        )
                    )
                return
            expected = (item.generation or 1) - 1
            if ticket is None or ticket.generation != expected or ticket.state not in REOPENABLE:
                item.outcome, item.done_at = "superseded", utcnow()
                item.error = "the ticket changed while the batch ran; its newer label stands"
                if ticket is not None and message is not None:
                    session.add(unkept_answer(ticket.id, message.id, usage, "superseded"))
                return
            label: ClassificationResult | None = None
            if message is not None and answer is not None:
                try:
                    label = self._label(ticket.id, message, answer, usage)
                except (ValidationError, PermanentError) as exc:
                    why = f"unusable batch answer: {detail(exc)}"
                    # Billed all the same: on record as an attempt whose answer was not kept.
                    session.add(
                        unkept_answer(ticket.id, message.id, usage, "unusable", error=exc, why=why)
                    )
            if label is not None:
                # None: the ticket changed meanwhile; the answer's cost is on record either way.
                recorded = record_label(self.rt, session, ticket, label)
                if recorded is None:
                    item.outcome, item.done_at = "superseded", utcnow()
                    return
                outcome, classification_id, outbox_id = recorded
                item.classification_id = classification_id
                item.outcome = outcome
                item.label_changed = label_changed(session, item)
            elif not reopen(session, ticket.id, ticket.generation):
                # Moved on (or erased) since it was read above: the workers' or nobody's now.
                item.outcome, item.done_at = "superseded", utcnow()
                item.error = "the ticket changed while the batch ran"
                return
            else:
                # The normal path: a new generation, classified by the workers in real time.
                outbox_id = enqueue_classify(session, ticket.id)
                item.outcome = "requeued"
                item.error = why[:4000]
            item.done_at = utcnow()
        if outbox_id is not None:
            self.rt.publisher.publish([outbox_id])

    def _label(
        self, ticket_id: int, message: Message, answer: Answer, usage: Usage
    ) -> ClassificationResult:
        text = answer_text(answer, ticket_id, message.id)
        return ClassificationResult(
            label=validate_label(self.rt.config.taxonomy, text),
            backend=BACKEND,
            model=message.model or self.model,
            prompt_version=self.request.prompt_version,
            # A batch has no per-request latency worth recording (it is hours of queueing).
            latency_ms=0.0,
            usage=usage,
            request_id=message.id,
            calls=1,
        )

    def progress(self) -> Progress:
        with self.rt.sessions() as session:
            run = session.get(ReprocessRun, self.run_id)
            assert run is not None
            done = session.scalar(
                select(func.count()).where(
                    ReprocessItem.run_id == self.run_id, ReprocessItem.done_at.is_not(None)
                )
            )
            open_rows = session.scalars(
                select(MessageBatch).where(
                    MessageBatch.run_id == self.run_id, MessageBatch.status != "imported"
                )
            ).all()
        processed = sum(
            sum(v for k, v in (r.request_counts or {}).items() if k != "processing")
            for r in open_rows
        )
        return Progress(
            total=run.total,
            done=int(done or 0),
            in_batches=sum(r.requests for r in open_rows),
            processed_in_batches=processed,
            batches_open=len(open_rows),
        )


def skipped_tickets(rt: Runtime, run_id: int) -> dict[int, str]:
    """The run's tickets it left out, and why: not sent (erased, deleted or moved on before
    their chunk went), or erased before their answer came back."""
    with rt.sessions() as session:
        rows = session.execute(
            select(ReprocessItem.ticket_id, ReprocessItem.error)
            .where(ReprocessItem.run_id == run_id, ReprocessItem.outcome == "skipped")
            .order_by(ReprocessItem.id)
        )
        return {ticket_id: error or "" for ticket_id, error in rows}


def open_batches(rt: Runtime, run_id: int) -> list[dict[str, Any]]:
    with rt.sessions() as session:
        rows = session.scalars(
            select(MessageBatch).where(MessageBatch.run_id == run_id).order_by(MessageBatch.id)
        ).all()
    return [
        {
            "id": r.id,
            "api_batch_id": r.api_batch_id,
            "status": r.status,
            "requests": r.requests,
            "request_counts": r.request_counts,
        }
        for r in rows
    ]

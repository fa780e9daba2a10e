"""The transactional outbox: messages are written with the state they announce and published
after commit. Publishing claims rows with one atomic UPDATE (a short lease), so the request
that wrote a row, every worker's sweeper and the API's relay loop can all try without sending
a row twice in the normal case; a crash between send and mark-sent (which a long-running
process batches, see publishing.py) sends it again after the lease, which the
idempotent tasks absorb."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Update, bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from triage.db.models import OutboxMessage, TicketState, utcnow
from triage.db.session import among, insert_rows, one_statement, session_scope
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.pipeline.states import transition_ids

log = logging.getLogger(__name__)

CLASSIFY_TASK = "triage.classify_ticket"
DELIVER_TASK = "triage.deliver"
# Tasks whose messages may carry many ids: the single-id argument a row holds, and the list
# argument a batch of such rows is sent under.
BATCH_ARGS = {
    CLASSIFY_TASK: ("ticket_id", "ticket_ids"),
    DELIVER_TASK: ("dispatch_id", "dispatch_ids"),
}
DEAD_LETTER_TASK = "triage.dead_lettered"
# How long a claimed row is left alone before another relay may try it again.
CLAIM_LEASE = timedelta(seconds=30)
# Delays up to this long ride on the broker as a Celery countdown; longer ones wait in the
# outbox (`available_at`) and are published when due. On Redis a countdown message sits
# unacked in one worker's memory until it runs: a long one would be lost with that worker
# (until the visibility timeout), would be redelivered if it outlived the visibility timeout,
# and thousands of them would fill the worker's memory during a long API outage.
MAX_BROKER_COUNTDOWN_SECONDS = 15.0


def outbox_values(
    *, ticket_id: int, task: str, queue: str, args: dict[str, Any], countdown: float = 0.0
) -> dict[str, Any]:
    """An outbox row's columns. A `countdown` longer than MAX_BROKER_COUNTDOWN_SECONDS keeps
    the row in the outbox until it is due."""
    countdown = max(0.0, countdown)
    now = utcnow()
    available_at = now
    if countdown > MAX_BROKER_COUNTDOWN_SECONDS:
        available_at = now + timedelta(seconds=countdown)
    return {
        "ticket_id": ticket_id,
        "task": task,
        "queue": queue,
        "args": args,
        "countdown": countdown,
        "created_at": now,
        "available_at": available_at,
    }


def enqueue(
    session: Session,
    *,
    ticket_id: int,
    task: str,
    queue: str,
    args: dict[str, Any],
    countdown: float = 0.0,
) -> int:
    """Add a message to the outbox in the caller's transaction; returns the row's id."""
    values = outbox_values(
        ticket_id=ticket_id, task=task, queue=queue, args=args, countdown=countdown
    )
    return _insert_one(session, values)


def enqueue_classify(session: Session, ticket_id: int, *, countdown: float = 0.0) -> int:
    """Queue classify_ticket(ticket_id) after the caller's commit; returns the row's id."""
    return _insert_one(session, classify_values(ticket_id, countdown))


def classify_values(ticket_id: int, countdown: float = 0.0) -> dict[str, Any]:
    """The outbox row (`outbox_values`) of a classify_ticket(ticket_id) message."""
    return outbox_values(
        ticket_id=ticket_id,
        task=CLASSIFY_TASK,
        queue=CLASSIFY_QUEUE,
        args={"ticket_id": ticket_id},
        countdown=countdown,
    )


def enqueue_delivery(
    session: Session, *, ticket_id: int, dispatch_id: int, route: str, countdown: float = 0.0
) -> int:
    """Queue deliver(dispatch_id) on the dispatch's route after the caller's commit; returns
    the row's id."""
    return _insert_one(session, delivery_values(ticket_id, dispatch_id, route, countdown))


def write_outbox(session: Session, rows: list[dict[str, Any]], *, claimed: bool) -> list[Pending]:
    """Add messages (`outbox_values` each) in one statement; returns them in order.

    `claimed`: the rows are claimed by this process as they are written (the lease and
    attempt a claim would set), for a writer that publishes them itself right after its
    commit (`Publisher.publish_written`). That saves the claim's own transaction on every
    publish. As with any claim, a row still unsent when its lease ends (the process died, the
    broker was down) is the relay's. Only rows due now can be claimed: later ones wait for the
    relay."""
    if claimed:
        rows = claimed_values(rows)
    ids = insert_rows(session, OutboxMessage, rows)
    return [pending_of(row_id, values) for row_id, values in zip(ids, rows, strict=True)]


def pending_of(row_id: int, values: dict[str, Any]) -> Pending:
    """The `Pending` of an outbox row written with these values (`outbox_values`)."""
    return Pending(
        id=row_id,
        ticket_id=values["ticket_id"],
        task=values["task"],
        queue=values["queue"],
        args=values["args"],
        countdown=values["countdown"],
        created_at=values["created_at"],
    )


def as_written(values: dict[str, Any], publisher: Publisher | None) -> dict[str, Any]:
    """An outbox row's values (`outbox_values`) as `publisher.write` stores them, for a
    statement that writes the row itself: claimed where the publisher claims on write,
    else unclaimed (no publish attempt yet)."""
    if publisher is not None and publisher.claims_on_write:
        return claimed_values([values])[0]
    return {**values, "publish_attempts": 0}


def claimed_values(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outbox rows (`outbox_values`) as their writer claims them (`write_outbox`)."""
    lease_until = utcnow() + CLAIM_LEASE
    for values in rows:
        if values["available_at"] > values["created_at"]:
            raise ValueError("an outbox row due later cannot be claimed as it is written")
    return [{**values, "available_at": lease_until, "publish_attempts": 1} for values in rows]


def _insert_one(session: Session, values: dict[str, Any]) -> int:
    return int(insert_rows(session, OutboxMessage, [values])[0])


def delivery_values(
    ticket_id: int, dispatch_id: int, route: str, countdown: float = 0.0
) -> dict[str, Any]:
    return outbox_values(
        ticket_id=ticket_id,
        task=DELIVER_TASK,
        queue=route,
        args={"dispatch_id": dispatch_id},
        countdown=countdown,
    )


# What Celery's own `saferepr` would cut a message's kwargs to, for its headers and logs.
KWARGS_REPR_MAX = 1024


def _kwargs_repr(kwargs: dict[str, Any]) -> str:
    """The message's kwargs as its `kwargsrepr` header shows them. Celery's default builds it
    with `saferepr`, in Python, item by item: a tenth of every `send_task` (py-spy, `make
    bench`) for a list of ids that the builtin `repr` writes at C speed."""
    text = repr(kwargs)
    return text if len(text) <= KWARGS_REPR_MAX else text[: KWARGS_REPR_MAX - 3] + "..."


class Publisher:
    """Sends claimed outbox rows to the broker (through `send`, Celery's `send_task`).

    Rows for the same batchable task and queue that are due now go out as one message of up
    to `batch_size` ids: the broker, the worker and the database then handle them together.
    `publish` claims rows by id first; rows written with `write` are claimed already and go
    out with `publish_written`.
    """

    # Rows this publisher sends right after their commit are claimed as they are written.
    claims_on_write = True

    def __init__(self, sessions: sessionmaker[Session], send: Any, batch_size: int = 1) -> None:
        self._sessions = sessions
        self._send = send
        self._batch_size = max(1, batch_size)

    def publish(self, ids: Iterable[int]) -> int:
        """Publish these rows now (after the commit that wrote them)."""
        ids = list(ids)
        if not ids:
            return 0
        return self._publish_claimed(self._claim(ids))

    def write(self, session: Session, rows: list[dict[str, Any]]) -> list[Pending]:
        """Write outbox rows that `publish_written` is to publish after the caller's commit."""
        return write_outbox(session, rows, claimed=self.claims_on_write)

    def publish_written(self, rows: Sequence[Pending]) -> int:
        """Publish rows `write` claimed, now that their transaction has committed."""
        return self._publish_claimed(rows)

    def relay_pending(self, *, older_than: float = 2.0, limit: int = 500) -> int:
        """Publish rows left behind: broker outage, crash after commit, or a lost claim."""
        cutoff = utcnow() - timedelta(seconds=older_than)
        with self._sessions() as session:
            ids = session.scalars(
                select(OutboxMessage.id)
                .where(
                    OutboxMessage.sent_at.is_(None),
                    OutboxMessage.available_at <= utcnow(),
                    OutboxMessage.created_at <= cutoff,
                )
                .order_by(OutboxMessage.id)
                .limit(limit)
            ).all()
        if not ids:
            return 0
        return self._publish_claimed(self._claim(ids))

    def _claim(self, ids: Iterable[int]) -> list[Pending]:
        now = utcnow()
        with session_scope(self._sessions) as session:
            connection = session.connection()
            rows = connection.execute(
                _claim_rows(connection.dialect.name),
                {"ids": sorted(ids), "now": now, "lease_until": now + CLAIM_LEASE},
            )
            return [Pending(*row) for row in rows]

    def _publish_claimed(self, rows: Sequence[Pending]) -> int:
        sent = self.send_claimed(rows)
        if sent:
            self.mark_sent(sent)
        return len(sent)

    def send_claimed(self, rows: Sequence[Pending]) -> list[Pending]:
        """Send claimed rows to the broker without marking them sent; returns those that went.
        Until `mark_sent` (or the claim's lease ends) nobody else sends them."""
        sent: list[Pending] = []
        # In ticket order (a claim's RETURNING has none): a batch message then lists its
        # tickets in the order every transaction locks them.
        ordered = sorted(rows, key=lambda r: (r.ticket_id, r.id))
        for group, kwargs, countdown in self._messages(ordered):
            try:
                self._send(
                    group[0].task,
                    kwargs=kwargs,
                    queue=group[0].queue,
                    countdown=countdown or None,
                    argsrepr="()",
                    kwargsrepr=_kwargs_repr(kwargs),
                )
            except Exception as exc:  # noqa: BLE001 - any broker failure leaves the rows for later
                ids = ", ".join(str(r.id) for r in group)
                log.warning("outbox %s not published (%s); will retry", ids, exc)
                continue
            sent += group
        return sent

    def _messages(
        self, rows: list[Pending]
    ) -> Iterable[tuple[list[Pending], dict[str, Any], float]]:
        """The messages that carry `rows`: one per row, except that rows due now for the same
        batchable task and queue share messages of up to `batch_size` ids."""
        batches: dict[tuple[str, str], list[Pending]] = {}
        now = utcnow()
        for row in rows:
            due = row.created_at + timedelta(seconds=row.countdown)
            countdown = max(0.0, (due - now).total_seconds())
            names = BATCH_ARGS.get(row.task)
            if countdown == 0 and names and set(row.args) == {names[0]}:
                batches.setdefault((row.task, row.queue), []).append(row)
            else:
                yield [row], row.args, countdown
        for (task, _queue), group in batches.items():
            single, plural = BATCH_ARGS[task]
            for i in range(0, len(group), self._batch_size):
                chunk = group[i : i + self._batch_size]
                if len(chunk) == 1:
                    yield chunk, chunk[0].args, 0.0
                else:
                    yield chunk, {plural: [r.args[single] for r in chunk]}, 0.0

    def mark_sent(self, rows: Sequence[Pending]) -> None:
        """Record rows as sent (and their classify tickets as queued), in one transaction."""
        params = {"ids": [r.id for r in rows], "now": utcnow()}
        classify = [row.ticket_id for row in rows if row.task == CLASSIFY_TASK]
        if not classify:
            # A worker's delivery messages: the one statement commits alone.
            with one_statement(self._sessions) as connection:
                connection.execute(_mark_sent(connection.dialect.name), params)
            return
        with session_scope(self._sessions) as session:
            connection = session.connection()
            connection.execute(_mark_sent(connection.dialect.name), params)
            transition_ids(
                session, classify, TicketState.QUEUED, only_from=frozenset({TicketState.RECEIVED})
            )


@dataclass(frozen=True, slots=True)
class Pending:
    """What publishing needs of an outbox row (not the ORM entity: loading and tracking those
    cost more than the claim)."""

    id: int
    ticket_id: int
    task: str
    queue: str
    args: dict[str, Any]
    countdown: float
    created_at: datetime


# Built once per dialect: the same statement for every batch (its ids one parameter, `among`).
@lru_cache(maxsize=2)
def _claim_rows(dialect: str) -> Update:
    return (
        update(OutboxMessage)
        .where(
            among(OutboxMessage.id, "ids", dialect),
            OutboxMessage.sent_at.is_(None),
            OutboxMessage.available_at <= bindparam("now"),
        )
        .values(
            available_at=bindparam("lease_until"),
            publish_attempts=OutboxMessage.publish_attempts + 1,
        )
        .returning(
            OutboxMessage.id,
            OutboxMessage.ticket_id,
            OutboxMessage.task,
            OutboxMessage.queue,
            OutboxMessage.args,
            OutboxMessage.countdown,
            OutboxMessage.created_at,
        )
    )


@lru_cache(maxsize=2)
def _mark_sent(dialect: str) -> Update:
    return (
        update(OutboxMessage)
        .where(among(OutboxMessage.id, "ids", dialect))
        .values(sent_at=bindparam("now"))
    )


class OutboxOnlyPublisher(Publisher):
    """For a process with no broker configured (the CLI beside `triage run`'s embedded
    Redis): messages stay in the outbox, and the running worker's sweeper or the API's relay
    publishes them."""

    claims_on_write = False

    def publish(self, ids: Iterable[int]) -> int:
        return 0

    def send_claimed(self, rows: Sequence[Pending]) -> list[Pending]:
        return []

    def relay_pending(self, *, older_than: float = 2.0, limit: int = 500) -> int:
        return 0

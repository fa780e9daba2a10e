"""A wave of answers recorded in one statement on PostgreSQL.

`classify_labels.store_labels` records a wave in a transaction of seven round trips: BEGIN,
the labels, the tickets' move, the attempt rows, the dispatches, their outbox rows, COMMIT.
Waves are small wherever answers do not come back together (real model latency spreads over
seconds, so most waves are one ticket), and each round trip costs a busy worker a wait for
the GIL as well as the server's work (see `db.session.one_statement`). Here the same rows go
in one statement over data-modifying CTEs, in autocommit:

  input       the wave as one JSON parameter (`json_to_recordset`), each row with a label id
              drawn from the classifications' sequence up front
  moved       the tickets still in the claim each answer was for, locked in id order and
              moved to routed or needs_review, pointing at the new label
  labels      a label for each ticket that moved (the others' answers are superseded: no
              label, as `store_labels` deletes theirs)
  attempts    an attempt row for every answer, `superseded` where the ticket did not move
  dispatched  a dispatch for each ticket that moved, and its delivery message in the outbox

Foreign keys are checked at the end of the statement, so a ticket may point at the label
inserted beside it. The tickets are found by id, through the primary key: the state is
checked as `(state || '')`, which no index serves (see `states.state_among`), and the ids to
lock are one array (`ANY(ARRAY(...))`), which the planner looks up in the index however few
statistics it has; as a join with `input` it read the whole table while the table was small.
`store_labels` stays the path on SQLite (no data-modifying CTEs) and for callers that record
a label inside a transaction of their own (reprocessing, Message Batches).
tests/integration/test_label_statement.py holds the rows of the two paths equal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Table, TextClause, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from triage.db.models import Attempt, Classification, Dispatch, OutboxMessage, Ticket, TicketState

# Per answer: (name in the JSON row, the column it goes to, for its SQL type).
_TICKET_FIELDS = (
    ("ticket_id", Ticket.__table__.c.id),
    ("generation", Ticket.__table__.c.generation),
    ("claim_attempts", Ticket.__table__.c.attempts),
    ("to_state", Ticket.__table__.c.state),
    ("department", Ticket.__table__.c.department),
    ("review_reason", Ticket.__table__.c.review_reason),
    ("route", Dispatch.__table__.c.route),
    ("rule", Dispatch.__table__.c.rule),
)
_ATTEMPT_COLUMNS = (
    "outcome",
    "request_id",
    "api_calls",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
)
# The message columns every delivery message of a wave shares (its args name its dispatch).
_MESSAGE_COLUMNS = ("task", "countdown", "created_at", "available_at", "publish_attempts")


def record_wave(
    connection: Connection,
    labels: Sequence[dict[str, Any]],
    moves: Sequence[dict[str, Any]],
    attempts: Sequence[dict[str, Any]],
    message: dict[str, Any],
    now: datetime,
) -> dict[int, tuple[int, int, int]]:
    """Record a wave: for each answer (in ticket order) its label's columns
    (`classify_labels._classification_values`), its ticket's move (the `_TICKET_FIELDS`), its
    attempt row's columns (`_ATTEMPT_COLUMNS`, with the outcome it has if its ticket moves);
    `message` the columns the delivery messages share. Returns, for each ticket that moved,
    its label id, dispatch id and outbox id; a ticket missing from it was superseded."""
    label_columns = tuple(name for name in labels[0] if name not in ("ticket_id", "generation"))
    rows = [
        {
            **move,
            **{f"c_{name}": label[name] for name in label_columns},
            **{f"a_{name}": attempt[name] for name in _ATTEMPT_COLUMNS},
        }
        for label, move, attempt in zip(labels, moves, attempts, strict=True)
    ]
    params = {
        "rows": json.dumps(rows, default=_json_value),
        "now": now,
        "classifying": TicketState.CLASSIFYING.value,
        **{f"m_{name}": message[name] for name in _MESSAGE_COLUMNS},
    }
    result = connection.execute(_statement(label_columns), params)
    return {row.ticket_id: (row.label_id, row.dispatch_id, row.outbox_id) for row in result}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} in a wave's row")


_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]


def _sql_type(column: ColumnElement[Any]) -> str:
    return str(column.type.compile(dialect=_POSTGRESQL))


@lru_cache(maxsize=4)
def _statement(label_columns: tuple[str, ...]) -> TextClause:
    """The statement for labels with these columns (built once; the rows are a parameter)."""
    labels = Classification.__table__
    attempts = Attempt.__table__
    assert isinstance(labels, Table) and isinstance(attempts, Table)
    fields = [f"{name} {_sql_type(column)}" for name, column in _TICKET_FIELDS]
    fields += [f"c_{name} {_sql_type(labels.c[name])}" for name in label_columns]
    fields += [f"a_{name} {_sql_type(attempts.c[name])}" for name in _ATTEMPT_COLUMNS]
    outbox = OutboxMessage.__tablename__
    sql = f"""
WITH input AS MATERIALIZED (
    SELECT x.*, nextval(pg_get_serial_sequence('{labels.name}', 'id')) AS label_id
    FROM json_to_recordset(CAST(:rows AS json)) AS x({", ".join(fields)})
    ORDER BY x.ticket_id
),
moved AS (
    UPDATE {Ticket.__tablename__} AS t
    SET state = input.to_state, state_changed_at = :now,
        current_classification_id = input.label_id, department = input.department,
        review_reason = input.review_reason, last_error = NULL
    FROM input
    WHERE t.id = input.ticket_id
      AND (t.state || '') = :classifying
      AND t.generation = input.generation
      AND t.attempts = input.claim_attempts
      AND t.id IN (
          SELECT locked.id FROM {Ticket.__tablename__} AS locked
          WHERE locked.id = ANY(ARRAY(SELECT ticket_id FROM input))
            AND (locked.state || '') = :classifying
          ORDER BY locked.id FOR UPDATE
      )
    RETURNING t.id
),
labels AS (
    INSERT INTO {labels.name} (id, ticket_id, generation, {", ".join(label_columns)})
    SELECT label_id, ticket_id, generation, {", ".join(f"c_{n}" for n in label_columns)}
    FROM input WHERE ticket_id IN (SELECT id FROM moved)
    ORDER BY ticket_id
),
attempts AS (
    INSERT INTO {attempts.name} (ticket_id, stage, number, started_at, finished_at,
        {", ".join(_ATTEMPT_COLUMNS)})
    SELECT ticket_id, 'classify', claim_attempts, :now, :now,
        CASE WHEN ticket_id IN (SELECT id FROM moved) THEN a_outcome ELSE 'superseded' END,
        {", ".join(f"a_{n}" for n in _ATTEMPT_COLUMNS[1:])}
    FROM input
    ORDER BY ticket_id
),
dispatched AS (
    INSERT INTO {Dispatch.__tablename__} (ticket_id, classification_id, generation, route,
        department, rule, created_at, delivery_attempts)
    SELECT ticket_id, label_id, generation, route, department, rule, :now, 0
    FROM input WHERE ticket_id IN (SELECT id FROM moved)
    ORDER BY ticket_id
    RETURNING id, ticket_id, route
),
messages AS (
    INSERT INTO {outbox} (ticket_id, task, queue, args, {", ".join(_MESSAGE_COLUMNS[1:])})
    SELECT ticket_id, :m_task, route, json_build_object('dispatch_id', id),
        {", ".join(f":m_{n}" for n in _MESSAGE_COLUMNS[1:])}
    FROM dispatched
    ORDER BY id
    RETURNING id, ticket_id
)
SELECT input.ticket_id, input.label_id, dispatched.id AS dispatch_id, messages.id AS outbox_id
FROM input
JOIN dispatched ON dispatched.ticket_id = input.ticket_id
JOIN messages ON messages.ticket_id = input.ticket_id
"""  # noqa: S608 - only the models' table and column names are formatted in; values are bound
    return text(sql)

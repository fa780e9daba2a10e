"""The hot path's batch statements give the same result for one row as for many (one row takes
a plain statement, many take arrays on PostgreSQL), on PostgreSQL and on SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from tests.support.stack import empty_database
from triage.db.models import OutboxMessage, Ticket, TicketState, utcnow
from triage.db.session import get_sessionmaker, insert_rows, session_scope
from triage.pipeline.relay import classify_values
from triage.pipeline.states import IllegalTransitionError, transition_each

S = TicketState


@pytest.fixture(params=["postgresql", "sqlite"])
def sessions(request, pg_url, tmp_path):
    return get_sessionmaker(empty_database(request.param, pg_url, tmp_path), 4)


def _tickets(sessions, states: list[str]) -> list[int]:
    with session_scope(sessions) as s:
        return insert_rows(
            s,
            Ticket,
            [
                {
                    "source": "generic",
                    "external_id": f"b-{i}",
                    "subject": "s",
                    "body": "b",
                    "content_hash": f"{i}" * 64,
                    "state": state,
                    "state_changed_at": utcnow(),
                    "received_at": utcnow(),
                }
                for i, state in enumerate(states)
            ],
        )


@pytest.mark.parametrize("n", [1, 3])
def test_insert_rows_returns_each_rows_id_in_order(sessions, n):
    ids = _tickets(sessions, ["received"] * n)
    with session_scope(sessions) as s:
        outbox = insert_rows(s, OutboxMessage, [classify_values(i) for i in reversed(ids)])
        none = insert_rows(s, OutboxMessage, [classify_values(ids[0])], returning=None)
    assert len(outbox) == n and none == []
    with sessions() as s:
        stored = dict(s.execute(select(OutboxMessage.id, OutboxMessage.ticket_id)).all())
    # The i-th id returned is the row made from the i-th values, JSON args included.
    assert [stored[row_id] for row_id in outbox] == list(reversed(ids))
    with sessions() as s:
        args = s.scalars(select(OutboxMessage.args).where(OutboxMessage.id == outbox[0])).one()
    assert args == {"ticket_id": ids[-1]}


@pytest.mark.parametrize(
    "states", [["classifying"], ["routed"], ["classifying", "routed", "classifying"]]
)
def test_transition_each_moves_only_allowed_tickets_with_their_own_values(sessions, states):
    ids = _tickets(sessions, states)
    moves = {i: S.NEEDS_REVIEW if k % 2 else S.ROUTED for k, i in enumerate(ids)}
    with session_scope(sessions) as s:
        moved = transition_each(
            s,
            moves,
            only_from=frozenset({S.CLASSIFYING}),
            generations={i: 0 for i in ids},
            each={"department": {i: f"dept-{i}" for i in ids}},
            last_error=None,
        )
    movable = {i for i, state in zip(ids, states, strict=True) if state == "classifying"}
    assert moved == movable
    with sessions() as s:
        rows = {t.id: t for t in s.scalars(select(Ticket))}
    for i, state in zip(ids, states, strict=True):
        if i in movable:
            assert (rows[i].state, rows[i].department) == (moves[i].value, f"dept-{i}")
        else:
            assert (rows[i].state, rows[i].department) == (state, None)


@pytest.mark.parametrize("n", [1, 3])
def test_transition_each_moves_a_ticket_only_in_the_generation_given(sessions, n):
    # One statement per size: a single row and the batch form (arrays on PostgreSQL).
    ids = _tickets(sessions, ["classifying"] * n)
    with session_scope(sessions) as s:
        s.execute(update(Ticket).where(Ticket.id == ids[0]).values(generation=1))
    with session_scope(sessions) as s:
        moved = transition_each(
            s,
            {i: S.ROUTED for i in ids},
            only_from=frozenset({S.CLASSIFYING}),
            # What the attempts read when they claimed: generation 0 for all.
            generations={i: 0 for i in ids},
            each={},
        )
    assert moved == set(ids[1:])
    with sessions() as s:
        assert s.get(Ticket, ids[0]).state == "classifying"  # type: ignore[union-attr]


@pytest.mark.parametrize("n", [1, 3])
def test_transition_each_moves_a_ticket_only_under_the_claim_given(sessions, n):
    # Each claim counts an attempt: a ticket claimed again since (another worker took it over
    # after the lease) has a higher count than the attempt that finishes now read.
    ids = _tickets(sessions, ["classifying"] * n)
    with session_scope(sessions) as s:
        s.execute(update(Ticket).values(attempts=1))
        s.execute(update(Ticket).where(Ticket.id == ids[0]).values(attempts=2))
    with session_scope(sessions) as s:
        moved = transition_each(
            s,
            {i: S.ROUTED for i in ids},
            only_from=frozenset({S.CLASSIFYING}),
            generations={i: 0 for i in ids},
            each={},
            attempts={i: 1 for i in ids},
        )
    assert moved == set(ids[1:])
    with sessions() as s:
        assert s.get(Ticket, ids[0]).state == "classifying"  # type: ignore[union-attr]


def test_transition_each_refuses_a_move_the_state_machine_forbids(sessions):
    (ticket,) = _tickets(sessions, ["received"])
    with session_scope(sessions) as s, pytest.raises(IllegalTransitionError):
        transition_each(
            s,
            {ticket: S.ROUTED},
            only_from=frozenset({S.RECEIVED}),
            generations={ticket: 0},
            each={},
        )

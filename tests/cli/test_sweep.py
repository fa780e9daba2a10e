"""`triage sweep` against PostgreSQL and Redis."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from triage.db.models import OutboxMessage
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket

NOTHING_LISTENS = "redis://127.0.0.1:1/0"


def _unsent(rt) -> int:
    with rt.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
        )


def test_sweep_with_the_broker_down_fails_instead_of_reporting_zeros(cli, rt):
    inbound = InboundTicket(source="generic", external_id="left-behind", subject="s", body="b")
    with session_scope(rt.sessions) as session:
        accept_ticket(session, inbound)

    result = cli("sweep", "--json", code=1, REDIS_URL=NOTHING_LISTENS)

    assert "broker unreachable" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.output
    assert _unsent(rt) == 1


def test_sweep_with_the_broker_up_reports_its_pass(cli):
    assert cli.json("sweep") == {
        "relayed": 0,
        "requeued_tickets": 0,
        "requeued_deliveries": 0,
        "stranded_deliveries": 0,
        "pruned_outbox": 0,
        "dropped_dead_notices": 0,
    }


@pytest.mark.parametrize("seconds", ["0", "-600"])
def test_a_stuck_after_below_one_second_is_a_usage_error(cli, rt, seconds):
    inbound = InboundTicket(source="generic", external_id="just-in", subject="s", body="b")
    with session_scope(rt.sessions) as session:
        accept_ticket(session, inbound)

    result = cli("sweep", "--stuck-after", seconds, code=2)

    assert "--stuck-after" in result.output
    assert _unsent(rt) == 1

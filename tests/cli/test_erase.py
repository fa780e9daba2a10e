"""`triage tickets erase`: a data subject's erasure request from the operator's side."""

from __future__ import annotations

import json

from sqlalchemy import update

from tests.cli.conftest import seed_routed
from triage.db.erasure import ERASED
from triage.db.models import Classification, Ticket, TicketState
from triage.db.session import session_scope


def _requester(rt, ids: list[int], email: str, state: TicketState | None = None) -> None:
    with session_scope(rt.sessions) as s:
        values: dict[str, object] = {"requester_email": email}
        if state is not None:
            values["state"] = state.value
        s.execute(update(Ticket).where(Ticket.id.in_(ids)).values(**values))


def test_erase_by_email_after_confirmation_and_again_once_in_flight_ones_finish(cli, rt):
    jane = seed_routed(rt, ["Jane here, my card 4111 was charged twice", "Jane again, refund?"])
    busy = seed_routed(rt, ["Jane, third ticket, still being classified"])
    other = seed_routed(rt, ["Someone else entirely"])
    _requester(rt, [*jane, *busy], "Jane.Doe@Example.com")
    _requester(rt, busy, "jane.doe@example.com", TicketState.CLASSIFYING)
    _requester(rt, other, "sam@example.com")

    # Asked first; "no" erases nothing.
    refused = cli("tickets", "erase", "--email", "jane.doe@example.com", code=1, input="n\n")
    assert "3 tickets" in refused.output and "cancelled" in refused.output
    with rt.sessions() as s:
        assert all(s.get(Ticket, i).erased_at is None for i in jane)

    # The one still being classified keeps its text and makes the command exit 1.
    result = cli("tickets", "erase", "--email", "JANE.DOE@example.com", "--yes", "--json", code=1)
    report = json.loads(result.stdout)
    assert report["erased"] == jane and report["in_flight"] == busy
    assert report["already"] == [] and report["missing"] == []
    with rt.sessions() as s:
        for i in jane:
            t = s.get(Ticket, i)
            assert t.body == "" and t.requester_email is None and t.requester_name is None
            assert s.get(Classification, t.current_classification_id).summary == ERASED
        assert "third ticket" in s.get(Ticket, busy[0]).body
        assert s.get(Ticket, other[0]).requester_email == "sam@example.com"

    # Once it has an outcome, the same request finishes the job: the erased ones are
    # reported as such, and the exit is 0. The address is gone from the erased tickets, so
    # they are named by id.
    _requester(rt, busy, "jane.doe@example.com", TicketState.ROUTED)
    done = cli.json("tickets", "erase", *map(str, [*jane, *busy]), "--yes")
    assert done["erased"] == busy and done["already"] == jane

    # The timeline says what happened without showing what was erased.
    shown = cli("tickets", "show", str(jane[0]))
    assert ERASED in shown.output and "4111" not in shown.output


def test_erase_usage_errors_and_unknown_ids(cli, rt):
    assert "ids or --email" in cli("tickets", "erase", "--yes", code=2).output
    both = cli("tickets", "erase", "1", "--email", "a@example.com", "--yes", code=2)
    assert "ids or --email" in both.output
    nobody = cli.json("tickets", "erase", "--email", "nobody@example.com", "--yes")
    assert nobody == {"erased": [], "already": [], "in_flight": [], "missing": []}
    missing = cli("tickets", "erase", "424242", "--yes", code=1)
    assert "424242" in missing.output


def test_reprocess_and_backfill_leave_erased_tickets_out(cli, rt, fake):
    kept, erased = seed_routed(rt, ["Refund please [[intent:billing]]", "Jane's old ticket"])
    cli("tickets", "erase", str(erased), "--yes")

    # By filter: the erased ticket is not selected, so not priced or sent.
    assert cli.json("reprocess", "--since", "1d", "--dry-run")["tickets"] == 1
    assert cli.json("backfill", "--batch", "--since", "1d", "--dry-run")["tickets"] == 1
    # By id: named and left out, with the reason.
    result = cli("reprocess", str(kept), str(erased), "--json", "--yes")
    assert f"ticket {erased} was erased" in result.stderr
    assert json.loads(result.stdout)["done"] == 1
    assert fake.call_count() == 1
    with rt.sessions() as s:
        assert s.get(Ticket, erased).body == "" and s.get(Ticket, erased).generation == 0

"""`triage reprocess` against PostgreSQL, Redis and the fake Messages API."""

from __future__ import annotations

import json
import threading

from sqlalchemy import func, select

from tests.cli.conftest import seed_routed
from tests.fakeanthropic import Fault
from tests.support.stack import make_runtime, wait_until
from triage.db.models import Classification, ReprocessItem, Ticket


def _labels(rt, ticket_id):
    with rt.sessions() as session:
        return session.scalars(
            select(Classification)
            .where(Classification.ticket_id == ticket_id)
            .order_by(Classification.id)
        ).all()


def test_reprocess_by_filter_changes_labels_and_keeps_history(cli, rt, fake):
    changed = seed_routed(rt, [f"Where is parcel {n}? [[intent:shipping]]" for n in range(4)])
    same = seed_routed(rt, [f"Thanks {n} [[intent:other]]" for n in range(2)])
    seed_routed(rt, ["Not this one [[intent:shipping]]"], intent="billing", department="billing")

    summary = cli.json("reprocess", "--intent", "other", "--yes")

    assert summary["total"] == 6 and summary["done"] == 6
    assert summary["labels_changed"] == 4
    assert summary["outcomes"] == {"routed": 6}
    assert fake.call_count() == 6
    for ticket_id in changed:
        old, new = _labels(rt, ticket_id)
        assert (old.intent, old.summary) == ("other", "Old label.")
        assert new.intent == "shipping" and new.generation == 1
        with rt.sessions() as session:
            ticket = session.get(Ticket, ticket_id)
            assert ticket.current_classification_id == new.id
            assert ticket.department == "logistics" and ticket.state == "routed"
    for ticket_id in same:
        assert [c.intent for c in _labels(rt, ticket_id)] == ["other", "other"]


def test_dry_run_counts_and_estimates_without_calling(cli, rt, fake):
    seed_routed(rt, [f"Refund please {n}" for n in range(5)])

    estimate = cli.json("reprocess", "--since", "1d", "--dry-run")

    assert estimate["tickets"] == 5 and estimate["model"] == "claude-haiku-4-5"
    assert float(estimate["estimated_cost_usd"]) > 0
    assert estimate["estimated_input_tokens"] > 5 * 100
    assert fake.call_count() == 0


def test_stopped_reprocess_resumes_without_calling_twice(cli, rt, fake):
    ids = seed_routed(rt, [f"Charged twice {n} [[intent:billing]]" for n in range(7)])

    first = cli.json("reprocess", *map(str, ids), "--stop-after", "3", "--yes")
    assert first["done"] == 3 and fake.call_count() == 3
    second = cli.json("reprocess", *map(str, ids), "--yes")

    assert second["run_id"] == first["run_id"]
    assert second["done"] == 7 and second["labels_changed"] == 7
    assert fake.call_count() == 7
    third = cli.json("reprocess", *map(str, ids), "--yes")
    assert third["run_id"] != first["run_id"]  # a finished run is not resumed: a new one
    with rt.sessions() as session:
        counts = session.execute(
            select(Classification.ticket_id, func.count()).group_by(Classification.ticket_id)
        ).all()
    assert {n for _, n in counts} == {3}


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes_the_rest(cli, rt, fake, ctrl_c):
    ids = seed_routed(rt, [f"Cannot log in {n} [[intent:account]]" for n in range(8)])
    fake.latency = 0.15

    def interrupt_after_two_calls():
        wait_until(lambda: fake.call_count() >= 2, 30, what="two calls")
        ctrl_c()

    try:
        threading.Thread(target=interrupt_after_two_calls, daemon=True).start()
        stopped = cli("reprocess", *map(str, ids), "--yes", "-c", "1", code=1)
        assert "run the same command again" in stopped.output
        with rt.sessions() as session:
            done = session.scalar(select(func.count()).where(ReprocessItem.done_at.is_not(None)))
        assert 2 <= done < 8
        finished = cli.json("reprocess", *map(str, ids), "--yes")
    finally:
        fake.latency = 0.0
    assert finished["done"] == 8
    assert fake.call_count() == 8


def test_a_transient_failure_goes_to_the_retry_path_and_is_not_redone(cli, rt, fake):
    ids = seed_routed(rt, ["Broken [[intent:technical]] overload-me", "Fine [[intent:technical]]"])
    fake.add_fault(Fault("overloaded", match="overload-me"))

    summary = cli.json("reprocess", *map(str, ids), "--yes")

    assert summary["outcomes"] == {"retry": 1, "routed": 1}
    with rt.sessions() as session:
        assert session.get(Ticket, ids[0]).state == "queued"
    again = cli.json("reprocess", *map(str, ids), "--yes")
    assert again["run_id"] != summary["run_id"]
    # Still queued: the workers own it now, so a new selection leaves it out.
    assert again["total"] == 1 and again["outcomes"] == {"routed": 1}


def _set_state(rt, ticket_id, state):
    with rt.sessions.begin() as session:
        session.get(Ticket, ticket_id).state = state


def _runs(rt):
    from triage.db.models import ReprocessRun

    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(ReprocessRun))


def test_reprocess_of_only_unfinished_or_missing_tickets_says_why_and_records_no_run(cli, rt, fake):
    (queued,) = seed_routed(rt, ["Still being triaged"])
    _set_state(rt, queued, "queued")

    result = cli("reprocess", str(queued), "999", "--yes", code=2)

    assert f"ticket {queued} is queued, not finished" in result.output
    assert "ticket 999 not found" in result.output
    assert _runs(rt) == 0 and fake.call_count() == 0
    assert "nothing to reprocess" in cli("reprocess", "--intent", "sales", "--yes", code=2).output
    assert _runs(rt) == 0


def test_reprocess_names_the_tickets_it_skips_and_does_the_rest(cli, rt, fake):
    done, queued = seed_routed(rt, ["Refund please [[intent:billing]]", "Still being triaged"])
    _set_state(rt, queued, "queued")

    result = cli("reprocess", str(done), str(queued), "999", "--json", "--yes")

    assert f"skipping ticket {queued} is queued, not finished; ticket 999 not found" in (
        result.stderr
    )
    summary = json.loads(result.stdout)
    assert summary["total"] == 1 and summary["done"] == 1
    assert summary["skipped"] == [
        {"ticket_id": queued, "reason": "is queued, not finished"},
        {"ticket_id": 999, "reason": "not found"},
    ]
    assert fake.call_count() == 1


def test_dry_run_estimates_what_the_rerun_would_do_resuming_and_stopping(cli, rt, fake):
    seed_routed(rt, [f"Pricing {n} [[intent:billing]]" for n in range(4)], intent="billing")
    first = cli.json("reprocess", "--intent", "billing", "--stop-after", "2", "--yes")
    assert first["done"] == 2
    calls = fake.call_count()

    resumed = cli.json("reprocess", "--intent", "billing", "--dry-run")
    capped = cli.json("reprocess", "--intent", "billing", "--dry-run", "--stop-after", "1")
    text = cli("reprocess", "--intent", "billing", "--dry-run").output

    assert resumed["tickets"] == 2 and resumed["resuming_run"] == first["run_id"]
    assert capped["tickets"] == 1
    assert f"would resume run {first['run_id']} (2 of 4 already done)" in text
    assert fake.call_count() == calls
    fresh = cli.json("reprocess", "--intent", "billing", "--since", "1d", "--dry-run")
    assert fresh["tickets"] == 4 and fresh["resuming_run"] is None


def test_a_ticket_dead_lettered_by_reprocessing_makes_the_run_exit_1(cli, rt, fake):
    ids = seed_routed(rt, ["Refund [[intent:billing]] refuse-me", "Fine [[intent:billing]]"])
    fake.add_fault(Fault("bad_request", match="refuse-me"))

    result = cli("reprocess", *map(str, ids), "--json", "--yes", code=1)

    assert json.loads(result.stdout)["outcomes"] == {"dead": 1, "routed": 1}
    assert "1 tickets dead-lettered: `triage dlq list` shows why" in result.stderr
    assert "running this command again would start a new run" in result.stderr


def test_resume_with_a_different_selection_is_refused_not_ignored(cli, rt, fake):
    seed_routed(rt, [f"Invoice {n} [[intent:billing]]" for n in range(3)], intent="billing")
    seed_routed(rt, [f"Thanks {n} [[intent:other]]" for n in range(2)])
    first = cli.json("reprocess", "--intent", "billing", "--stop-after", "1", "--yes")
    run = str(first["run_id"])

    refused = cli("reprocess", "--resume", run, "--intent", "other", "--yes", code=2)
    refused_dry = cli("reprocess", "--resume", run, "--intent", "other", "--dry-run", code=2)

    assert f"--resume {run}: that run chose" in refused.output
    assert "not these tickets" in refused_dry.output
    assert fake.call_count() == 1
    same = cli.json("reprocess", "--resume", run, "--intent", "billing", "--yes")
    assert same["run_id"] == first["run_id"] and same["done"] == 3


def test_a_declined_reprocess_records_no_run_for_a_later_one_to_resume(cli, rt, fake):
    seed_routed(rt, [f"Order {n} late [[intent:shipping]]" for n in range(3)])

    declined = cli("reprocess", "--since", "7d", "--confirm-above", "1", code=1, input="n\n")

    assert "Reprocess 3 tickets" in declined.stderr and "cancelled" in declined.output
    assert _runs(rt) == 0 and fake.call_count() == 0
    assert cli.json("reprocess", "--since", "7d", "--dry-run")["resuming_run"] is None


def test_reprocess_with_the_broker_down_stops_before_reopening_any_ticket(cli, rt, fake):
    (ticket_id,) = seed_routed(rt, ["Where is my parcel? [[intent:shipping]]"])

    result = cli("reprocess", str(ticket_id), "--yes", code=1, REDIS_URL="redis://127.0.0.1:1/0")

    assert "broker unreachable" in result.output and "Traceback" not in result.output
    assert _runs(rt) == 0 and fake.call_count() == 0
    with rt.sessions() as session:
        assert session.get(Ticket, ticket_id).state == "routed"


def test_ctrl_c_does_not_start_the_tickets_still_queued_behind_the_running_one(
    cli, rt, fake, ctrl_c
):
    ids = seed_routed(rt, [f"Cannot log in {n} [[intent:account]]" for n in range(4)])
    fake.latency = 0.5

    def interrupt_during_the_first_call():
        wait_until(lambda: fake.call_count() >= 1, 30, what="the first call", every=0.01)
        ctrl_c()

    try:
        threading.Thread(target=interrupt_during_the_first_call, daemon=True).start()
        cli("reprocess", *map(str, ids), "--yes", "-c", "1", code=1)
    finally:
        fake.latency = 0.0
    with rt.sessions() as session:
        done = session.scalar(select(func.count()).where(ReprocessItem.done_at.is_not(None)))
    assert fake.call_count() == 1 and done == 1


def test_many_skipped_ids_are_summed_up_not_listed_one_by_one(cli, rt, fake, tmp_path):
    (done,) = seed_routed(rt, ["Refund please [[intent:billing]]"])
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(map(str, [done, *range(1000, 1025)])))

    result = cli("reprocess", "--from-file", str(ids), "--json", "--yes")

    assert "ticket 1009 not found; and 15 more" in result.stderr
    assert "ticket 1010 " not in result.stderr
    assert len(json.loads(result.stdout)["skipped"]) == 25


def test_a_run_stalled_on_an_open_circuit_says_why_and_goes_on_when_it_closes(cli, env, fake):
    """A 401 opened the fleet's circuit: the run's calls wait for it. Instead of a progress
    bar that stops for the whole cool-down, the run says it is paused, why and what to do,
    then that it goes on once the probe call closes the circuit."""
    env = {**env, "TRIAGE_CIRCUIT_AUTH_COOLDOWN_SECONDS": "4"}
    rt = make_runtime(env)
    ids = seed_routed(rt, [f"Charged twice {n} [[intent:billing]]" for n in range(3)])
    assert rt.admission is not None
    assert rt.admission.breaker.record_key_rejected()

    result = cli("reprocess", *map(str, ids), "--yes", "--json", **env)

    summary = json.loads(result.stdout)
    assert summary["outcomes"] == {"routed": 3}
    paused = result.stderr.index("paused: the API circuit is open (api_key_rejected)")
    assert "check ANTHROPIC_API_KEY" in result.stderr
    assert result.stderr.index("circuit closed: reprocessing goes on") > paused
    # One call per ticket, all after the circuit closed.
    assert fake.call_count() == 3
    assert rt.admission.breaker.open_reason() is None

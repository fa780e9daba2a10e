"""`triage backfill --batch` against PostgreSQL, Redis and the fake Message Batches API."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from tests.cli.conftest import seed_routed
from tests.fakeanthropic import Fault
from triage.db.models import (
    Attempt,
    Classification,
    MessageBatch,
    OutboxMessage,
    ReprocessItem,
    ReprocessRun,
    Ticket,
)
from triage.db.session import session_scope
from triage.db.stats import Window, compute


def test_backfill_survives_a_restart_mid_batch(cli, rt, fake):
    ids = seed_routed(rt, [f"Parcel {n} lost [[intent:shipping]]" for n in range(5)])
    errored = seed_routed(rt, ["Crashes on start [[intent:technical]] error-me"])[0]
    expired = seed_routed(rt, ["Invoice copy [[intent:billing]] expire-me"])[0]
    fake.add_fault(Fault("batch_errored", match="error-me"))
    fake.add_fault(Fault("batch_expired", match="expire-me"))
    args = ("backfill", "--batch", "--intent", "other", "--chunk-size", "3", "--yes")

    before = fake.stats()["batches"]
    # First invocation stops right after creating the batches (as if killed while polling).
    first = cli.json(*args, "--submit-only")
    assert first["batches_created_now"] == 3 and first["done"] == 0
    with rt.sessions() as session:
        rows = session.scalars(select(MessageBatch).order_by(MessageBatch.id)).all()
        mapped = session.scalars(select(ReprocessItem).where(ReprocessItem.batch_id.is_not(None)))
        assert {i.custom_id for i in mapped} == {f"ticket-{t}" for t in [*ids, errored, expired]}
    assert [r.requests for r in rows] == [3, 3, 1]
    assert all(r.api_batch_id and r.status == "submitted" for r in rows)
    assert fake.stats()["batches"] == before + 3

    second = cli.json(*args, "--poll-interval", "0.05")

    assert fake.stats()["batches"] == before + 3  # polled the persisted batches; created none
    assert second["batches_created_now"] == 0 and second["run_id"] == first["run_id"]
    assert second["done"] == 7 and second["labels_changed"] == 5
    assert second["outcomes"] == {"routed": 5, "requeued": 2}
    assert fake.call_count() == 0  # no real-time calls: everything went through batches
    spec = rt.config.models.spec("claude-haiku-4-5")
    with rt.sessions() as session:
        for ticket_id in ids:
            ticket = session.get(Ticket, ticket_id)
            label = session.get(Classification, ticket.current_classification_id)
            assert (label.backend, label.intent, label.generation) == (
                "anthropic-batch",
                "shipping",
                1,
            )
            assert label.cost_usd == spec.cost(label.input_tokens, label.output_tokens, batch=True)
            assert label.cost_usd < spec.cost(label.input_tokens, label.output_tokens)
            assert ticket.state == "routed" and ticket.department == "logistics"
            assert len(ticket.classifications) == 2  # the old label is history
        for ticket_id in (errored, expired):
            ticket = session.get(Ticket, ticket_id)
            assert ticket.state in ("received", "queued") and ticket.generation == 1
            assert (
                session.scalar(
                    select(OutboxMessage.task).where(OutboxMessage.ticket_id == ticket_id)
                )
                == "triage.classify_ticket"
            )
    # Run again: the relabelled tickets no longer match and the requeued ones belong to the
    # workers, so a new (empty) run starts and nothing is sent.
    third = cli.json(*args, "--poll-interval", "0.05")
    assert third["run_id"] != first["run_id"] and third["total"] == 0
    assert fake.stats()["batches"] == before + 3


def test_backfill_dry_run_prices_at_the_batch_discount(cli, rt, fake):
    seed_routed(rt, [f"Upgrade plan {n}" for n in range(4)])
    realtime = cli.json("reprocess", "--since", "1d", "--dry-run")
    batched = cli.json("backfill", "--batch", "--since", "1d", "--dry-run")
    assert batched["tickets"] == 4
    assert float(batched["estimated_cost_usd"]) == float(realtime["estimated_cost_usd"]) / 2


def test_backfill_without_batch_is_a_usage_error(cli):
    result = cli("backfill", "--since", "1d", code=2)
    assert "--batch" in result.output


def test_ctrl_c_while_polling_then_rerun_imports_without_new_batches(cli, rt, fake, ctrl_c):
    import threading

    from tests.support.stack import wait_until

    seed_routed(rt, [f"Where is my order {n} [[intent:shipping]]" for n in range(3)])
    args = ("backfill", "--batch", "--since", "1h", "--yes", "--poll-interval", "0.05")

    def submitted():
        with rt.sessions() as session:
            return session.scalar(select(MessageBatch.api_batch_id))

    def interrupt_once_submitted():
        wait_until(submitted, 30, what="batch submitted")
        ctrl_c()

    before = fake.stats()["batches"]
    fake.batch_delay = 1.5
    try:
        threading.Thread(target=interrupt_once_submitted, daemon=True).start()
        stopped = cli(*args, code=1)
        assert "run the same command again" in stopped.output
        assert fake.stats()["batches"] == before + 1
        finished = cli.json(*args)
    finally:
        fake.batch_delay = 0.2
    assert finished["batches_created_now"] == 0 and fake.stats()["batches"] == before + 1
    assert finished["outcomes"] == {"routed": 3} and finished["labels_changed"] == 3


def test_a_refused_batch_answer_is_requeued_and_its_cost_kept(cli, rt, fake):
    refused = seed_routed(rt, ["Parcel lost [[intent:shipping]] refuse-me"])[0]
    fake.add_fault(Fault("batch_refusal", match="refuse-me"))
    args = ("backfill", "--batch", "--intent", "other", "--yes", "--poll-interval", "0.05")
    assert cli.json(*args)["outcomes"] == {"requeued": 1}
    spec = rt.config.models.spec("claude-haiku-4-5")
    with rt.sessions() as session:
        attempt = session.scalars(
            select(Attempt).where(Attempt.ticket_id == refused, Attempt.outcome == "unusable")
        ).one()
        stats = compute(session, Window(None, None))
    assert (attempt.stage, attempt.api_calls, attempt.error_type) == ("classify", 1, "Refused")
    # Billed at the batch price, like a label from the same batch.
    assert attempt.cost_usd == spec.cost(attempt.input_tokens, attempt.output_tokens, batch=True)
    assert attempt.cost_usd > 0
    assert stats["usage"]["without_label"]["api_calls"] == 1


def test_an_answer_for_a_ticket_that_changed_during_the_batch_is_superseded_but_its_cost_kept(
    cli, rt, fake
):
    changed = seed_routed(rt, ["Parcel lost [[intent:shipping]] changes-meanwhile"])[0]
    args = ("backfill", "--batch", "--intent", "other", "--yes")
    cli.json(*args, "--submit-only")
    # Re-triaged (new text from the helpdesk) while the batch ran: a newer generation.
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Ticket).where(Ticket.id == changed).values(generation=Ticket.generation + 1)
        )
    done = cli.json(*args, "--poll-interval", "0.05")
    assert done["outcomes"] == {"superseded": 1}
    with rt.sessions() as session:
        attempt = session.scalars(
            select(Attempt).where(Attempt.ticket_id == changed, Attempt.outcome == "superseded")
        ).one()
    assert attempt.api_calls == 1 and attempt.cost_usd > 0


def test_backfill_dry_run_estimates_only_what_the_run_it_would_resume_has_not_sent(cli, rt, fake):
    seed_routed(rt, [f"Invoice copy {n} [[intent:billing]]" for n in range(3)])
    args = ("backfill", "--batch", "--intent", "other", "--yes")
    fresh = cli.json(*args, "--dry-run")
    assert fresh["tickets"] == 3 and fresh["resuming_run"] is None
    submitted = cli.json(*args, "--submit-only")
    # Everything is in a batch already: running the command again would only poll.
    again = cli.json(*args, "--dry-run")
    assert again["resuming_run"] == submitted["run_id"] and again["tickets"] == 0


def test_a_negative_poll_interval_is_refused_before_any_batch_is_paid_for(cli, rt, fake):
    seed_routed(rt, ["Parcel lost [[intent:shipping]]"])
    before = fake.stats()["batches"]

    result = cli("backfill", "--batch", "--since", "1h", "--yes", "--poll-interval", "-1", code=2)

    assert "--poll-interval" in result.output and "Traceback" not in result.output
    assert fake.stats()["batches"] == before


@pytest.mark.parametrize("size", ["0", "100001"])
def test_a_chunk_size_the_api_refuses_is_a_usage_error_before_a_run_is_recorded(
    cli, rt, fake, size
):
    seed_routed(rt, ["Parcel lost [[intent:shipping]]"])

    result = cli("backfill", "--batch", "--since", "1h", "--yes", "--chunk-size", size, code=2)

    assert "--chunk-size must be between 1 and 100" in result.output
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ReprocessRun)) == 0


def test_a_declined_backfill_records_no_run_for_a_later_one_to_resume(cli, rt, fake):
    seed_routed(rt, [f"Order {n} late [[intent:shipping]]" for n in range(3)])
    before = fake.stats()["batches"]

    declined = cli(
        "backfill", "--batch", "--since", "7d", "--confirm-above", "1", code=1, input="n\n"
    )

    assert "Send 3 tickets" in declined.stderr and "cancelled" in declined.output
    assert fake.stats()["batches"] == before
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ReprocessRun)) == 0


def test_a_backfill_without_the_anthropic_backend_records_no_run(cli, rt, fake):
    seed_routed(rt, ["Parcel lost [[intent:shipping]]"])

    result = cli("backfill", "--batch", "--since", "1h", "--yes", code=2, TRIAGE_BACKEND="local")

    assert "backfill --batch needs ANTHROPIC_API_KEY and an Anthropic backend" in result.output
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ReprocessRun)) == 0


def _batch_requests(fake) -> list[list[str]]:
    """The custom ids of every batch the fake was asked to create, in order."""
    return [
        [r["custom_id"] for r in req.body["requests"]]
        for req in fake.requests
        if req.method == "POST" and req.path == "/v1/messages/batches"
    ]


def test_backfill_with_the_broker_down_stops_before_any_batch_is_paid_for(cli, rt, fake):
    (ticket_id,) = seed_routed(rt, ["Where is my parcel? [[intent:shipping]]"])

    result = cli(
        "backfill", "--batch", "--since", "1h", "--yes", code=1, REDIS_URL="redis://127.0.0.1:1/0"
    )

    assert "broker unreachable" in result.output and "Traceback" not in result.output
    assert _batch_requests(fake) == [] and fake.call_count() == 0
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ReprocessRun)) == 0
        assert session.scalar(select(func.count()).select_from(MessageBatch)) == 0
        assert session.get(Ticket, ticket_id).state == "routed"


def test_a_ticket_erased_before_its_chunk_is_sent_is_left_out_and_reported(cli, rt, fake):
    planned, waiting, kept = seed_routed(
        rt, [f"Parcel {n} lost [[intent:shipping]]" for n in range(3)]
    )
    args = ("backfill", "--batch", "--intent", "other", "--chunk-size", "1", "--yes")
    # The API fails the first batch: its chunk (`planned`) stays recorded but unsent, and
    # the other two are selected but in no chunk yet.
    fake.add_fault(Fault("batch_create_error"))
    failed = cli(*args, code=1)
    assert "internal error" in failed.output
    assert _batch_requests(fake) == [[f"ticket-{planned}"]]

    # The customer's erasure request arrives before the rerun sends anything.
    cli("tickets", "erase", str(planned), str(waiting), "--yes")
    assert cli.json(*args, "--dry-run")["tickets"] == 1

    done = cli.json(*args, "--poll-interval", "0.05")

    # Neither erased ticket's (empty) text went to the API: only `kept` was sent.
    assert _batch_requests(fake)[1:] == [[f"ticket-{kept}"]]
    assert done["outcomes"] == {"routed": 1, "skipped": 2} and done["done"] == 3
    assert done["skipped"] == [
        {"ticket_id": planned, "reason": "was erased: no text to classify"},
        {"ticket_id": waiting, "reason": "was erased: no text to classify"},
    ]
    assert [b["requests"] for b in done["batches"]] == [1]
    with rt.sessions() as session:
        for ticket_id in (planned, waiting):
            ticket = session.get(Ticket, ticket_id)
            assert (ticket.state, ticket.generation) == ("routed", 0)
            assert len(ticket.classifications) == 1
    # The run's report, read again later, still says why.
    shown = cli("backfill", "--batch", "--resume", str(done["run_id"]), "--yes")
    assert f"ticket {planned} (was erased: no text to classify)" in shown.output


def test_an_answer_for_a_ticket_erased_while_the_batch_ran_is_not_recorded_nor_requeued(
    cli, rt, fake
):
    answered, errored, kept = seed_routed(
        rt,
        [
            "Parcel lost, I'm Jane [[intent:shipping]]",
            "App crashes, I'm Jane [[intent:technical]] error-me",
            "Invoice copy [[intent:billing]]",
        ],
    )
    fake.add_fault(Fault("batch_errored", match="error-me"))
    args = ("backfill", "--batch", "--intent", "other", "--yes")
    cli.json(*args, "--submit-only")
    cli("tickets", "erase", str(answered), str(errored), "--yes")

    done = cli.json(*args, "--poll-interval", "0.05")

    assert done["outcomes"] == {"routed": 1, "skipped": 2} and done["labels_changed"] == 1
    assert {s["ticket_id"] for s in done["skipped"]} == {answered, errored}
    assert {s["reason"] for s in done["skipped"]} == {"was erased: no text to classify"}
    with rt.sessions() as session:
        for ticket_id in (answered, errored):
            ticket = session.get(Ticket, ticket_id)
            # Not relabelled, reopened or sent back to the workers.
            assert (ticket.state, ticket.generation) == ("routed", 0)
            assert len(ticket.classifications) == 1
            assert ticket.body == ""
            assert not session.scalars(
                select(OutboxMessage).where(OutboxMessage.ticket_id == ticket_id)
            ).all()
        # The erased ticket's answer was billed all the same: on record, without a label.
        attempt = session.scalars(
            select(Attempt).where(Attempt.ticket_id == answered, Attempt.number == 0)
        ).one()
        assert attempt.api_calls == 1 and attempt.cost_usd > 0
        assert session.get(Ticket, kept).generation == 1

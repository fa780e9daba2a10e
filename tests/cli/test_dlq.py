"""`triage dlq` against PostgreSQL, Redis, a real worker process and the fake Messages API."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from sqlalchemy import func, select

from tests.fakeanthropic import Fault
from tests.support.stack import WorkerProcess, wait_until
from triage.db.models import DeadLetter, OutboxMessage, Ticket
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_ticket_stage
from triage.pipeline.relay import CLASSIFY_TASK
from triage.reliability.deadletter import dead_letter


def _dead_lettered(rt, fake, marker: str) -> int:
    """A ticket the API refused with a 400: dead-lettered at once by the classify stage."""
    inbound = InboundTicket(
        source="generic",
        external_id=f"dl-{marker}",
        subject="Refund",
        body=f"I want my money back [[intent:refund]] {marker}",
    )
    with session_scope(rt.sessions) as session:
        ticket_id = accept_ticket(session, inbound).ticket_id
    fake.add_fault(Fault("bad_request", match=marker))
    assert classify_ticket_stage(rt, ticket_id) == "dead"
    return ticket_id


def test_dlq_replay_routes_the_ticket(cli, rt, env, fake):
    ticket_id = _dead_lettered(rt, fake, "reject-me")
    letters = cli.json("dlq", "list")
    assert [(r["ticket_id"], r["stage"], r["error_type"]) for r in letters] == [
        (ticket_id, "classify", "PermanentError")
    ]
    shown = cli.json("dlq", "show", str(letters[0]["id"]))
    assert shown["ticket"]["state"] == "dead_lettered" and "400" in shown["message"]

    with WorkerProcess(env, concurrency=2, queues="triage.classify"):
        replayed = cli.json("dlq", "replay", str(letters[0]["id"]))
        assert replayed["replayed"] == [
            {"dead_letter_id": letters[0]["id"], "ticket_id": ticket_id, "stage": "classify"}
        ]

        def state():
            with rt.sessions() as session:
                return session.get(Ticket, ticket_id).state

        wait_until(lambda: state() == "routed", 60, what="replayed ticket routed")
    with rt.sessions() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket.department == "billing"
    assert cli.json("dlq", "list") == []
    again = cli.json("dlq", "replay", str(letters[0]["id"]))
    assert again == {"replayed": [], "skipped": [letters[0]["id"]]}


def test_replay_by_filter_asks_first_and_purge_deletes_only_replayed(cli, rt, fake):
    first = _dead_lettered(rt, fake, "bad-one")
    _dead_lettered(rt, fake, "bad-two")

    refused = cli("dlq", "replay", "--stage", "classify", code=1, input="n\n")
    assert "cancelled" in refused.output
    cli("dlq", "replay", "--all", input="y\n")
    with rt.sessions() as session:
        assert session.get(Ticket, first).state == "queued"
    assert cli.json("dlq", "list", "--all")[0]["replayed_at"] is not None

    assert cli.json("dlq", "purge", "--yes") == {"purged": 2}
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0


def test_usage_errors_exit_2_with_one_line(cli):
    result = cli("dlq", "replay", code=2)
    assert "choose letters" in result.output
    assert "Traceback" not in result.output


def test_reprocessing_a_dead_lettered_ticket_resolves_its_letter(cli, rt, fake):
    ticket_id = _dead_lettered(rt, fake, "reject-once")

    summary = cli.json("reprocess", str(ticket_id), "--yes")

    assert summary["outcomes"] == {"routed": 1}
    assert cli.json("dlq", "list") == []
    assert cli.json("dlq", "list", "--all")[0]["replayed_at"] is not None


def test_the_confirmation_question_stays_out_of_the_json_on_stdout(cli, rt, fake):
    _dead_lettered(rt, fake, "bad-json-one")
    _dead_lettered(rt, fake, "bad-json-two")

    replayed = cli("dlq", "replay", "--all", "--json", input="y\n")
    purged = cli("dlq", "purge", "--json", input="y\n")

    # CliRunner echoes the typed answer onto stdout; in a shell the terminal echoes it.
    assert len(json.loads(replayed.stdout.removeprefix(" y\n"))["replayed"]) == 2
    assert json.loads(purged.stdout.removeprefix(" y\n")) == {"purged": 2}
    assert "Replay 2 dead letters?" in replayed.stderr
    assert "Delete 2 replayed dead letters?" in purged.stderr


def test_replay_refuses_ids_and_filters_together_rather_than_ignore_the_filters(cli, rt, fake):
    ticket_id = _dead_lettered(rt, fake, "classify-only")
    (letter,) = cli.json("dlq", "list")

    for extra in (("--stage", "deliver"), ("--all",)):
        result = cli("dlq", "replay", str(letter["id"]), *extra, "--yes", code=2)
        assert "not both" in result.output

    with rt.sessions() as session:
        assert session.get(Ticket, ticket_id).state == "dead_lettered"


def _many_dead_letters(rt, n: int) -> None:
    with session_scope(rt.sessions) as session:
        for i in range(n):
            inbound = InboundTicket(
                source="generic", external_id=f"many-{i}", subject="s", body="b"
            )
            ticket_id = accept_ticket(session, inbound).ticket_id
            dead_letter(
                session,
                ticket_id=ticket_id,
                stage="classify",
                error=PermanentError("HTTP 400"),
                attempts=1,
                payload={"ticket_id": ticket_id},
            )


def _replayed_count(rt) -> int:
    with rt.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_not(None))
        )


def test_ctrl_c_during_replay_reports_what_was_replayed_and_the_rerun_does_the_rest(
    cli, rt, ctrl_c
):
    _many_dead_letters(rt, 300)

    def interrupt_after_the_first_replay():
        wait_until(lambda: _replayed_count(rt) >= 1, 30, what="a replay", every=0.005)
        ctrl_c()

    threading.Thread(target=interrupt_after_the_first_replay, daemon=True).start()
    stopped = cli("dlq", "replay", "--all", "--yes", "--json", code=1)

    reported = json.loads(stopped.stdout)["replayed"]
    assert "run the same command again" in stopped.stderr
    assert 1 <= len(reported) <= _replayed_count(rt) <= len(reported) + 1 < 300
    rest = cli.json("dlq", "replay", "--all", "--yes")["replayed"]
    assert _replayed_count(rt) == 300
    assert not {r["dead_letter_id"] for r in reported} & {r["dead_letter_id"] for r in rest}


def test_a_listing_cut_short_by_limit_says_more_match(cli, rt):
    _many_dead_letters(rt, 3)

    for command, noun in ((("tickets", "list"), "tickets"), (("dlq", "list"), "dead letters")):
        cut = cli(*command, "--limit", "2").stdout
        whole = cli(*command, "--limit", "3").stdout
        assert f"2 {noun} shown, the newest; more match (raise --limit" in cut
        assert f"3 {noun}\n" in whole and "more match" not in whole
        assert len(cli.json(*command, "--limit", "2")) == 2


def test_purge_with_stdin_closed_refuses_in_one_line_and_deletes_nothing(env, rt, fake):
    _dead_lettered(rt, fake, "closed-stdin")

    result = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m triage.cli.main dlq purge --include-open <&-'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert "not confirmed (no answer); pass --yes" in result.stderr
    assert "Traceback" not in result.stderr
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


@pytest.mark.parametrize(("stdin", "code", "left"), [("y\n", 0, 0), ("", 2, 1), ("n\n", 1, 1)])
def test_purge_reads_its_answer_from_a_pipe_and_refuses_at_its_end(
    env, rt, fake, stdin, code, left
):
    # `yes | triage dlq purge`: a script may answer on a pipe; /dev/null or an empty pipe
    # ends before an answer, which is a refusal, not a yes.
    _dead_lettered(rt, fake, "piped-stdin")

    result = subprocess.run(
        [sys.executable, "-m", "triage.cli.main", "dlq", "purge", "--include-open"],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    if code == 2:
        assert "not confirmed (no answer); pass --yes" in result.stderr
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == left


def _waiting_classify_messages(rt) -> int:
    with rt.sessions() as session:
        return session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.task == CLASSIFY_TASK)
        )


def test_replay_with_the_broker_down_leaves_the_rest_in_the_outbox_and_exits_1(cli, rt):
    _many_dead_letters(rt, 3)
    before = _waiting_classify_messages(rt)

    result = cli(
        "dlq", "replay", "--all", "--yes", "--json", code=1, REDIS_URL="redis://127.0.0.1:1/0"
    )

    assert len(json.loads(result.stdout)["replayed"]) == 3
    assert "the broker did not take the messages of 3 replayed tickets" in result.stderr
    assert _waiting_classify_messages(rt) == before + 3

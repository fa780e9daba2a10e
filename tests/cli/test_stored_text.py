"""Text that customers, helpdesks and the API wrote is printed as written: square brackets in a
subject, an external id or an error message are data, not Rich markup."""

from __future__ import annotations

import re

from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.ingest.models import InboundTicket
from triage.reliability.deadletter import dead_letter

BRACKETS = "[/] [urgent]"


def _dead_lettered_with_brackets(rt) -> int:
    inbound = InboundTicket(
        source="generic", external_id="x[/]", subject=f"{BRACKETS} help", body="Refund please"
    )
    with session_scope(rt.sessions) as session:
        ticket_id = accept_ticket(session, inbound).ticket_id
        dead_letter(
            session,
            ticket_id=ticket_id,
            stage="classify",
            error=PermanentError(f"HTTP 400 {BRACKETS}"),
            attempts=1,
            payload={"ticket_id": ticket_id},
        )
    return ticket_id


def test_brackets_in_stored_text_print_as_written_in_every_listing(cli, rt):
    ticket_id = _dead_lettered_with_brackets(rt)
    (letter,) = cli.json("dlq", "list")

    listed = cli("tickets", "list")
    shown = cli("tickets", "show", str(ticket_id))
    letters = cli("dlq", "list")
    letter_shown = cli("dlq", "show", str(letter["id"]))

    assert "x[/]" in listed.stdout
    assert "generic/x[/]" in shown.stdout
    assert f"last error: HTTP 400 {BRACKETS}" in shown.stdout
    assert "[/]" in letters.stdout and "[urgent]" in letters.stdout
    assert f"message: HTTP 400 {BRACKETS}" in letter_shown.stdout
    assert f"'subject': '{BRACKETS} help'" in letter_shown.stdout


def test_an_error_quoting_what_the_operator_typed_keeps_its_brackets(cli):
    result = cli("tickets", "list", "--since", "[/]x", code=2)

    assert "--since '[/]x': use 7d" in result.output
    assert "Traceback" not in result.output


def test_printed_times_and_the_time_options_say_they_are_utc(cli, rt):
    _dead_lettered_with_brackets(rt)
    (letter,) = cli.json("dlq", "list")

    shown = cli("dlq", "show", str(letter["id"])).stdout

    assert re.search(r"last_failed_at: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown)
    for command in (("tickets", "list"), ("dlq", "list"), ("reprocess",), ("stats",)):
        assert "(UTC" in cli(*command, "--help", COLUMNS="200").stdout

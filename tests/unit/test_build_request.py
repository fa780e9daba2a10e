"""What of a ticket the model is shown: cleaned, cut to `max_ticket_chars`, redacted."""

from __future__ import annotations

from dataclasses import dataclass

from triage.config import Settings, load_config
from triage.pipeline.classify_requests import CUT_SLACK, build_request
from triage.pipeline.runtime import Runtime

LIMIT = 1000
EMAIL = "someone.private@example.com"


@dataclass
class _Ticket:
    body: str
    id: int = 1
    subject: str = "Help"
    clean_text: str = ""
    channel: str | None = "email"
    requester_name: str | None = "Ann Example"
    requester_email: str | None = "ann@example.com"


def _rt(**settings: object) -> Runtime:
    return Runtime(load_config(Settings(**{"max_ticket_chars": LIMIT, **settings})))  # type: ignore[arg-type]


def test_a_short_ticket_is_shown_whole_and_redacted():
    body = "Please refund order 1234. Write to ann@example.com. Ann Example"
    shown = build_request(_rt(), _Ticket(body)).body
    assert shown == "Please refund order 1234. Write to [EMAIL]. [NAME]"


def test_a_long_ticket_is_cut_and_says_so():
    shown = build_request(_rt(), _Ticket("word " * 10_000)).body
    text, marker = shown.rsplit("\n", 1)
    assert len(text) == LIMIT
    assert marker == f"[... about {50_000 - LIMIT} more characters of this ticket are not shown]"


def test_a_ticket_just_over_the_limit_loses_only_what_is_over():
    shown = build_request(_rt(), _Ticket("x" * (LIMIT + 50))).body
    assert shown.split("\n")[0] == "x" * LIMIT


def test_an_address_across_the_cut_is_redacted_whole_not_shown_in_part():
    body = "y" * (LIMIT - 10) + " " + EMAIL + " " + "z" * 5000
    shown = build_request(_rt(), _Ticket(body)).body
    assert "someone" not in shown and "private" not in shown


def test_what_the_slack_cut_split_is_dropped_even_when_redaction_shortened_the_text():
    # Thirty addresses before the cut shrink by ~30 characters each when redacted, which
    # would pull text from past the slack cut, where an address lies in two, under the limit.
    many = " ".join(f"customer{i:03d}.longname@example.com" for i in range(30))
    pad = "w" * (LIMIT + CUT_SLACK - len(many) - 12)
    body = f"{many} {pad} {EMAIL} " + "z" * 5000
    assert body.index(EMAIL) < LIMIT + CUT_SLACK < body.index(EMAIL) + len(EMAIL)
    shown = build_request(_rt(), _Ticket(body)).body
    assert "someone" not in shown and "customer0" not in shown
    assert shown.count("[EMAIL]") == 30


def test_the_limit_is_a_setting():
    shown = build_request(_rt(max_ticket_chars=600), _Ticket("v" * 5000)).body
    assert shown.split("\n")[0] == "v" * 600

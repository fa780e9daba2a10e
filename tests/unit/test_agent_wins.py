"""The rule for group and priority on write-back: an agent's change since the webhook wins."""

from __future__ import annotations

import pytest

from triage.sinks.helpdesk import (
    UNREPORTED,
    FieldWrite,
    agent_wins,
    needs_current,
    reported_number,
)


def test_a_field_still_as_the_webhook_reported_it_is_set_to_triages_value():
    assert agent_wins("group", 360001, 360009, 360009) == FieldWrite("group", 360001)


def test_a_field_an_agent_changed_since_the_webhook_is_left_and_named():
    assert agent_wins("group", 360001, 360009, 360777) == FieldWrite("group", None, left=True)


def test_a_field_the_webhook_did_not_carry_is_set_as_before_whatever_it_is_now():
    assert agent_wins("priority", "high", UNREPORTED, "low") == FieldWrite("priority", "high")
    assert agent_wins("priority", "high", UNREPORTED, None) == FieldWrite("priority", "high")


def test_no_group_then_and_no_group_now_counts_as_unchanged():
    assert agent_wins("group", 360001, None, None) == FieldWrite("group", 360001)


def test_an_agent_who_gave_the_ticket_a_group_it_had_none_keeps_it():
    assert agent_wins("group", 360001, None, 360777) == FieldWrite("group", None, left=True)


def test_an_agent_who_already_set_what_triage_would_is_not_reported_as_overruled():
    assert agent_wins("priority", "high", "low", "high") == FieldWrite("priority", None)


@pytest.mark.parametrize("reported", [UNREPORTED, None, "low", "high"])
def test_nothing_is_written_when_triage_has_no_value_for_the_field(reported):
    assert agent_wins("group", None, reported, "low") == FieldWrite("group", None)


def test_the_current_value_is_needed_only_to_compare_a_reported_field_triage_would_set():
    assert needs_current(360001, 360009) and needs_current(360001, None)
    assert not needs_current(360001, UNREPORTED)
    assert not needs_current(None, 360009)


@pytest.mark.parametrize(
    ("sent", "reported"),
    [
        (360009, 360009),
        ("360009", 360009),  # a placeholder renders text
        ("", None),  # {{ticket.group.id}} of a ticket with no group
        (None, UNREPORTED),
        ("Support", UNREPORTED),
        (True, UNREPORTED),
    ],
)
def test_a_reported_group_or_queue_is_read_as_a_number_none_or_unreported(sent, reported):
    assert reported_number({"group_id": sent}, "group_id") == reported
    assert reported_number({}, "group_id") is UNREPORTED

"""`triage run`'s table of the samples, as a person reads it on a terminal of a given width."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from triage.cli.run import _table
from triage.db.models import Classification, Ticket


def _row(ticket_id: int, subject: str, state: str, department: str, intent: str):
    received = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    ticket = Ticket(
        id=ticket_id,
        subject=subject,
        body="text",
        state=state,
        department=department,
        received_at=received,
        state_changed_at=received + timedelta(milliseconds=900),
    )
    label = Classification(intent=intent, language="en", confidence=0.87)
    return ticket, label


@pytest.mark.parametrize("width", [80, 100, 160])
def test_every_row_shows_its_labels_department_and_state_on_a_terminal_this_wide(width):
    rows = [
        _row(1, "Refund for returned headphones, please", "routed", "billing", "refund"),
        _row(2, "No me llega el correo para restablecer", "needs_review", "accounts", "account"),
        _row(3, "Webhooks not firing", "dead_lettered", "customer_success", "cancellation"),
    ]
    console = Console(width=width, record=True, color_system=None)

    console.print(_table(rows, width))

    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    for ticket, label in rows:
        line = next(line for line in lines if line.startswith(f"│ {ticket.id} "))
        assert label.intent in line and ticket.department in line and ticket.state in line
        assert "0.87" in line
    if width >= 100:
        assert "900 ms" in text

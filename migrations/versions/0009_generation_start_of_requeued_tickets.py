"""when the current generation began, for tickets sent back through classification before 0007

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 15:20:00.000000
"""

from collections.abc import Sequence

from alembic import op


revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # 0007 left generation_started_at empty on existing rows, which the classify stage reads
    # as "from received_at". For a ticket reprocessed, replayed or given new text before then
    # and still on its way through classification, that is weeks ago: its first transient
    # failure would dead-letter it as too old instead of retrying. Its last state change is
    # the best record of when it was sent back. Only unfinished tickets (found through
    # ix_tickets_state_changed) are read again by the age bound, so only they are updated.
    op.execute(
        "UPDATE tickets SET generation_started_at = state_changed_at"
        " WHERE state IN ('received', 'queued', 'classifying')"
        " AND generation > 0 AND generation_started_at IS NULL"
    )


def downgrade() -> None:
    # The values are a better estimate than none, and 0007's downgrade drops the column.
    pass

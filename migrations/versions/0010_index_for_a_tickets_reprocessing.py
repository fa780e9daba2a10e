"""index for a ticket's reprocessing items

`triage tickets show` (the timeline), erasure and `triage stats` look a ticket's
reprocess_items up by ticket_id; the unique (run_id, ticket_id) index cannot serve that, so
after a backfill of a million tickets each lookup read the whole table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 17:40:00.000000
"""

from collections.abc import Sequence

from alembic import op


revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # As in 0004: built without holding up the writes of a live installation.
        with op.get_context().autocommit_block():
            op.create_index(
                "ix_reprocess_items_ticket",
                "reprocess_items",
                ["ticket_id"],
                unique=False,
                postgresql_concurrently=True,
                if_not_exists=True,
            )
        return
    op.create_index("ix_reprocess_items_ticket", "reprocess_items", ["ticket_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_reprocess_items_ticket", table_name="reprocess_items")

"""indexes for erasure by e-mail and for a ticket's dead letters

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 15:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# (name, table, columns or expressions)
_INDEXES = (
    ("ix_tickets_requester_email", "tickets", [sa.text("lower(requester_email)")]),
    ("ix_dead_letters_ticket", "dead_letters", ["ticket_id"]),
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # As in 0004: tickets is large on a live installation, and a plain CREATE INDEX would
        # hold up every webhook and worker write until it is built.
        with op.get_context().autocommit_block():
            for name, table, columns in _INDEXES:
                op.create_index(
                    name,
                    table,
                    columns,
                    unique=False,
                    postgresql_concurrently=True,
                    if_not_exists=True,
                )
        return
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns, unique=False)


def downgrade() -> None:
    for name, table, _columns in reversed(_INDEXES):
        op.drop_index(name, table_name=table)

"""the sinks that accepted a dispatch before a later sink failed

A retried, swept or replayed delivery skips them instead of sending them the dispatch again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27 22:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: adding it rewrites nothing on PostgreSQL, however large the
    # table. None means no attempt has failed part-way: every sink is still to run.
    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sinks_done", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.drop_column("sinks_done")

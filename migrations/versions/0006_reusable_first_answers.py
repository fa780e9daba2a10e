"""a failed attempt's reusable first answer, and the label that reused it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 14:30:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: adding them rewrites nothing on PostgreSQL, however large the
    # tables.
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answer', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('classifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('first_answer_attempt_id', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('classifications', schema=None) as batch_op:
        batch_op.drop_column('first_answer_attempt_id')
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('answer')

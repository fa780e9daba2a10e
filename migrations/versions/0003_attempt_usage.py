"""tokens and cost on every attempt, failed ones included

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:50:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TOKENS = ('input_tokens', 'output_tokens', 'cache_read_tokens', 'cache_write_tokens')


def upgrade() -> None:
    # Attempts recorded before this revision keep 0: what their failed calls cost was not
    # kept, and a label's cost stays on its classification row either way.
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        for name in _TOKENS:
            batch_op.add_column(sa.Column(name, sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(
            sa.Column('cost_usd', sa.Numeric(precision=12, scale=6), server_default='0', nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('cost_usd')
        for name in reversed(_TOKENS):
            batch_op.drop_column(name)

"""indexes for the sweeper's lookups and for time windows

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:05:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('dispatches', schema=None) as batch_op:
        batch_op.create_index(
            'ix_dispatches_undelivered',
            ['id'],
            unique=False,
            postgresql_where=sa.text('delivered_at IS NULL'),
            sqlite_where=sa.text('delivered_at IS NULL'),
        )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_ticket', ['ticket_id'], unique=False)
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.create_index('ix_tickets_received', ['received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.drop_index('ix_tickets_received')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_ticket')
    with op.batch_alter_table('dispatches', schema=None) as batch_op:
        batch_op.drop_index('ix_dispatches_undelivered')

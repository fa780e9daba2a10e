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


_UNDELIVERED = sa.text('delivered_at IS NULL')
# (name, table, columns, extra keyword arguments)
_INDEXES = (
    (
        'ix_dispatches_undelivered',
        'dispatches',
        ['id'],
        {'postgresql_where': _UNDELIVERED, 'sqlite_where': _UNDELIVERED},
    ),
    ('ix_outbox_ticket', 'outbox', ['ticket_id'], {}),
    ('ix_tickets_received', 'tickets', ['received_at'], {}),
)


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        # On a live installation these tables are large: a plain CREATE INDEX would hold up
        # every webhook and worker write until it is built. CONCURRENTLY cannot run inside a
        # transaction, hence the autocommit block.
        with op.get_context().autocommit_block():
            for name, table, columns, kw in _INDEXES:
                op.create_index(
                    name, table, columns, unique=False, postgresql_concurrently=True,
                    if_not_exists=True, **kw,
                )
        return
    for name, table, columns, kw in _INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(name, columns, unique=False, **kw)


def downgrade() -> None:
    for name, table, _columns, _kw in reversed(_INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(name)

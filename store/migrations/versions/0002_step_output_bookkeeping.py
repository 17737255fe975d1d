"""step output bookkeeping: last stored guest sequence number, kept and dropped characters

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("output_seq", "output_chars", "dropped_chars")


def upgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.drop_column(name)

"""sandbox lifecycle: a session whose disk was kept at its end (preserved), and each
sandbox's last sampled CPU and memory use

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("preserved", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("sandboxes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cpu_percent", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("memory_mb", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("stats_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("sandboxes", schema=None) as batch_op:
        for name in ("stats_at", "memory_mb", "cpu_percent"):
            batch_op.drop_column(name)
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("preserved")

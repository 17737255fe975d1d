"""dashboard: the first step of a revised plan's tail says why it was revised; a session
keeps the timeouts and model it was started with

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.add_column(sa.Column("revised", sa.Text(), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("idle_timeout_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("hibernate_after_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("model", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        for name in ("model", "hibernate_after_s", "idle_timeout_s"):
            batch.drop_column(name)
    with op.batch_alter_table("steps") as batch:
        batch.drop_column("revised")

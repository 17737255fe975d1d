"""an index for each host's watch, which reads its running sandboxes every two seconds

Revision ID: 0018
Revises: 0016
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sandboxes_host_id_status", "sandboxes", ["host_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_host_id_status", table_name="sandboxes")

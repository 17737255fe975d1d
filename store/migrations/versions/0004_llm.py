"""LLM proxy: calls (accounting, limits) and the response cache

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llm_calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("session_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("provider", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("llm_calls", schema=None) as batch_op:
        batch_op.create_index("ix_llm_calls_user_created", ["user_id", "created_at"])
        batch_op.create_index(batch_op.f("ix_llm_calls_session_id"), ["session_id"])
        batch_op.create_index(batch_op.f("ix_llm_calls_task_id"), ["task_id"])

    op.create_table(
        "llm_cache",
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("llm_cache", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_llm_cache_expires_at"), ["expires_at"])


def downgrade() -> None:
    op.drop_table("llm_cache")
    op.drop_table("llm_calls")

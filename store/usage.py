"""Sandboxes' sampled CPU and memory use, written by their host onto their rows (a live
reading, not history: it is no event)."""

from __future__ import annotations

from sqlalchemy import Engine, update
from sqlmodel import Session, col

from store.models import SandboxRow, utcnow


def record_usage(engine: Engine, usage: dict[str, tuple[float, float]]) -> None:
    """``usage``: (% of one CPU, resident MiB) by sandbox id, in one transaction."""
    now = utcnow()
    with Session(engine) as db:
        for sandbox_id, (cpu_percent, memory_mb) in usage.items():
            db.execute(
                update(SandboxRow)
                .where(col(SandboxRow.id) == sandbox_id)
                .values(cpu_percent=round(cpu_percent, 1), memory_mb=round(memory_mb, 1),
                        stats_at=now)
            )  # fmt: skip
        db.commit()

"""A host's view of its sandboxes' rows: their sampled CPU and memory use, written by their
host onto their rows (a live reading, not history: it is no event), and which of them the
database places on the host, for its watch."""

from __future__ import annotations

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from store.models import SandboxRow, SessionRow, utcnow


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


def placed_sandboxes(engine: Engine, host_id: str) -> list[SandboxRow]:
    """The sandboxes of live sessions that the database places on ``host_id`` (running:
    neither destroyed nor preserved), whatever their machines are doing now."""
    with Session(engine) as db:
        return list(
            db.exec(
                select(SandboxRow)
                .join(SessionRow, col(SessionRow.id) == col(SandboxRow.session_id))
                .where(
                    col(SandboxRow.host_id) == host_id,
                    col(SandboxRow.status) == "running",
                    col(SessionRow.ended_at).is_(None),
                )
            )
        )

"""Accounting and limits of LLM calls, kept in the database so every API and worker
process sees the same counts: each call is a row of ``llm_calls`` once it is answered, and a
row of ``llm_reservations`` while it is in flight, taken before anything else so that
concurrent calls count against the limits from their start."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table, case, delete, func, insert, text
from sqlmodel import Session, col, select

from config.settings import Settings
from llm.models import (
    BudgetExceeded,
    Caller,
    ChatResult,
    RateLimited,
    SessionUsage,
    SpendLimited,
    TaskUsage,
    TokenUsage,
    UsageTotals,
    UserUsage,
)
from store.models import LLMCall, LLMReservation, SessionRow, UserLimits
from telemetry.metrics import MODEL_CALLS, MODEL_COST, MODEL_TOKENS

RATE_WINDOW = timedelta(minutes=1)
CALLS: Table = LLMCall.__table__  # type: ignore[attr-defined]
IN_FLIGHT: Table = LLMReservation.__table__  # type: ignore[attr-defined]
LIMITS: Table = UserLimits.__table__  # type: ignore[attr-defined]
# A reservation older than this is taken for one whose process died mid-call: no call
# (streams included) lasts so long, and it is not counted any more.
STALE = timedelta(minutes=15)
# When a caller refused for its concurrency may try again: calls last seconds.
CONCURRENCY_RETRY_S = 2


def cost_usd(settings: Settings, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    per_input, per_output = settings.llm_prices.get(model, (0.0, 0.0))
    return (prompt_tokens * per_input + completion_tokens * per_output) / 1_000_000


def caller_for_session(engine: Engine, session_id: str, task_id: str | None) -> Caller:
    """The caller of a session's own LLM call (the planner's): the session's user."""
    with Session(engine) as db:
        row = db.get(SessionRow, session_id) if session_id else None
    return Caller(
        user_id=row.user_id if row else "", session_id=session_id or None, task_id=task_id
    )


class Ledger:
    """Limits and the record of calls: statements on a connection the proxy holds, so that
    one call costs as few database round trips as it can."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, conn: Connection, caller: Caller) -> int:
        """Reserves a place for the call, then refuses it (RateLimited, BudgetExceeded) if it
        goes past a limit: the reservation is written first, so of concurrent calls each
        counts the others (a refusal rolls it back with the transaction). The reservation's
        id, to ``release`` when the call ends."""
        if conn.dialect.name == "postgresql":
            # Read committed would let two concurrent starts each miss the other's row: one
            # user's starts take turns (SQLite's single writer does this by itself).
            key = f"llm-reservations:{caller.user_id}"
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
        now = datetime.now(UTC)
        mine = IN_FLIGHT.c.user_id == caller.user_id
        conn.execute(delete(IN_FLIGHT).where(mine, IN_FLIGHT.c.created_at < now - STALE))
        reservation: int = conn.execute(
            insert(IN_FLIGHT)
            .values(user_id=caller.user_id, created_at=now)
            .returning(IN_FLIGHT.c.id)
        ).scalar_one()
        in_flight = conn.execute(  # this call included
            select(func.count()).select_from(IN_FLIGHT).where(mine)
        ).scalar_one()
        most = self.settings.llm_max_concurrent_per_user
        if most and in_flight > most:
            raise RateLimited(
                f"concurrency limit: {most} LLM calls in flight at once per user "
                "(BERTH_LLM_MAX_CONCURRENT_PER_USER); try again when one has ended",
                CONCURRENCY_RETRY_S,
            )
        self._check(conn, caller, in_flight - 1)
        return reservation

    def release(self, conn: Connection, reservation: int) -> None:
        conn.execute(delete(IN_FLIGHT).where(IN_FLIGHT.c.id == reservation))

    def _check(self, conn: Connection, caller: Caller, others_in_flight: int) -> None:
        rate, budget = self.settings.llm_rate_limit_per_minute, self.settings.llm_task_token_budget
        if rate:
            since = datetime.now(UTC) - RATE_WINDOW
            recent = conn.execute(
                select(func.count())
                .select_from(CALLS)
                .where(CALLS.c.user_id == caller.user_id, CALLS.c.created_at > since)
            ).scalar_one()
            # Calls still in flight will be rows within the minute: they count already.
            if recent + others_in_flight >= rate:
                raise RateLimited(
                    f"rate limit: {rate} LLM requests a minute per user; try again shortly",
                    int(RATE_WINDOW.total_seconds()),
                )
        self._check_spend(conn, caller, others_in_flight)
        if budget and caller.task_id:
            tokens = CALLS.c.prompt_tokens + CALLS.c.completion_tokens
            spent = conn.execute(
                select(func.coalesce(func.sum(tokens), 0)).where(CALLS.c.task_id == caller.task_id)
            ).scalar_one()
            if spent >= budget:
                raise BudgetExceeded(
                    f"task {caller.task_id} has spent {spent} tokens, its budget is {budget}"
                )

    def spend_limits(self, conn: Connection, user_id: str) -> dict[str, float]:
        """The user's spend limits in USD (an admin's, else the settings'), by name; 0: none."""
        names = ("spend_day_usd", "spend_month_usd")
        row = conn.execute(
            select(LIMITS.c.spend_day_usd, LIMITS.c.spend_month_usd).where(
                LIMITS.c.user_id == user_id
            )
        ).first()
        chosen = tuple(row) if row is not None else (None, None)
        return {
            name: getattr(self.settings, name) if mine is None else mine
            for name, mine in zip(names, chosen, strict=True)
        }

    def _check_spend(self, conn: Connection, caller: Caller, others_in_flight: int) -> None:
        """SpendLimited once what the user spent this day or month, with each other call in
        flight reckoned at the most one call may cost, reaches its limit."""
        limits = self.spend_limits(conn, caller.user_id)
        if not any(limits.values()):
            return
        now = datetime.now(UTC)
        starts = {"spend_day_usd": day_start(now), "spend_month_usd": month_start(now)}
        day = case((CALLS.c.created_at >= starts["spend_day_usd"], CALLS.c.cost_usd), else_=0.0)
        spent_day, spent_month = conn.execute(
            select(
                func.coalesce(func.sum(day), 0.0), func.coalesce(func.sum(CALLS.c.cost_usd), 0.0)
            )
            .where(CALLS.c.user_id == caller.user_id)
            .where(CALLS.c.created_at >= starts["spend_month_usd"])
        ).one()
        reserved = others_in_flight * self.most_per_call_usd()
        spent = {"spend_day_usd": spent_day + reserved, "spend_month_usd": spent_month + reserved}
        for name, value in limits.items():
            if value and spent[name] >= value:
                ends = next_day(now) if name == "spend_day_usd" else next_month(now)
                raise SpendLimited(name, value, spent[name], ends)

    def most_per_call_usd(self) -> float:
        """What one call may cost at most: the dearest model's output price for the largest
        completion a request may ask for (the prompt is not known before the call)."""
        prices = self.settings.llm_prices.values()
        dearest = max((output for _, output in prices), default=0.0)
        return self.settings.llm_max_tokens * dearest / 1_000_000

    def record(
        self, conn: Connection, caller: Caller, result: ChatResult, latency_s: float
    ) -> None:
        spent = TokenUsage() if result.cached else result.usage
        MODEL_CALLS.labels(result.provider, str(result.cached).lower()).inc()
        MODEL_TOKENS.labels(result.provider, "prompt").inc(spent.prompt_tokens)
        MODEL_TOKENS.labels(result.provider, "completion").inc(spent.completion_tokens)
        MODEL_COST.labels(result.provider).inc(spent.cost_usd)
        conn.execute(
            insert(CALLS),
            {
                "user_id": caller.user_id,
                "session_id": caller.session_id,
                "task_id": caller.task_id,
                "provider": result.provider,
                "model": result.model,
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "cost_usd": spent.cost_usd,
                "cached": result.cached,
                "latency_ms": round(latency_s * 1000, 3),
                "created_at": datetime.now(UTC),
            },
        )


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def next_day(now: datetime) -> datetime:
    return day_start(now) + timedelta(days=1)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def next_month(now: datetime) -> datetime:
    start = month_start(now)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


# ---- reading it back


def _sums() -> tuple[Any, ...]:
    return (
        func.count(),
        func.coalesce(func.sum(case((col(LLMCall.cached), 1), else_=0)), 0),
        func.coalesce(func.sum(LLMCall.prompt_tokens), 0),
        func.coalesce(func.sum(LLMCall.completion_tokens), 0),
        func.coalesce(func.sum(LLMCall.cost_usd), 0.0),
    )


def _totals(sums: Sequence[Any]) -> UsageTotals:
    calls, cached, prompt, completion, cost = sums
    return UsageTotals(
        calls=calls,
        cached_calls=cached,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost_usd=round(cost, 6),
    )


def user_usage(db: Session, user_id: str) -> UserUsage:
    """A user's LLM usage: in all, by session, and by task."""
    mine = LLMCall.user_id == user_id
    total = db.exec(select(*_sums()).where(mine)).one()
    sessions = db.exec(
        select(LLMCall.session_id, *_sums())
        .where(mine, col(LLMCall.session_id).is_not(None))
        .group_by(col(LLMCall.session_id))
    ).all()
    tasks = db.exec(
        select(LLMCall.session_id, LLMCall.task_id, *_sums())
        .where(mine, col(LLMCall.task_id).is_not(None))
        .group_by(col(LLMCall.session_id), col(LLMCall.task_id))
    ).all()
    return UserUsage(
        user_id=user_id,
        total=_totals(total),
        sessions=[SessionUsage(session_id=r[0], **_totals(r[1:]).model_dump()) for r in sessions],
        tasks=[
            TaskUsage(session_id=r[0], task_id=r[1], **_totals(r[2:]).model_dump()) for r in tasks
        ],
    )


def task_usage(db: Session, task_id: str) -> UsageTotals:
    return _totals(db.exec(select(*_sums()).where(LLMCall.task_id == task_id)).one())

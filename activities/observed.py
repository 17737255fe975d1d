"""Every activity observed the same way, by a worker interceptor: its duration in the
activity histogram (by outcome), its failures counted by kind, and its log lines marked with
the session, task and step it works for (read from its input)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from telemetry import logs
from telemetry.metrics import ACTIVITY_SECONDS, ERRORS

log = logging.getLogger("berth.activity")


def subject(arg: Any) -> dict[str, Any]:
    """The session, task and step an activity's input is about (what it has of them)."""
    sandbox = getattr(arg, "sandbox", None)
    return {
        "session": getattr(arg, "session_id", None) or getattr(sandbox, "session_id", None),
        "task": getattr(arg, "task_id", None),
        "step": getattr(arg, "index", None),
    }


def kind(exc: BaseException) -> str:
    """An error's kind: an application error's type, else its class's name."""
    if isinstance(exc, ApplicationError) and exc.type:
        return exc.type
    return type(exc).__name__


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        started = time.perf_counter()
        outcome = "ok"
        with logs.about(**subject(input.args[0] if input.args else None)):
            try:
                return await self.next.execute_activity(input)
            except asyncio.CancelledError:
                outcome = "cancelled"  # asked for (or the worker stopping): not an error
                raise
            except BaseException as exc:
                outcome = kind(exc)
                ERRORS.labels(outcome).inc()
                raise
            finally:
                took = time.perf_counter() - started
                ACTIVITY_SECONDS.labels(name, outcome).observe(took)
                # Its kind, never its message: a refusal's names the command.
                level = logging.INFO if outcome in ("ok", "cancelled") else logging.WARNING
                log.log(level, "activity %s: %s in %.3f s", name, outcome, took)


class Observed(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)

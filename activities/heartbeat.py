"""Heartbeating for long activities, so Temporal notices a dead worker and delivers
cancellation promptly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from temporalio import activity


@contextlib.asynccontextmanager
async def heartbeating(
    details: Callable[[], Any] = lambda: None, every_s: float = 2.0
) -> AsyncIterator[None]:
    async def beat() -> None:
        while True:
            activity.heartbeat(details())
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

"""Heartbeating for long activities, so Temporal notices a dead worker and delivers
cancellation promptly (it reaches an activity only through a heartbeat's answer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity


@contextlib.asynccontextmanager
async def heartbeating(every_s: float = 0.5) -> AsyncIterator[None]:
    # The SDK sends at most one heartbeat per throttle interval (the host worker sets it to
    # one second), so beating often costs nothing and a cancellation arrives within ~1 s.
    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

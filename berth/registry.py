"""This host in the host registry (store/hosts.py): what it can hold and holds, written by
its worker every BERTH_HOST_HEARTBEAT_S, and the state operators give it read back.

The heartbeat is a task of the worker process, not a periodic Temporal activity: what it
must prove is that the process polling this host's task queue is alive, which that process
says best itself; an activity would need a workflow per host to schedule it, a history
growing by a few events every few seconds, and would fall silent while Temporal is away
though the host is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session

import vm_templates
from config.settings import Settings
from sandboxes.provider import SandboxProvider
from store.hosts import HostReport, beat
from store.models import HostState
from workflows.pool import pool_member

log = logging.getLogger("berth.registry")

MEMINFO = Path("/proc/meminfo")
OnChange = Callable[[HostState], Awaitable[None]]


def memory_mb(meminfo: str) -> tuple[int, int]:
    """The host's memory and the part of it available, in MiB, from /proc/meminfo's text."""
    fields = {
        name: int(rest.split()[0]) // 1024
        for name, _, rest in (line.partition(":") for line in meminfo.splitlines())
        if rest.strip()
    }
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


async def report(settings: Settings, provider: SandboxProvider, started_at: datetime) -> HostReport:
    machines = await provider.machines()
    members = [member for m in machines if (member := pool_member(m.session_id))]
    total, available = memory_mb(await asyncio.to_thread(MEMINFO.read_text))
    return HostReport(
        id=settings.host_id,
        task_queue=settings.host_task_queue,
        provider=settings.sandbox_provider,
        accel=provider.accel(),
        vcpus=os.cpu_count() or 1,
        memory_mb=total,
        memory_available_mb=available,
        load1=round(os.getloadavg()[0], 2),
        machines=len(machines) - len(members),
        max_machines=settings.vm_max_running if settings.sandbox_provider == "libvirt" else None,
        warm=dict(Counter(template for template, _ in members)),
        templates=vm_templates.names(),
        started_at=started_at,
    )


def _beat(engine: Engine, this: HostReport) -> HostState:
    with Session(engine) as db:
        return beat(db, this)


async def register(
    settings: Settings, engine: Engine, provider: SandboxProvider, started_at: datetime
) -> HostState:
    """The first beat: this host in the registry (active if new), and its state."""
    return await asyncio.to_thread(_beat, engine, await report(settings, provider, started_at))


async def heartbeat_forever(
    settings: Settings,
    engine: Engine,
    provider: SandboxProvider,
    started_at: datetime,
    state: HostState,
    on_change: OnChange,
    stop: asyncio.Event,
) -> None:
    """Report this host every BERTH_HOST_HEARTBEAT_S until ``stop``, and ``on_change(now)``
    when the state an operator gave it changes. A failed beat is logged and the next one
    tries again: a host silent for long enough reads as lost, which is then true."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.host_heartbeat_s)
        if stop.is_set():
            return
        try:
            now = await register(settings, engine, provider, started_at)
        except Exception:
            log.exception("host %s: heartbeat not written", settings.host_id)
            continue
        if now != state:
            log.info("host %s is %s (was %s)", settings.host_id, now, state)
            try:
                await on_change(now)
            except Exception:
                log.exception("host %s: not acted on yet; again next beat", settings.host_id)
                continue
            state = now

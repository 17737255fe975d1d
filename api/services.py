"""A session's services (long-running commands a ``service`` step started: see
guest_agent/services.py) for its owner: list them, read one's output, stop one. Each is a
channel to the session's guest (api/guest_link.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel

from api.deps import Problem
from api.guest_link import guest_channel
from config.settings import Settings
from sandboxes.models import SERVICE_NAME


class ServiceOut(BaseModel):
    name: str
    command: str
    pid: int
    started_at: datetime
    running: bool
    exit_code: int | None = None
    stopped: bool = False  # by a stop (a person's or the agent's), not by itself


def checked_name(name: str) -> str:
    if not re.fullmatch(SERVICE_NAME, name):
        raise Problem(404, f"no service {name[:40]!r}")
    return name


def _out(found: dict[str, object]) -> ServiceOut:
    started = found.get("started_at")
    when = datetime.fromtimestamp(started if isinstance(started, int | float) else 0, UTC)
    return ServiceOut.model_validate({**found, "started_at": when})


async def listing(settings: Settings, sandbox_id: str) -> list[ServiceOut]:
    async with guest_channel(settings, sandbox_id, "service", {"op": "list"}) as link:
        found = await link.result()
    return [_out(service) for service in found.get("services", [])]


async def output(settings: Settings, sandbox_id: str, name: str) -> str:
    """The newest of what the service printed (the guest keeps a bounded tail)."""
    args = {"op": "output", "name": checked_name(name)}
    async with guest_channel(settings, sandbox_id, "service", args) as link:
        data = b"".join([chunk async for chunk in link.chunks()])
    return data.decode(errors="replace")


async def stop(settings: Settings, sandbox_id: str, name: str) -> ServiceOut:
    args = {"op": "stop", "name": checked_name(name)}
    async with guest_channel(settings, sandbox_id, "service", args) as link:
        return _out(await link.result())

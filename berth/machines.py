"""``python -m berth machines [--prune] [--older-than AGE]``: every Berth machine on this host
(Docker containers and libvirt domains named ``berth-*``), whichever install made it, by
install, session and age.

A session's machine outlives its worker on purpose (a restart re-adopts it), but one whose
install's data dir is gone is never found again: no worker reconciles it. ``--prune`` removes
those (and, with ``--older-than``, every machine older than that), saying what it removed and
why. A machine made before machines carried their install shows it as unknown and is pruned
only by age.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libvirt

from config.settings import Settings
from sandboxes.docker import DockerError, docker
from sandboxes.docker import every_machine as docker_machines
from sandboxes.libvirt import discard
from sandboxes.libvirt import every_machine as libvirt_machines
from sandboxes.models import HostMachine

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE = re.compile(r"^(\d+)([smhdw])$")
UNKNOWN = "(unknown install)"

Say = Callable[[str], None]


def parse_age(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``2d``, ``1w``."""
    found = AGE.match(text.strip())
    if found is None:
        raise ValueError(f"not an age: {text!r} (say e.g. 30m, 12h, 2d)")
    return timedelta(seconds=int(found[1]) * UNITS[found[2]])


def age_of(machine: HostMachine, now: datetime) -> timedelta:
    return now - machine.created_at


def shown(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit]:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def install_gone(machine: HostMachine) -> bool:
    return bool(machine.install) and not Path(machine.install).exists()


def why_prune(machine: HostMachine, older_than: timedelta | None, now: datetime) -> str | None:
    """Why the machine goes, or None (it stays)."""
    if install_gone(machine):
        return f"its install {machine.install} is gone"
    age = age_of(machine, now)
    if older_than is not None and age > older_than:
        return f"older than {shown(older_than)} ({shown(age)})"
    return None


async def inventory(settings: Settings, say: Say) -> list[HostMachine]:
    """Every Berth machine of the Docker engine and the libvirt daemon; one that cannot be
    asked is said and skipped."""
    found: list[HostMachine] = []
    try:
        found += await docker_machines()
    except (DockerError, OSError) as exc:
        say(f"Docker not asked: {exc}")
    try:
        found += await asyncio.to_thread(libvirt_machines, settings.libvirt_uri)
    except libvirt.libvirtError as exc:
        say(f"libvirt ({settings.libvirt_uri}) not asked: {str(exc).strip()}")
    return found


async def remove(settings: Settings, machine: HostMachine) -> None:
    if machine.kind == "docker":
        await docker("rm", "--force", machine.handle)
    else:
        await asyncio.to_thread(discard, settings.libvirt_uri, machine)


def report(machines: list[HostMachine], now: datetime, say: Say) -> None:
    """The machines by install: each one's kind, name, session, host, state and age."""
    by_install: dict[str, list[HostMachine]] = {}
    for machine in machines:
        by_install.setdefault(machine.install or UNKNOWN, []).append(machine)
    for install, group in sorted(by_install.items()):
        gone = " (gone)" if group[0].install and install_gone(group[0]) else ""
        say(f"{install}{gone}: {len(group)} machine{'s' * (len(group) != 1)}")
        for m in sorted(group, key=lambda m: m.created_at):
            say(
                f"  {m.kind:8} {m.name:40} session {m.session_id or '?':34} host "
                f"{m.host_id or '?':16} {m.state:12} {shown(age_of(m, now))}"
            )
    if not machines:
        say("no Berth machines on this host")


async def machines(
    settings: Settings, prune: bool, older_than: timedelta | None, say: Say = print
) -> int:
    """List (and prune); 1 if a machine to prune could not be removed."""
    now = datetime.now(UTC)
    found = await inventory(settings, say)
    report(found, now, say)
    if not prune:
        return 0
    failed = 0
    doomed = [(m, why) for m in found if (why := why_prune(m, older_than, now)) is not None]
    for machine, why in doomed:
        try:
            await remove(settings, machine)
        except Exception as exc:  # said, and the others still go
            failed += 1
            say(f"could not remove {machine.kind} {machine.name}: {exc}")
            continue
        say(f"removed {machine.kind} {machine.name} (session {machine.session_id}): {why}")
    if not doomed:
        say("nothing to prune")
    return 1 if failed else 0

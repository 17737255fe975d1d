"""Services: long-running commands a step starts that outlive it (a web app for the user to
see), run as the step user like any step's command, each in a process group of its own.

A service's output is kept in the guest, its newest MAX_OUTPUT_CHARS, for the dashboard to
show. A service is never restarted: once it exits it stays listed with its exit code. They
all end with the machine, which ends with its session.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from guest_agent.hands import Send
from guest_agent.protocol import MAX_DATA_BYTES, Close, Data
from guest_agent.terminal import ENTER
from guest_agent.user import StepUser, clean_environment

MAX_SERVICES = 16  # running at once
MAX_OUTPUT_CHARS = 256 * 1024
# A stop: SIGTERM to the group, then SIGKILL once this long has passed.
STOP_GRACE_S = 5.0
# A start waits this long: a service that ends within it failed to start, and says why.
SETTLE_S = 1.0


class ServiceRefused(Exception):
    """A service that cannot be started or stopped, with the reason."""


@dataclass
class Service:
    name: str
    command: str
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    exit_code: int | None = None
    stopped: bool = False  # by a stop, not by itself
    chunks: deque[str] = field(default_factory=deque)
    kept: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def keep(self, text: str) -> None:
        self.chunks.append(text)
        self.kept += len(text)
        while self.kept > MAX_OUTPUT_CHARS and len(self.chunks) > 1:
            self.kept -= len(self.chunks.popleft())
        self.changed.set()

    def output(self) -> str:
        return "".join(self.chunks)[-MAX_OUTPUT_CHARS:]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "pid": self.process.pid,
            "started_at": self.started_at,
            "running": self.exit_code is None,
            "exit_code": self.exit_code,
            "stopped": self.stopped,
        }


class Services:
    """The machine's services, by name (s1, s2, ... in the order they started)."""

    def __init__(self, workdir: str, user: StepUser | None) -> None:
        self.workdir, self.user = workdir, user
        self.known: dict[str, Service] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, command: str) -> Service:
        running = [s for s in self.known.values() if s.exit_code is None]
        if len(running) >= MAX_SERVICES:
            raise ServiceRefused(f"at most {MAX_SERVICES} services run at once: stop one first")
        argv = ["/bin/bash", "-c", command]
        if self.user is not None:
            argv = self.user.command(["/bin/bash", "-c", ENTER, self.workdir, command])
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd="/" if self.user is not None else self.workdir,
                env=self.user.environment() if self.user else clean_environment(self.workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: a stop takes its children too
            )
        except OSError as exc:
            raise ServiceRefused(f"cannot start the service: {exc}") from None
        service = Service(f"s{len(self.known) + 1}", command, process)
        self.known[service.name] = service
        task = asyncio.create_task(self._follow(service))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return service

    async def _follow(self, service: Service) -> None:
        """Keep its output until it ends, then its exit code."""
        assert service.process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await service.process.stdout.read(64 * 1024):
            service.keep(decoder.decode(chunk))
        service.exit_code = await service.process.wait()
        service.changed.set()

    async def stop(self, name: str) -> Service:
        service = self.known.get(name)
        if service is None:
            raise ServiceRefused(f"no service {name}")
        if service.exit_code is None:
            service.stopped = True
            _signal(service, signal.SIGTERM)
            try:
                await asyncio.wait_for(service.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                _signal(service, signal.SIGKILL)
                await service.process.wait()
            _signal(service, signal.SIGKILL)  # what it left running in its group
        return service

    def listing(self) -> list[dict[str, Any]]:
        return [service.describe() for service in self.known.values()]

    async def serve(self, channel: str, args: dict[str, Any], send: Send) -> None:
        """A person's operation on the services (a channel's: see protocol.py): ``list``,
        ``output`` (sent as data), ``stop``; its close is always sent."""
        op, name = args.get("op"), str(args.get("name", ""))
        try:
            if op == "list":
                result: dict[str, Any] = {"services": self.listing()}
            elif op == "output":
                service = self.known.get(name)
                if service is None:
                    raise ServiceRefused(f"no service {name}")
                text = service.output().encode()
                for start in range(0, len(text), MAX_DATA_BYTES):
                    await send(Data(channel, text[start : start + MAX_DATA_BYTES]))
                result = service.describe()
            elif op == "stop":
                result = (await self.stop(name)).describe()
            else:
                raise ServiceRefused(f"unknown service operation {op!r}")
        except ServiceRefused as exc:
            await send(Close(channel, error=f"missing: {exc}"))
        else:
            await send(Close(channel, result=result))


def _signal(service: Service, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.process.pid, number)


async def run_step(
    services: Services, say: Callable[[str], Awaitable[None]], step: dict[str, Any]
) -> tuple[int, str | None, dict[str, Any]]:
    """A service step: start or stop one. Its exit code, error and result (the name)."""
    try:
        if step.get("action") == "stop":
            stopped = await services.stop(str(step.get("name", "")))
            await say(f"service {stopped.name} stopped")
            return 0, None, {"content": stopped.name}
        service = await services.start(str(step.get("command", "")))
    except ServiceRefused as exc:
        return 1, str(exc), {}
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(service.process.wait()), SETTLE_S)
    early = service.output()
    if early:
        await say(early.removesuffix("\n"))
    if service.process.returncode is not None:
        code = service.process.returncode
        return code or 1, f"the service ended at once (exit code {code})", {}
    await say(f"service {service.name} started (pid {service.process.pid}): it runs on")
    return 0, None, {"content": service.name}

"""The guest's connection to the backend: dial out, say hello, serve steps, redial.

Steps belong to the agent, not to a connection: they keep running while the link is down,
and the backend re-attaches to them by id once the guest is back.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import websockets

from guest_agent import checks, files, ports, protocol, services, shells
from guest_agent.chromium import chromium_path
from guest_agent.execution import Execution
from guest_agent.hands import Hands
from guest_agent.pinning import SECURE_SCHEME, check_peer, client_context
from guest_agent.protocol import (
    Artifact,
    Cancel,
    Clock,
    Close,
    Data,
    Exec,
    Exit,
    Hello,
    Open,
    Output,
    ProtocolError,
    Welcome,
)
from guest_agent.terminal import run_command
from guest_agent.user import StepUser

if TYPE_CHECKING:  # Playwright is optional in the guest
    from guest_agent.browser import Browser, Ran

log = logging.getLogger("guest_agent")

# Finished steps remembered for late re-attachment; the oldest are forgotten first.
MAX_REMEMBERED = 256


class Link(Protocol):
    async def send(self, message: str) -> None: ...


@dataclass(frozen=True)
class GuestConfig:
    url: str
    sandbox_id: str
    token: str
    workdir: str = "/root"
    # The SHA-256 of the gateway's certificate: required for a wss:// url (see pinning.py).
    gateway_sha256: str | None = None
    # Whom steps run as; None: as the agent itself (an agent run by hand, the tests').
    user: StepUser | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


class GuestAgent:
    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.executions: OrderedDict[str, Execution] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.welcomed = False  # by the gateway, on the current link
        self.browser = load_browser(config.user)
        self.capabilities = ["terminal", "file"] + (["browser"] if self.browser else [])
        self.capabilities += ["service", protocol.CHANNELS]
        self.hands = Hands(config.workdir, config.user)
        self.services = services.Services(config.workdir, config.user)
        self.shells = shells.Shells(config.workdir, config.user)

    async def close(self) -> None:
        """Stop the browser, if one was started."""
        if self.browser is not None:
            await self.browser.close()

    async def run_forever(self) -> None:
        delay = self.config.backoff_initial_s
        while True:
            self.welcomed = False
            try:
                await self.serve_once()
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.warning("link to %s lost: %s", self.config.url, exc)
            if self.welcomed:
                # A link that was up resets it, however it ended (a machine resumed from
                # hibernation finds its link dead): the host counts a guest gone long as
                # silent, so one that was in touch comes back at once.
                delay = self.config.backoff_initial_s
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.backoff_max_s)

    async def serve_once(self) -> None:
        """One connection, from hello until it closes."""
        secure = self.config.url.startswith(f"{SECURE_SCHEME}://")
        async with websockets.connect(
            self.config.url,
            open_timeout=10,
            ping_interval=5,
            ping_timeout=10,
            max_size=None,
            ssl=client_context() if secure else None,
        ) as ws:
            if secure:
                check_peer(ws.transport, self.config.gateway_sha256)  # before the token goes
            hello = Hello(
                sandbox_id=self.config.sandbox_id,
                token=self.config.token,
                capabilities=tuple(self.capabilities),
            )
            await ws.send(hello.encode())
            log.info("connected to %s", self.config.url)
            pumps: dict[str, asyncio.Task[None]] = {}
            channels: dict[str, asyncio.Queue[Data | Close]] = {}
            try:
                async for raw in ws:
                    self.welcomed = True
                    self._handle(raw, ws, pumps, channels)
            finally:
                # A channel is the link's: its operation ends with it (unlike a step).
                for pump in pumps.values():
                    pump.cancel()
                for inbox in channels.values():
                    inbox.put_nowait(Close("", error="link lost"))

    def _open(
        self, frame: Open, link: Link, channels: dict[str, asyncio.Queue[Data | Close]]
    ) -> None:
        """Serve a channel the backend opened, until its operation ends."""
        if frame.channel in channels:
            return
        inbox: asyncio.Queue[Data | Close] = asyncio.Queue()
        channels[frame.channel] = inbox

        async def send(reply: Data | Close) -> None:
            await link.send(reply.encode())

        async def serve() -> None:
            try:
                if frame.kind == "service":
                    await self.services.serve(frame.channel, frame.args, send)
                elif frame.kind == "port":
                    await ports.serve(frame.channel, frame.args, inbox, send)
                elif frame.kind == "pty":
                    await self.shells.serve(frame.channel, frame.args, inbox, send)
                else:
                    await self.hands.serve(frame.channel, frame.args, inbox, send)
            except Exception:  # a link lost mid-way, say: the operation is over
                log.exception("channel %s failed", frame.channel[:64])
            finally:
                channels.pop(frame.channel, None)

        task = asyncio.create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle(
        self,
        raw: str | bytes,
        link: Link,
        pumps: dict[str, asyncio.Task[None]],
        channels: dict[str, asyncio.Queue[Data | Close]],
    ) -> None:
        try:
            frame = protocol.parse(raw)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message: %s", exc)
            return
        if isinstance(frame, Exec):
            execution = self._start(frame)
            old = pumps.pop(execution.exec_id, None)
            if old is not None:
                old.cancel()
            pumps[execution.exec_id] = asyncio.create_task(
                self._pump(execution, frame.after_seq, link)
            )
        elif isinstance(frame, Cancel):
            known = self.executions.get(frame.exec_id)
            if known is not None:
                known.kill()
        elif isinstance(frame, Open):
            self._open(frame, link, channels)
        elif isinstance(frame, Data | Close):
            inbox = channels.get(frame.channel)
            if inbox is not None:
                inbox.put_nowait(frame)
        elif isinstance(frame, Clock):
            try:
                time.clock_settime(time.CLOCK_REALTIME, frame.time)
            except OSError as exc:  # a container shares the host's clock, and may not set it
                log.info("clock not set: %s", exc)
        elif not isinstance(frame, Welcome):
            log.warning("ignoring a %s message: the backend sends none", frame.TYPE)

    def _start(self, frame: Exec) -> Execution:
        known = self.executions.get(frame.exec_id)
        if known is not None:
            return known
        execution = Execution(exec_id=frame.exec_id, timeout_s=frame.timeout_s)
        self.executions[frame.exec_id] = execution
        while len(self.executions) > MAX_REMEMBERED:
            oldest = next(iter(self.executions.values()))
            if not oldest.finished:
                break
            self.executions.popitem(last=False)
        task = asyncio.create_task(self._perform(execution, frame.step))
        self._tasks.add(task)  # keep a reference: the step outlives its connection
        task.add_done_callback(self._tasks.discard)
        return execution

    async def _perform(self, execution: Execution, step: dict[str, Any]) -> None:
        """Run the step, check it, and finish its execution (which sends its exit)."""
        facts = checks.Facts(exit_code=0, output="", workdir=self.config.workdir)
        error: str | None
        try:
            if execution.killed:  # cancelled before it could start: do not start it at all
                code, error = -signal.SIGKILL, "cancelled before it started"
            elif step.get("kind") == "terminal":
                cwd = str(step.get("cwd") or self.config.workdir)
                code, error = await run_command(
                    execution, str(step["command"]), cwd, self.config.user
                )
            else:
                work = self._other(execution, step, facts)
                code, error = await self._within_timeout(execution, work)
        except Exception as exc:  # whatever broke, the step ends and says so: no hang
            log.exception("step %s failed in the guest", execution.exec_id)
            code, error = 1, f"the guest failed to run the step: {exc}"
        facts.exit_code, facts.output = code, execution.output()
        execution.check = await checks.evaluate(step.get("check"), facts, self.config.user)
        await execution.finish(code, error)

    async def _other(
        self, execution: Execution, step: dict[str, Any], facts: checks.Facts
    ) -> tuple[int, str | None]:
        """A file or browser step: exit code 1 with the reason when it could not be done."""
        kind = step.get("kind")
        if kind == "file":
            try:
                execution.result = await files.run(
                    execution, step, self.config.workdir, self.config.user
                )
            except files.Refused as exc:
                return 1, str(exc)
            return 0, None
        if kind == "service":
            code, error, execution.result = await services.run_step(
                self.services, execution.say, step
            )
            return code, error
        if kind == "browser" and self.browser is not None:
            check = step.get("check") or {}
            ran = await self.browser.run(execution, step, check.get("kind") == "page_text_contains")
            execution.result = ran.result
            facts.url, facts.page_text = ran.result.get("url"), ran.page_text
            return (1 if ran.error else 0), ran.error
        return 127, f"this guest cannot run {kind} steps (it runs {', '.join(self.capabilities)})"

    @staticmethod
    async def _within_timeout(
        execution: Execution, work: Coroutine[Any, Any, tuple[int, str | None]]
    ) -> tuple[int, str | None]:
        """Run ``work`` until it ends, times out, or the step is killed (which cancels it)."""
        task = asyncio.ensure_future(work)
        execution.on_kill = task.cancel
        try:
            return await asyncio.wait_for(task, execution.timeout_s)
        except TimeoutError:
            execution.timed_out = True
            return protocol.EXIT_TIMED_OUT, None
        except asyncio.CancelledError:
            if not execution.killed:
                raise  # the agent itself is stopping
            return -signal.SIGKILL, "cancelled"

    async def _pump(self, execution: Execution, after: int, link: Link) -> None:
        """Send the step's output after ``after``, then its artifacts and exit, over one
        connection."""
        while True:
            async with execution.changed:
                await execution.changed.wait_for(partial(_has_news, execution, after))
                batch = execution.lines_after(after)
                finished = execution.finished
            exec_id = execution.exec_id
            for line in batch:
                output = Output(exec_id, line.seq, line.stream, line.text, after_seq=after)
                await link.send(output.encode())
                after = line.seq
            if finished and not execution.lines_after(after):
                for kept in execution.artifacts:
                    artifact = Artifact(exec_id, kept.name, kept.media_type, kept.data, after)
                    await link.send(artifact.encode())
                await link.send(_exit(execution, after).encode())
                return


class LazyBrowser:
    """The guest's browser, made at the first browser step: importing Playwright takes
    seconds under TCG, which every VM's start would pay for nothing."""

    def __init__(self, executable: str, user: StepUser | None) -> None:
        self.executable, self.user = executable, user
        self._browser: Browser | None = None

    async def run(self, execution: Execution, step: dict[str, Any], want_text: bool) -> Ran:
        if self._browser is None:
            from guest_agent.browser import Browser

            self._browser = Browser(self.executable, self.user)
        return await self._browser.run(execution, step, want_text)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.close()


def load_browser(user: StepUser | None) -> LazyBrowser | None:
    """The guest's browser, if Playwright is installed and a Chromium is there; else None."""
    if importlib.util.find_spec("playwright") is None:
        return None
    executable = chromium_path()
    return LazyBrowser(executable, user) if executable else None


def _exit(execution: Execution, after: int) -> Exit:
    """The exit frame of a finished step."""
    if execution.exit_code is None:
        raise ValueError(f"step {execution.exec_id} has not finished")
    return Exit(
        exec_id=execution.exec_id,
        exit_code=execution.exit_code,
        timed_out=execution.timed_out,
        error=execution.error,
        check=execution.check,
        result=execution.result,
        after_seq=after,
        started=execution.started,
        ended=execution.ended,
    )


def _has_news(execution: Execution, after: int) -> bool:
    return execution.finished or bool(execution.lines_after(after))

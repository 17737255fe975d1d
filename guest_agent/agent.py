"""The guest's connection to the backend: dial out, say hello, serve commands, redial.

Commands belong to the agent, not to a connection: they keep running while the link is
down, and the backend re-attaches to them by id once the guest is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import websockets

from guest_agent import protocol
from guest_agent.terminal import Execution

log = logging.getLogger("guest_agent")

# Finished commands remembered for late re-attachment; the oldest are forgotten first.
MAX_REMEMBERED = 256


class Link(Protocol):
    async def send(self, message: str) -> None: ...


@dataclass(frozen=True)
class GuestConfig:
    url: str
    sandbox_id: str
    token: str
    workdir: str = "/root"
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


class GuestAgent:
    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.executions: OrderedDict[str, Execution] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run_forever(self) -> None:
        delay = self.config.backoff_initial_s
        while True:
            try:
                await self.serve_once()
                delay = self.config.backoff_initial_s  # a session that was up resets it
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.warning("link to %s lost: %s", self.config.url, exc)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.backoff_max_s)

    async def serve_once(self) -> None:
        """One connection, from hello until it closes."""
        async with websockets.connect(
            self.config.url, open_timeout=10, ping_interval=5, ping_timeout=10, max_size=None
        ) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": protocol.HELLO,
                        "version": protocol.PROTOCOL_VERSION,
                        "sandbox_id": self.config.sandbox_id,
                        "token": self.config.token,
                        "capabilities": ["terminal"],
                    }
                )
            )
            log.info("connected to %s", self.config.url)
            pumps: dict[str, asyncio.Task[None]] = {}
            try:
                async for raw in ws:
                    self._handle(json.loads(raw), ws, pumps)
            finally:
                for pump in pumps.values():
                    pump.cancel()

    def _handle(
        self, message: dict[str, Any], link: Link, pumps: dict[str, asyncio.Task[None]]
    ) -> None:
        kind = message.get("type")
        if kind == protocol.EXEC:
            execution = self._start(message)
            old = pumps.pop(execution.exec_id, None)
            if old is not None:
                old.cancel()
            pumps[execution.exec_id] = asyncio.create_task(
                self._pump(execution, int(message.get("after_seq", 0)), link)
            )
        elif kind == protocol.CANCEL:
            known = self.executions.get(message["exec_id"])
            if known is not None:
                known.kill()
        elif kind != protocol.WELCOME:
            log.warning("ignoring unknown message type %r", kind)

    def _start(self, message: dict[str, Any]) -> Execution:
        exec_id = message["exec_id"]
        known = self.executions.get(exec_id)
        if known is not None:
            return known
        step = message["step"]
        execution = Execution(
            exec_id=exec_id, command=step["command"], timeout_s=float(message["timeout_s"])
        )
        self.executions[exec_id] = execution
        while len(self.executions) > MAX_REMEMBERED:
            oldest = next(iter(self.executions.values()))
            if not oldest.finished:
                break
            self.executions.popitem(last=False)
        task = asyncio.create_task(execution.run(step.get("cwd") or self.config.workdir))
        self._tasks.add(task)  # keep a reference: the command outlives its connection
        task.add_done_callback(self._tasks.discard)
        return execution

    async def _pump(self, execution: Execution, after: int, link: Link) -> None:
        """Send the command's output after ``after``, then its exit, over one connection."""
        while True:
            async with execution.changed:
                await execution.changed.wait_for(partial(_has_news, execution, after))
                batch = execution.lines_after(after)
                finished = execution.finished
            for line in batch:
                await link.send(
                    json.dumps(
                        {
                            "type": protocol.OUTPUT,
                            "exec_id": execution.exec_id,
                            "seq": line.seq,
                            "after_seq": after,
                            "stream": line.stream,
                            "text": line.text,
                        }
                    )
                )
                after = line.seq
            if finished and not execution.lines_after(after):
                await link.send(
                    json.dumps(
                        {
                            "type": protocol.EXIT,
                            "exec_id": execution.exec_id,
                            "exit_code": execution.exit_code,
                            "timed_out": execution.timed_out,
                            "error": execution.error,
                            "after_seq": after,
                        }
                    )
                )
                return


def _has_news(execution: Execution, after: int) -> bool:
    return execution.finished or bool(execution.lines_after(after))

"""Terminal commands, run in their own process group, with output kept for re-attachment."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
from dataclasses import dataclass, field

from guest_agent.protocol import EXIT_TIMED_OUT, MAX_OUTPUT_CHUNK

# Output kept per command for replay after a reconnect; older lines are dropped first.
MAX_KEPT_LINES = 20_000


@dataclass
class Line:
    seq: int
    stream: str
    text: str


@dataclass
class Execution:
    """One command. Output and exit survive the connection that started it."""

    exec_id: str
    command: str
    timeout_s: float
    lines: list[Line] = field(default_factory=list)
    exit_code: int | None = None
    timed_out: bool = False
    error: str | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _next_seq: int = 1
    _process: asyncio.subprocess.Process | None = None
    _killed: bool = False

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    def lines_after(self, seq: int) -> list[Line]:
        if not self.lines or self.lines[-1].seq <= seq:
            return []
        start = max(0, seq - self.lines[0].seq + 1)
        return self.lines[start:]

    async def run(self, workdir: str) -> None:
        if self._killed:  # cancelled before it could start: do not start it at all
            await self._finish(-signal.SIGKILL, error="cancelled before it started")
            return
        try:
            self._process = await asyncio.create_subprocess_exec(
                "/bin/bash",
                "-c",
                self.command,
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, so a kill takes children too
                limit=MAX_OUTPUT_CHUNK,
            )
        except OSError as exc:
            await self._finish(127, error=f"cannot start command: {exc}")
            return
        if self._killed:
            self.kill()  # cancelled while the process was being started
        process = self._process
        assert process.stdout is not None and process.stderr is not None
        readers = asyncio.gather(
            self._read(process.stdout, "stdout"), self._read(process.stderr, "stderr")
        )
        try:
            await asyncio.wait_for(asyncio.shield(readers), self.timeout_s)
        except TimeoutError:
            self.timed_out = True
            self.kill()
            await readers
        code = await process.wait()
        await self._finish(EXIT_TIMED_OUT if self.timed_out else code)

    def kill(self) -> None:
        self._killed = True
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)

    async def _read(self, stream: asyncio.StreamReader, name: str) -> None:
        # Incremental, so that a character cut by a split of an overlong line stays whole.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                chunk = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                chunk = exc.partial  # the last line had no newline, or EOF
            except asyncio.LimitOverrunError as exc:
                # An overlong line, in pieces; the buffer may hold more than the limit.
                chunk = await stream.read(min(exc.consumed, MAX_OUTPUT_CHUNK))
            text = decoder.decode(chunk, final=not chunk)
            if text:
                await self._append(name, text)
            if not chunk:
                return

    async def _append(self, stream: str, text: str) -> None:
        async with self.changed:
            self.lines.append(Line(self._next_seq, stream, text))
            self._next_seq += 1
            if len(self.lines) > MAX_KEPT_LINES:
                del self.lines[: len(self.lines) - MAX_KEPT_LINES]
            self.changed.notify_all()

    async def _finish(self, code: int, error: str | None = None) -> None:
        async with self.changed:
            self.exit_code = code
            self.error = error
            self.changed.notify_all()

"""One step in the guest, whatever its kind: its output, artifacts and end, kept for
re-attachment after a reconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest_agent.protocol import MAX_OUTPUT_CHUNK

# Output kept per step for replay after a reconnect, in lines and in characters (a command
# printing a gigabyte must not grow the root agent past its machine's memory); older lines
# are dropped first.
MAX_KEPT_LINES = 20_000
MAX_KEPT_CHARS = 8 * 1024 * 1024
# Characters per output piece: even at 4 bytes each, a piece fits MAX_OUTPUT_CHUNK.
PIECE_CHARS = MAX_OUTPUT_CHUNK // 4


@dataclass
class Line:
    seq: int
    stream: str
    text: str


@dataclass
class Artifact:
    name: str
    media_type: str
    data: bytes


@dataclass
class Execution:
    """One step. Output, artifacts and exit survive the connection that started it."""

    exec_id: str
    timeout_s: float
    lines: list[Line] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    exit_code: int | None = None
    timed_out: bool = False
    error: str | None = None
    # The check's outcome ({kind, ok, detail}) and the step's result, sent with the exit.
    check: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # Set by whatever runs the step: how to stop it at once (kill a process group, cancel).
    on_kill: Callable[[], object] | None = None
    killed: bool = False
    # When it was made and when it finished (wall clock, seconds): its span, on the host.
    started: float = field(default_factory=time.time)
    ended: float | None = None
    _next_seq: int = 1
    _kept_chars: int = 0

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    def lines_after(self, seq: int) -> list[Line]:
        if not self.lines or self.lines[-1].seq <= seq:
            return []
        start = max(0, seq - self.lines[0].seq + 1)
        return self.lines[start:]

    def output(self) -> str:
        """The output kept, both streams in order, for the step's check."""
        return "".join(line.text for line in self.lines)

    def kill(self) -> None:
        self.killed = True
        if self.on_kill is not None:
            self.on_kill()

    async def append(self, stream: str, text: str) -> None:
        async with self.changed:
            self.lines.append(Line(self._next_seq, stream, text))
            self._next_seq += 1
            self._kept_chars += len(text)
            drop = 0  # the oldest lines past either bound; the newest is always kept
            while len(self.lines) - drop > MAX_KEPT_LINES or (
                self._kept_chars > MAX_KEPT_CHARS and drop < len(self.lines) - 1
            ):
                self._kept_chars -= len(self.lines[drop].text)
                drop += 1
            del self.lines[:drop]
            self.changed.notify_all()

    async def say(self, text: str, stream: str = "stdout") -> None:
        """A line of the guest's own (a browser's or a file step's report), in pieces that
        each fit an output frame."""
        text += "\n"
        for start in range(0, len(text), PIECE_CHARS):
            await self.append(stream, text[start : start + PIECE_CHARS])

    async def finish(self, code: int, error: str | None = None) -> None:
        async with self.changed:
            self.exit_code = code
            self.error = error
            self.ended = time.time()
            self.changed.notify_all()

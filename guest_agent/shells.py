"""A person's interactive shells (the dashboard's terminal tabs): bash on a pseudo-terminal,
as the step user, one per tab, reached over channels (see protocol.py).

A shell belongs to the machine, not to a channel: closing the page detaches it, and the next
channel to its tab gets its recent output (SCROLLBACK bytes) and then what follows. The
backend sends JSON on a shell's channel (``{"input": text}``, ``{"resize": [cols, rows]}``);
the guest sends the terminal's raw bytes. Its environment is made here from nothing, like
every process the agent starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import struct
import termios
from dataclasses import dataclass, field
from typing import Any

from guest_agent.hands import Send
from guest_agent.protocol import MAX_DATA_BYTES, Close, Data
from guest_agent.user import StepUser, clean_environment

SCROLLBACK = 64 * 1024
MAX_SHELLS = 8
TAB = re.compile(r"[a-z0-9]{1,16}")
# Run by the step user: its own session with the terminal as its controlling one (job
# control works), in the workspace ($0).
ENTER = 'cd -- "$0" || exit 126; unset OLDPWD; exec /bin/bash -i'


@dataclass
class Shell:
    tab: str
    fd: int
    process: asyncio.subprocess.Process
    scrollback: bytearray = field(default_factory=bytearray)
    listeners: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    ended: bool = False

    def output(self, data: bytes) -> None:
        self.scrollback += data
        del self.scrollback[:-SCROLLBACK]
        for queue in self.listeners:
            queue.put_nowait(data)

    def end(self) -> None:
        self.ended = True
        for queue in self.listeners:
            queue.put_nowait(None)


class Shells:
    def __init__(self, workdir: str, user: StepUser | None) -> None:
        self.workdir, self.user = workdir, user
        self.known: dict[str, Shell] = {}

    def tabs(self) -> list[str]:
        return [tab for tab, shell in self.known.items() if not shell.ended]

    async def _spawn(self, tab: str, cols: int, rows: int) -> Shell:
        master, slave = os.openpty()
        _resize(slave, cols, rows)
        argv = ["setsid", "--ctty", "/bin/bash", "-c", ENTER, self.workdir]
        environment = clean_environment(self.workdir)
        if self.user is not None:
            argv = self.user.command(argv)
            environment = self.user.environment()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd="/" if self.user is not None else self.workdir,
                env={**environment, "TERM": "xterm-256color"},
            )
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        shell = Shell(tab, master, process)
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._read, shell)
        self.known[tab] = shell
        return shell

    def _read(self, shell: Shell) -> None:
        try:
            data = os.read(shell.fd, MAX_DATA_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the shell and all it ran have closed the terminal
        if data:
            shell.output(data)
            return
        asyncio.get_running_loop().remove_reader(shell.fd)
        os.close(shell.fd)
        shell.end()

    async def serve(
        self, channel: str, args: dict[str, Any], inbox: asyncio.Queue[Data | Close], send: Send
    ) -> None:
        """``list`` the live tabs, or attach to tab ``tab`` (started if it is not running)
        until the backend detaches or the shell ends."""
        if args.get("op") == "list":
            await send(Close(channel, result={"tabs": self.tabs()}))
            return
        tab, cols, rows = str(args.get("tab", "")), args.get("cols"), args.get("rows")
        shell = self.known.get(tab)
        if shell is None or shell.ended:
            if not TAB.fullmatch(tab):
                await send(Close(channel, error="refused: a tab is 1-16 of a-z, 0-9"))
                return
            if len(self.tabs()) >= MAX_SHELLS:
                await send(Close(channel, error=f"refused: at most {MAX_SHELLS} shells"))
                return
            shell = await self._spawn(tab, _size(cols, 80), _size(rows, 24))
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        if shell.scrollback:
            await send(Data(channel, bytes(shell.scrollback)))
        shell.listeners.add(queue)

        async def downward() -> None:
            while (data := await queue.get()) is not None:
                await send(Data(channel, data))

        pump = asyncio.create_task(downward())
        try:
            while not pump.done():
                waiting = asyncio.ensure_future(inbox.get())
                await asyncio.wait([waiting, pump], return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    break
                frame = waiting.result()
                if isinstance(frame, Close):
                    break
                _apply(shell, frame.data)
        finally:
            shell.listeners.discard(queue)
            pump.cancel()
        await send(Close(channel, result={"ended": shell.ended}))


def _apply(shell: Shell, message: bytes) -> None:
    """A message of the backend's: keys typed, or the terminal's new size."""
    try:
        found = json.loads(message)
    except ValueError:
        return
    if not isinstance(found, dict) or shell.ended:
        return
    typed, size = found.get("input"), found.get("resize")
    if isinstance(typed, str):
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(shell.fd, typed.encode())
    if isinstance(size, list) and len(size) == 2:
        _resize(shell.fd, _size(size[0], 80), _size(size[1], 24))


def _size(value: object, default: int) -> int:
    return value if isinstance(value, int) and 1 <= value <= 1000 else default


def _resize(fd: int, cols: int, rows: int) -> None:
    # The kernel tells the terminal's foreground processes (SIGWINCH).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

"""Terminal commands, run in their own process group, their output streamed line by line."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal

from guest_agent.execution import Execution
from guest_agent.protocol import EXIT_TIMED_OUT, MAX_OUTPUT_CHUNK
from guest_agent.user import StepUser


async def run_command(
    execution: Execution, command: str, workdir: str, user: StepUser | None = None
) -> tuple[int, str | None]:
    """Run ``command`` under bash (as ``user``, if given) until it exits or its execution's
    timeout; returns the exit code and an error (the command could not start)."""
    argv = ["/bin/bash", "-c", command]
    try:
        process = await asyncio.create_subprocess_exec(
            *(user.command(argv) if user else argv),
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill takes children too
            limit=MAX_OUTPUT_CHUNK,
        )
    except OSError as exc:
        return 127, f"cannot start command: {exc}"
    execution.on_kill = lambda: _kill_group(process)
    if execution.killed:
        execution.kill()  # cancelled while the process was being started
    assert process.stdout is not None and process.stderr is not None
    readers = asyncio.gather(
        _read(execution, process.stdout, "stdout"), _read(execution, process.stderr, "stderr")
    )
    try:
        await asyncio.wait_for(asyncio.shield(readers), execution.timeout_s)
    except TimeoutError:
        execution.timed_out = True
        execution.kill()
        await readers
    code = await process.wait()
    return (EXIT_TIMED_OUT if execution.timed_out else code), None


def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


async def _read(execution: Execution, stream: asyncio.StreamReader, name: str) -> None:
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
            await execution.append(name, text)
        if not chunk:
            return

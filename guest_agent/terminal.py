"""Terminal commands, run in their own process group, their output streamed line by line."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
import time
from pathlib import Path

from guest_agent.execution import Execution
from guest_agent.protocol import EXIT_TIMED_OUT, MAX_OUTPUT_CHUNK
from guest_agent.user import StepUser, clean_environment

# Once a command has exited, output that stops coming for this long is held open only by
# children it left running (``server &``): the step ends, and they run on, what they print
# read and dropped (never a broken pipe for them).
BACKGROUND_QUIET_S = 1.0
# Run by the step user: enter the working directory ($0), then run the command ($1) in a
# bash of its own, as `bash -c command` would; the cd's OLDPWD (/) is not passed on.
ENTER = 'cd -- "$0" || exit 126; unset OLDPWD; exec /bin/bash -c "$1"'
# Background readers of steps that are over, until their last writer is gone.
_draining: set[asyncio.Future[tuple[None, None]]] = set()
# Where the kernel counts its out-of-memory kills, the most local first: the container's
# cgroup (v2, then v1), else the whole kernel's (a VM's own).
OOM_COUNTERS = (
    Path("/sys/fs/cgroup/memory.events"),
    Path("/sys/fs/cgroup/memory/memory.oom_control"),
    Path("/proc/vmstat"),
)
OUT_OF_MEMORY = (
    "killed by the kernel's out-of-memory killer: the step needed more memory than the machine has"
)


class _Pipes:
    """How a command's output is being read: kept or dropped; a chunk being passed on, or
    when the last one was."""

    def __init__(self) -> None:
        self.keep = True
        self.busy = 0
        self.at = time.monotonic()

    def quiet(self) -> bool:
        return not self.busy and time.monotonic() - self.at >= BACKGROUND_QUIET_S


async def run_command(
    execution: Execution, command: str, workdir: str, user: StepUser | None = None
) -> tuple[int, str | None]:
    """Run ``command`` under bash (as ``user``, if given) until it exits or its execution's
    timeout; returns the exit code and an error (the command could not start).

    Its environment is made afresh (the user's, or the workspace as HOME without one):
    nothing of the agent's own is passed on."""
    argv = ["/bin/bash", "-c", command]
    if user is not None:
        # The working directory is entered by the user, not by root before dropping its
        # rights: root would enter one the user may not, and the command start in it.
        argv = user.command(["/bin/bash", "-c", ENTER, workdir, command])
    ooms = oom_kills()  # before it starts: it may be killed at once
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd="/" if user is not None else workdir,
            env=user.environment() if user else clean_environment(workdir),
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
    pipes = _Pipes()
    readers: asyncio.Future[tuple[None, None]] = asyncio.gather(
        _read(execution, process.stdout, "stdout", pipes),
        _read(execution, process.stderr, "stderr", pipes),
    )
    deadline = time.monotonic() + execution.timeout_s
    # Its output ends with it, unless children it left running (or that escaped a kill
    # with a session of their own) hold it open.
    while not readers.done():
        left = deadline - time.monotonic()
        if left <= 0 and not execution.timed_out:
            execution.timed_out = True
            execution.kill()
        await asyncio.wait(
            [readers], timeout=min(left, BACKGROUND_QUIET_S) if left > 0 else BACKGROUND_QUIET_S
        )
        if process.returncode is not None and pipes.quiet():
            pipes.keep = False
            _draining.add(readers)
            readers.add_done_callback(_draining.discard)
            break
    code = await process.wait()
    if execution.timed_out:
        return EXIT_TIMED_OUT, None
    # A SIGKILL that was not ours (a cancel, a timeout) and came with an out-of-memory kill
    # is said so: a bare exit code of -9 (or a shell's 137) and no output explain nothing.
    killed = code in (-signal.SIGKILL, 128 + signal.SIGKILL) and not execution.killed
    if killed and ooms is not None and (oom_kills() or 0) > ooms:
        return code, OUT_OF_MEMORY
    return code, None


def oom_kills() -> int | None:
    """The kernel's count of out-of-memory kills where this guest runs, or None if it shows
    none."""
    for counter in OOM_COUNTERS:
        try:
            lines = counter.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _kill_group(process: asyncio.subprocess.Process) -> None:
    # The group outlives its leader (bash) while children it started live.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _read(
    execution: Execution, stream: asyncio.StreamReader, name: str, pipes: _Pipes
) -> None:
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
        if text and pipes.keep:
            pipes.busy += 1
            try:
                await execution.append(name, text)
            finally:
                pipes.busy -= 1
        pipes.at = time.monotonic()
        if not chunk:
            return

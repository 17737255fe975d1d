"""The ``berth`` command: Berth from a terminal or a script (``--json`` on every command).
The server's own command line stays ``python -m berth`` (run, worker, api, prepare, ...)."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from berth_client import login, render
from berth_client.errors import BerthError, Unauthorized
from berth_client.models import (
    SESSION_FINAL,
    Event,
    SessionOut,
    SessionStatus,
    TaskOut,
)
from berth_client.sync import Berth, Session, Task

app = typer.Typer(
    name="berth",
    help="Berth from the command line: sessions, tasks, their live output, files, usage.",
    no_args_is_help=True,
)
files_app = typer.Typer(help="A session's workspace: list, read and write files.")
app.add_typer(files_app, name="files")
console = Console(highlight=False)
errors_out = Console(stderr=True, highlight=False)

Json = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts")]
Sid = Annotated[str, typer.Argument(help="The session's id")]
F = TypeVar("F", bound=Callable[..., Any])
# How often a wait for a session's status asks again.
POLL_S = 0.5


def command(fn: F) -> F:
    """A command whose API errors are a line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Unauthorized as exc:
            errors_out.print(f"[red]error:[/] {exc.detail}: run `berth login`", markup=True)
            raise typer.Exit(2) from None
        except (BerthError, TimeoutError) as exc:
            errors_out.print(f"error: {exc}", style="red", markup=False)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


def client() -> Berth:
    found = login.load()
    if not found.token:
        errors_out.print("not logged in: run `berth login` (or set BERTH_TOKEN)", style="red")
        raise typer.Exit(2)
    return Berth(found.url, found.token)


def dump(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """One JSON document on stdout."""
    if isinstance(value, Sequence):
        print(json.dumps([item.model_dump(mode="json") for item in value]))
    elif isinstance(value, BaseModel):
        print(value.model_dump_json())
    else:
        print(json.dumps(value))


@app.command("login")
@command
def log_in(
    url: Annotated[str, typer.Option(help="The Berth API", envvar="BERTH_URL")] = login.DEFAULT_URL,
    email: Annotated[str | None, typer.Option(help="Your account's email")] = None,
    password: Annotated[str | None, typer.Option(help="Asked for when not given")] = None,
    token: Annotated[str | None, typer.Option(help="Keep this token instead of logging in")] = None,
    name: Annotated[str, typer.Option(help="The new token's name")] = "cli",
    as_json: Json = False,
) -> None:
    """Log in and keep the token (0600, under your config dir) for the other commands."""
    with Berth(url, token) as berth:
        if token is None:
            email = email or typer.prompt("email")
            password = password or typer.prompt("password", hide_input=True)
            token = berth.log_in(email, password, name).token
        next(iter(berth.sessions.list(limit=1)), None)  # the token works
    path = login.save(url, token)
    if as_json:
        dump({"url": url, "credentials": str(path)})
    else:
        console.print(f"logged in to {url}; token kept in {path}")


@app.command("sessions")
@command
def sessions(as_json: Json = False) -> None:
    """Your sessions, newest first."""
    with client() as berth:
        found = [session.info for session in berth.sessions.list()]
    if as_json:
        return dump(found)
    table = Table("id", "status", "template", "created", "ended")
    for info in found:
        ended = f"{info.ended_at:%Y-%m-%d %H:%M}" if info.ended_at else ""
        status = f"{info.status} (kept)" if info.preserved else str(info.status)
        table.add_row(info.id, status, info.template, f"{info.created_at:%Y-%m-%d %H:%M}", ended)
    console.print(table)


def wait_ready(session: Session, timeout: float) -> SessionOut:
    """The session once its sandbox is up (or it ended), with a spinner meanwhile."""
    deadline = time.monotonic() + timeout
    with console.status(f"session {session.id}: starting its sandbox"):
        while (info := session.refresh()).status == SessionStatus.provisioning:
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {session.id} was not ready after {timeout:.0f} s")
            time.sleep(POLL_S)
    return info


@app.command("new")
@command
def new(
    template: Annotated[str | None, typer.Option(help="Sandbox template")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until its sandbox is up")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 300.0,
    as_json: Json = False,
) -> None:
    """Start a session."""
    with client() as berth:
        session = berth.sessions.create(template)
        info = wait_ready(session, timeout) if wait else session.info
    if as_json:
        return dump(info)
    console.print(f"{info.id} {info.status}")
    if info.status in SESSION_FINAL:
        raise typer.Exit(1)


@app.command("run")
@command
def run(
    prompt: Annotated[str, typer.Argument(help='The task: prose, or "$ command" lines')],
    session: Annotated[str | None, typer.Option(help="Run it in this session")] = None,
    template: Annotated[str | None, typer.Option(help="A new session's template")] = None,
    follow: Annotated[bool, typer.Option(help="Show the plan and output live")] = False,
    detach: Annotated[bool, typer.Option(help="Queue it and return at once")] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many s")] = None,
    as_json: Json = False,
) -> None:
    """Run a task (in a new session unless --session); exit code 0 only if it succeeded."""
    with client() as berth:
        target = berth.sessions.get(session) if session else berth.sessions.create(template)
        task = target.run(prompt)
        if not as_json:
            errors_out.print(f"session {target.id}, task {task.id}", style="dim")
        if detach:
            return dump({"session_id": target.id, "task_id": task.id}) if as_json else None
        result = watch(task, follow, as_json, timeout)
    if as_json:
        dump(result)
    else:
        render.answer(console, result)
    if result.status != "succeeded":
        raise typer.Exit(1)


def watch(task: Task, follow: bool, as_json: bool, timeout: float | None) -> TaskOut:
    """Wait for the task: its events printed as they come with ``follow`` (one JSON line
    each with ``as_json``), else a spinner."""
    if not follow:
        with console.status(f"task {task.id} running"):
            return task.wait(timeout)
    for event in task.events(timeout):
        show(event, as_json)
    return task.get()


@app.command("logs")
@command
def logs(
    sid: Sid,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep following")] = False,
    after: Annotated[int, typer.Option(help="Only the events after this one")] = 0,
    as_json: Json = False,
) -> None:
    """A session's events (its log): what has happened, or live with --follow."""
    with client() as berth:
        # Without --follow, the log as it is: a second without news is the end of it.
        for event in berth.events(sid, after, idle=None if follow else 1.0):
            show(event, as_json)


def show(event: Event, as_json: bool) -> None:
    if as_json:
        print(event.model_dump_json())
    else:
        render.show(console, event)


@files_app.command("ls")
@command
def files_ls(sid: Sid, path: str = ".", as_json: Json = False) -> None:
    """List a folder of the workspace (one entry a line; folders end in /)."""
    with client() as berth:
        listing = berth.list_files(sid, path)
    if as_json:
        return dump(listing)
    for entry in listing.entries:
        console.print(
            f"{entry.name}/" if entry.kind == "dir" else f"{entry.name}  {entry.size}",
            markup=False,
        )


@files_app.command("get")
@command
def files_get(
    sid: Sid,
    path: str,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write it here")] = None,
    as_json: Json = False,
) -> None:
    """Download a file of the workspace (a folder as a zip), to --out or standard output."""
    with client() as berth:
        data = berth.download(sid, path)
    if out is not None:
        out.write_bytes(data)
    if as_json:
        return dump({"path": path, "bytes": len(data)})
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@files_app.command("put")
@command
def files_put(
    sid: Sid, local: Path, path: Annotated[str | None, typer.Argument()] = None,
    as_json: Json = False,
) -> None:  # fmt: skip
    """Upload a local file into the workspace (as PATH, by default its own name)."""
    where = path or local.name
    with client() as berth:
        entry = berth.upload(sid, where, local.read_bytes())
    if as_json:
        return dump({"path": where, "bytes": entry.size})
    console.print(f"wrote {where} ({entry.size} bytes)")


@files_app.command("rm")
@command
def files_rm(sid: Sid, path: str) -> None:
    """Delete a file, or a folder with all it holds, from the workspace."""
    with client() as berth:
        berth.delete_file(sid, path)
    console.print(f"deleted {path}")


@app.command("end")
@command
def end(
    sid: Sid,
    keep: Annotated[
        bool, typer.Option(help="Keep its disk: `berth resume` brings it back")
    ] = False,
    as_json: Json = False,
) -> None:
    """End a session (its sandbox destroyed, or with --keep shut down with its disk kept)."""
    with client() as berth:
        info = berth.sessions.end(sid, preserve=keep).info
    if as_json:
        return dump(info)
    console.print(f"{info.id} {info.status}")


@app.command("resume")
@command
def resume(sid: Sid, as_json: Json = False) -> None:
    """Bring back a session that ended with --keep."""
    with client() as berth:
        info = berth.sessions.resume(sid).info
    if as_json:
        return dump(info)
    console.print(f"{info.id} {info.status}")


@app.command("usage")
@command
def usage(as_json: Json = False) -> None:
    """Your LLM calls, tokens and cost: in all and by session."""
    with client() as berth:
        found = berth.usage()
    if as_json:
        return dump(found)
    table = Table("session", "calls", "tokens", "cost (USD)")
    for row in found.sessions:
        table.add_row(row.session_id, str(row.calls), str(row.total_tokens), f"{row.cost_usd:.4f}")
    total = found.total
    table.add_row("all", str(total.calls), str(total.total_tokens), f"{total.cost_usd:.4f}")
    console.print(table)


@app.command("mcp")
def mcp() -> None:
    """Serve Berth's tools to an MCP client over stdio (as the logged-in user)."""
    from berth_client.mcp import serve_stdio

    found = login.load()
    if not found.token:
        errors_out.print("not logged in: run `berth login` (or set BERTH_TOKEN)", style="red")
        raise typer.Exit(2)
    serve_stdio(found.url, found.token)


def main() -> None:
    app()

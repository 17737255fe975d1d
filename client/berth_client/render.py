"""A session's events as the command line prints them: the plan with each step's status and
check, the terminal's output in colour (errors red, Berth's notes dim), the final answer."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from berth_client.models import Event, TaskOut

MARKS = {"succeeded": ("✓", "green"), "failed": ("✗", "red"), "refused": ("⊘", "red"),
         "cancelled": ("■", "yellow"), "skipped": ("·", "dim")}  # fmt: skip
STREAMS = {"stderr": "red", "note": "dim"}


def describe(step: dict[str, Any]) -> str:
    """A step in a few words, as its plan shows it."""
    match step.get("kind"):
        case "terminal":
            return f"$ {step.get('command', '')}"
        case "browser":
            target = step.get("url") or step.get("selector") or step.get("text") or ""
            return f"browser {step.get('action', '')} {target}".rstrip()
        case "file":
            return f"file {step.get('op', '')} {step.get('path', '')}"
    return str(step.get("kind", "step"))


def check_of(step: dict[str, Any]) -> str:
    check = step.get("check")
    return f"  [check: {check['kind']} {check['value']!r}]" if check else ""


def show(console: Console, event: Event) -> None:
    """Print one event (those a person need not see print nothing)."""
    data = event.data
    match event.type:
        case "task.plan":
            title = f"plan (revised: {data['revised']})" if data.get("revised") else "plan"
            console.print(Text(title, style="bold"))
            for n, step in enumerate(data.get("steps", []), start=data.get("first", 0) + 1):
                console.print(Text(f"  {n}. {describe(step)}{check_of(step)}", style="cyan"))
        case "step.started":
            step = data.get("step", {})
            console.print(Text(f"▶ step {data['index'] + 1}: {describe(step)}", style="bold cyan"))
        case "step.output":
            style = STREAMS.get(data.get("stream", ""), "")
            console.print(Text(data.get("text", ""), style=style), end="")
        case "step.finished":
            console.print(finished_line(data))
        case "task.verified":
            verdict = "goal reached" if data.get("ok") else f"not yet: {data.get('reason', '')}"
            console.print(Text(f"verified: {verdict}", style="magenta"))
        case "task.status":
            status = data.get("status", "")
            style = MARKS.get(status, ("", "blue"))[1]
            error = f": {data['error']}" if data.get("error") else ""
            console.print(Text(f"task {status}{error}", style=style))
        case "session.status":
            console.print(Text(f"session {data.get('status')}", style="dim"))


def finished_line(data: dict[str, Any]) -> Text:
    status = data.get("status", "")
    mark, style = MARKS.get(status, ("?", ""))
    line = Text(f"{mark} step {data['index'] + 1} {status}", style=style)
    if data.get("exit_code") is not None:
        line.append(f" (exit {data['exit_code']})")
    check = data.get("check")
    if check:
        line.append(f"  check {'ok' if check.get('ok') else 'missed'}: {check.get('detail', '')}")
    if data.get("error"):
        line.append(f"  {data['error']}", style="red")
    return line


def answer(console: Console, task: TaskOut) -> None:
    if task.result:
        console.print(Text("answer:", style="bold green"))
        console.print(task.result.rstrip("\n"), markup=False, highlight=False)
    elif task.error:
        console.print(Text(f"error: {task.error}", style="bold red"))

"""Berth as an MCP server: its tools drive sessions through the JSON API (AsyncBerth), so
every command an agent sends is a task like any other, judged by the same command policy
and counted by the same limits and audit. A tool that acts once (a command, a file, a browser
action) sends a task of that one step, written as a step plan (steps.py).

Two transports serve the same tools: ``berth mcp`` (stdio, as the logged-in user) and the
API's ``/mcp`` (streamable HTTP; each request as the owner of its bearer token, see
api/mcp.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from berth_client import steps
from berth_client.aio import AsyncBerth
from berth_client.errors import ProblemError
from berth_client.models import StepOut, TaskOut

# A client of the API for the request in ``ctx``, closed after it.
Connect = Callable[[Context], AbstractAsyncContextManager[AsyncBerth]]
INSTRUCTIONS = (
    "Berth runs each session in its own sandboxed machine. Start one with create_session, then "
    "run_command, the file tools and the browser tools act in it; run_task gives a goal in prose "
    "to Berth's own agent. end_session when done. Every command passes Berth's command policy."
)


def build(connect: Connect) -> MCPServer:
    # MCPServer sets up the root logger (logging.basicConfig) when it has no handler yet; the
    # process that serves the tools (the API) keeps its own logging as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server: MCPServer = MCPServer("berth", instructions=INSTRUCTIONS)
    root.handlers[:], root.level = handlers, level

    async def one_step(ctx: Context, session_id: str, step: dict[str, Any]) -> StepOut:
        """Run ``step`` as a task of its own in the session; its outcome, or ToolError."""
        async with connect(ctx) as berth:
            try:
                session = await berth.sessions.get(session_id)
                task = await (await session.run(steps.plan(step))).wait()
            except ProblemError as exc:
                raise ToolError(exc.detail) from None
        if not task.steps:
            raise ToolError(f"the task {task.status}: {task.error or 'no step ran'}")
        last = task.steps[-1]
        if last.kind != "terminal" and last.status != "succeeded":
            raise ToolError(f"{last.status}: {last.error or task.error or 'no reason given'}")
        return last

    @server.tool()
    async def create_session(ctx: Context, template: str | None = None) -> dict[str, Any]:
        """Start a session: a new sandboxed machine of ``template`` (by default yours). Its
        `id` is what the other tools take."""
        async with connect(ctx) as berth:
            try:
                session = await berth.sessions.create(template)
            except ProblemError as exc:
                raise ToolError(exc.detail) from None
        return session.info.model_dump(mode="json")

    @server.tool()
    async def run_task(ctx: Context, session_id: str, prompt: str) -> str:
        """Give Berth's agent a goal in prose (or `$ command` lines): it plans steps, runs
        them, checks the result and answers. Progress is reported step by step."""
        async with connect(ctx) as berth:
            try:
                session = await berth.sessions.get(session_id)
                task = await session.run(prompt)
                planned, done = 0, 0
                async for event in task.events():
                    if event.type == "task.plan":
                        planned = event.data.get("first", 0) + len(event.data.get("steps", []))
                    elif event.type == "step.finished":
                        done += 1
                        step = f"step {event.data['index'] + 1} {event.data.get('status')}"
                        await ctx.report_progress(done, max(planned, done), step)
                result = await task.get()
            except ProblemError as exc:
                raise ToolError(exc.detail) from None
        return summary(result)

    @server.tool()
    async def run_command(ctx: Context, session_id: str, command: str) -> str:
        """Run one shell command in the session's workspace; its exit code and output."""
        step = await one_step(ctx, session_id, steps.terminal(command))
        if step.status == "refused":
            raise ToolError(f"refused: {step.error}")
        return f"exit code {step.exit_code}\n{step.output}"

    @server.tool()
    async def read_file(ctx: Context, session_id: str, path: str) -> str:
        """A text file of the workspace (its first 8,000 characters)."""
        return steps.content(await one_step(ctx, session_id, steps.read_file(path)))

    @server.tool()
    async def write_file(ctx: Context, session_id: str, path: str, content: str) -> str:
        """Write a text file in the workspace (made, or replaced)."""
        await one_step(ctx, session_id, steps.write_file(path, content))
        return f"wrote {len(content.encode())} bytes to {path}"

    @server.tool()
    async def list_files(ctx: Context, session_id: str, path: str = ".") -> str:
        """A folder of the workspace: one entry a line, folders ending in /, files with size."""
        return steps.content(await one_step(ctx, session_id, steps.list_files(path)))

    @server.tool()
    async def browser_navigate(ctx: Context, session_id: str, url: str) -> str:
        """Open ``url`` in the session's browser; the page's title and status."""
        return page(await one_step(ctx, session_id, steps.browser("navigate", url=url)))

    @server.tool()
    async def browser_click(ctx: Context, session_id: str, selector: str) -> str:
        """Click the element ``selector`` (CSS) finds."""
        return page(await one_step(ctx, session_id, steps.browser("click", selector=selector)))

    @server.tool()
    async def browser_type(ctx: Context, session_id: str, selector: str, text: str) -> str:
        """Type ``text`` into the field ``selector`` finds."""
        typed = steps.browser("type", selector=selector, text=text)
        return page(await one_step(ctx, session_id, typed))

    @server.tool()
    async def browser_extract(ctx: Context, session_id: str, selector: str | None = None) -> str:
        """The text of ``selector``'s element, or of the whole page."""
        step = await one_step(ctx, session_id, steps.browser("extract", selector=selector))
        return steps.content(step)

    @server.tool()
    async def screenshot(ctx: Context, session_id: str) -> Image:
        """A picture of the browser's page as it is now (JPEG)."""
        step = await one_step(ctx, session_id, steps.browser("screenshot"))
        if not step.artifacts:
            raise ToolError("the step made no screenshot")
        async with connect(ctx) as berth:
            data = await berth.artifact(session_id, step.artifacts[-1])
        return Image(data=data, format="jpeg")

    @server.tool()
    async def end_session(ctx: Context, session_id: str, keep: bool = False) -> dict[str, Any]:
        """End the session: its machine is destroyed (with ``keep``, shut down with its disk
        kept, to resume later)."""
        async with connect(ctx) as berth:
            try:
                session = await berth.sessions.end(session_id, preserve=keep)
            except ProblemError as exc:
                raise ToolError(exc.detail) from None
        return session.info.model_dump(mode="json")

    @server.resource(
        "berth://sessions/{session_id}/events",
        name="session_events",
        description="A session's event log so far: one JSON event a line",
        mime_type="application/x-ndjson",
    )
    async def session_events(session_id: str, ctx: Context) -> str:
        async with connect(ctx) as berth:
            try:
                found = [e.model_dump_json() async for e in berth.events(session_id, idle=1.0)]
            except ProblemError as exc:
                raise ResourceError(exc.detail) from None
        return "\n".join(found)

    return server


def summary(task: TaskOut) -> str:
    lines = [f"task {task.status}"]
    for step in task.steps:
        lines.append(f"step {step.index + 1} ({step.kind}) {step.status}: {step.output[-500:]}")
    if task.result:
        lines.append(f"answer: {task.result}")
    if task.error:
        lines.append(f"error: {task.error}")
    return "\n".join(lines)


def page(step: StepOut) -> str:
    found = step.result or {}
    return f"url: {found.get('url')}\ntitle: {found.get('title')}\nstatus: {found.get('status')}"


def serve_stdio(url: str, token: str) -> None:
    """``berth mcp``: the tools over stdin and stdout, as the owner of ``token``."""

    @contextlib.asynccontextmanager
    async def connect(ctx: Context) -> AsyncIterator[AsyncBerth]:
        async with AsyncBerth(url, token) as berth:
            yield berth

    build(connect).run("stdio")

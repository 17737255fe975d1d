"""The dashboard's interactive terminal: tabs of bash on a pseudo-terminal in the session's
machine (guest_agent/shells.py), each a WebSocket from the page to a channel to the guest.

Every line a person types goes to the audit log (rebuilt from the keys: what bash runs may
differ when its line editing or history is used). A template whose ``[terminal]`` says
``obeys_policy = true`` has each line judged by its command policy first: there the keys
that recall or complete lines (escape sequences, tab, Ctrl-R, ...) are not passed on, so the
line judged is the line run, and a refused line is erased instead of run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.websockets import WebSocketDisconnect

import vm_templates
from api import guest_link, service
from api.deps import DbDep, Problem, SettingsDep, cookie_caller
from api.guest_link import Link
from config.settings import Settings
from sandboxes.policy import CommandPolicy, judge, load_policy
from store import audit
from store.models import SessionRow
from ui.render import PageUser, dashboard_router

router = dashboard_router()
sockets = APIRouter(include_in_schema=False)
# Keys: Enter, Backspace, Ctrl-U (erase the line), Ctrl-C; escape sequences (arrows, ...).
ENTER, ERASE, KILL, INTERRUPT = "\r", "\x7f", "\x15", "\x03"
ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)")
# Under the policy, the controls passed on besides those above: Ctrl-D (end of input).
POLICED_CONTROLS = frozenset({ENTER, ERASE, KILL, INTERRUPT, "\x04"})
MAX_LINE = 16_000


@dataclass
class Lines:
    """The line being typed, rebuilt from the keys."""

    policy: CommandPolicy | None
    line: str = ""
    done: list[tuple[str, str | None]] = field(default_factory=list)  # line, refusal

    def feed(self, typed: str) -> str:
        """What of ``typed`` goes to the shell; each finished line (and whether the policy
        refused it) is added to ``done``."""
        passed = []
        if self.policy is not None:
            typed = ESCAPE.sub("", typed)
        for key in typed:
            if key == ENTER:
                refusal = None
                if self.policy is not None and self.line.strip():
                    verdict = judge(self.line, self.policy)
                    refusal = None if verdict.allowed else verdict.reason
                if self.line.strip():
                    self.done.append((self.line, refusal))
                passed.append(KILL if refusal else ENTER)
                self.line = ""
                continue
            if key == ERASE:
                self.line = self.line[:-1]
            elif key in (KILL, INTERRUPT):
                self.line = ""
            elif key < " ":
                if self.policy is not None and key not in POLICED_CONTROLS:
                    continue  # tab, Ctrl-R, ...: they would run a line not judged
            elif len(self.line) < MAX_LINE:
                self.line += key
            passed.append(key)
        return "".join(passed)


@router.get("/ui/sessions/{sid}/terminals")
async def tabs(sid: str, db: DbDep, settings: SettingsDep, user: PageUser) -> Response:
    """The tabs whose shells run in the session's machine; ``ready`` false while it has no
    machine to reach (starting, asleep): the page asks again rather than fail."""
    row = service.own_session(db, user, sid)
    try:
        sandbox = guest_link.running_sandbox(db, row)
        async with guest_link.guest_channel(settings, sandbox, "pty", {"op": "list"}) as link:
            found = await link.result()
    except Problem:
        return JSONResponse({"tabs": [], "ready": False})
    return JSONResponse({"tabs": found.get("tabs", []), "ready": True})


def _same_origin(websocket: WebSocket) -> bool:
    """A browser's WebSocket says where its page came from: only the dashboard's own."""
    scheme = "https" if websocket.url.scheme == "wss" else "http"
    return websocket.headers.get("origin") == f"{scheme}://{websocket.url.netloc}"


@sockets.websocket("/ui/sessions/{sid}/terminal/{tab}")
async def terminal(
    websocket: WebSocket, sid: str, tab: str, cols: int = 80, rows: int = 24
) -> None:
    settings: Settings = websocket.app.state.settings
    with Session(websocket.app.state.engine) as db:
        found = cookie_caller(websocket, db, settings)
        try:
            if found is None or not _same_origin(websocket):
                raise Problem(403, "refused")
            row = service.own_session(db, found[0], sid)
            sandbox = guest_link.running_sandbox(db, row)
        except Problem:
            await websocket.close(code=4403)
            return
        user_id = found[0].id
    policy = _policy(settings, row)
    args = {"op": "attach", "tab": tab, "cols": cols, "rows": rows}
    try:
        async with guest_link.guest_channel(settings, sandbox, "pty", args) as link:
            await websocket.accept()
            await _bridge(websocket, link, Lines(policy), settings, user_id, sid, tab)
    except Problem as exc:
        with contextlib.suppress(RuntimeError):
            await websocket.close(code=4409, reason=exc.detail[:120])


def _policy(settings: Settings, row: SessionRow) -> CommandPolicy | None:
    if not vm_templates.spec(row.template).terminal.obeys_policy:
        return None
    return load_policy(row.template, settings.command_policy_path)


async def _bridge(
    websocket: WebSocket,
    link: Link,
    lines: Lines,
    settings: Settings,
    user_id: str,
    sid: str,
    tab: str,
) -> None:
    engine = websocket.app.state.engine

    async def downward() -> None:
        async for chunk in link.chunks():
            await websocket.send_bytes(chunk)

    async def upward() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = json.loads(await websocket.receive_text())
                if not isinstance(message, dict):
                    continue
                if isinstance(message.get("input"), str):
                    passed = lines.feed(message["input"])
                    _audit(engine, user_id, sid, tab, lines)
                    for _line, refusal in lines.done:
                        if refusal:
                            note = f"\r\n[refused by the command policy: {refusal}]\r\n"
                            await websocket.send_bytes(note.encode())
                    lines.done.clear()
                    if passed:
                        await link.send(json.dumps({"input": passed}).encode())
                elif isinstance(message.get("resize"), list):
                    await link.send(json.dumps({"resize": message["resize"]}).encode())
        await link.end()

    tasks = [asyncio.create_task(downward()), asyncio.create_task(upward())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        if not task.cancelled() and isinstance(task.exception(), Problem):
            raise task.exception()  # type: ignore[misc]
    with contextlib.suppress(RuntimeError):
        await websocket.close()


def _audit(engine: Engine, user_id: str, sid: str, tab: str, lines: Lines) -> None:
    if not lines.done:
        return
    with Session(engine) as db:
        for line, refusal in lines.done:
            detail = {"tab": tab, "line": line[:2000], **({"refused": refusal} if refusal else {})}
            audit.record(db, user_id, "terminal.line", target=sid, detail=detail)

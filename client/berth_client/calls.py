"""Each operation of the API once, as the ``Call`` that does it (see core.py): the sync and
async clients send these and read the answer as the model named beside."""

from __future__ import annotations

from urllib.parse import quote

from berth_client.core import Call, submission
from berth_client.models import Modification, SessionCreate, TaskCreate, TokenRequest

TASK_ACTIONS = ("pause", "resume", "cancel")


def part(value: str) -> str:
    """An id as one path segment: quoted, so `../` or `?` in it cannot reach another route
    (the MCP tools take ids from an agent)."""
    return quote(value, safe="")


def session(sid: str) -> str:
    return f"/api/sessions/{part(sid)}"


def log_in(email: str, password: str, name: str) -> Call:  # -> TokenOut
    return Call("POST", "/api/auth/token", TokenRequest(email=email, password=password, name=name))


def create_session(template: str | None) -> Call:  # -> SessionOut
    return Call("POST", "/api/sessions", SessionCreate(template=template))


def list_sessions(limit: int) -> Call:  # -> list[SessionOut]
    return Call("GET", "/api/sessions", params={"limit": limit}, repeatable=True)


def get_session(sid: str) -> Call:  # -> SessionOut
    return Call("GET", session(sid), repeatable=True)


def end_session(sid: str, preserve: bool) -> Call:  # -> SessionOut
    # Ending an ended session again is no error: safe to repeat.
    params = {"preserve": "true"} if preserve else {}
    return Call("DELETE", session(sid), params=params, repeatable=True)


def resume_session(sid: str) -> Call:  # -> SessionOut
    return Call("POST", f"{session(sid)}/resume")


def submit_task(sid: str, prompt: str, key: str | None) -> Call:  # -> TaskRefOut
    return submission(f"{session(sid)}/tasks", TaskCreate(prompt=prompt), key)


def list_tasks(sid: str, limit: int) -> Call:  # -> list[TaskRefOut]
    return Call("GET", f"{session(sid)}/tasks", params={"limit": limit}, repeatable=True)


def get_task(sid: str, tid: str) -> Call:  # -> TaskOut
    return Call("GET", f"{session(sid)}/tasks/{part(tid)}", repeatable=True)


def control_task(sid: str, tid: str, action: str) -> Call:  # -> TaskRefOut
    """Pause, resume or cancel: the server answers a repeat with the same result."""
    if action not in TASK_ACTIONS:
        raise ValueError(f"no task action {action!r}: {', '.join(TASK_ACTIONS)}")
    return Call("POST", f"{session(sid)}/tasks/{part(tid)}/{action}", repeatable=True)


def modify_task(sid: str, tid: str, instruction: str) -> Call:  # -> TaskRefOut
    modification = Modification(instruction=instruction)
    return Call("POST", f"{session(sid)}/tasks/{part(tid)}/modify", modification)


def artifact(sid: str, artifact_id: str) -> Call:  # -> bytes
    return Call("GET", f"{session(sid)}/artifacts/{part(artifact_id)}", repeatable=True)


def list_files(sid: str, path: str) -> Call:  # -> FileListing
    return Call("GET", f"{session(sid)}/files", params={"path": path}, repeatable=True)


def download(sid: str, path: str) -> Call:  # -> bytes
    return Call("GET", f"{session(sid)}/files/content", params={"path": path}, repeatable=True)


def upload(sid: str, path: str, data: bytes) -> Call:  # -> FileEntry
    # The same bytes to the same path: a repeat leaves what one upload leaves.
    return Call(
        "PUT", f"{session(sid)}/files/content", params={"path": path}, content=data,
        repeatable=True,
    )  # fmt: skip


def delete_file(sid: str, path: str) -> Call:  # -> nothing
    return Call("DELETE", f"{session(sid)}/files", params={"path": path})


def usage() -> Call:  # -> UserUsage
    return Call("GET", "/api/usage", repeatable=True)


def events_path(sid: str) -> str:
    return f"{session(sid)}/events"

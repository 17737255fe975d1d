"""Preview URLs: a server listening on a port in a session's machine, reached at
``/preview/{sid}/{port}/`` over the guest's own link (a tunnel: guest_agent/ports.py), so
nothing in the machine listens to the outside.

Every preview URL carries its access in its path, ``/preview/{sid}/{port}/@{token}/...``, so
the app's relative links and its page's requests carry it too, with no cookie: the owner's
visit to ``/preview/{sid}/{port}/`` (their dashboard login) is sent on to a URL with an owner
token (signed, short-lived, for that port), a share link has a share token (a row: it
expires, and once revoked opens nothing: 403). The previewed app is not trusted: its pages
are served in a CSP sandbox (an origin of their own, which cannot read the dashboard or use
its login), its cookies are not set, and the dashboard's cookies and the request's
credentials are not passed to it.

HTTP goes to the app as HTTP/1.0 (one request per tunnel, the answer's body until the app
closes it: no chunked framing to undo); a WebSocket is opened to the app over its tunnel
with websockets' own client protocol, and messages are passed both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from sqlmodel import Session, col, select
from starlette.websockets import WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.uri import parse_uri

from api.deps import DbDep, Problem, SettingsDep
from api.guest_link import Link, guest_channel, running_sandbox
from config.keys import keyed_hash, user_keys
from config.settings import Settings
from store.models import PreviewShare, SessionRow, utcnow

router = APIRouter(include_in_schema=False)
PortPath = Annotated[int, Path(ge=1024, le=65535)]
# Headers that belong to one connection, not to the request or answer they travel with.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
# Never passed to the app: Berth's own credentials; never taken from it: cookies it sets.
WITHHELD = frozenset({"cookie", "authorization"})
DROPPED = frozenset({"set-cookie", "content-security-policy", "x-frame-options"})
MAX_HEAD_BYTES = 64 * 1024
OWNER = "o"
SHARE = "s"


class ShareOut(BaseModel):
    id: str
    port: int
    url: str  # with its token: shown once, when the share is made
    expires_at: datetime


class ShareInfo(BaseModel):
    id: str
    port: int
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


class PreviewsOut(BaseModel):
    """Ports something listens on in the session's machine, and the shares of its previews."""

    ports: list[int]
    shares: list[ShareInfo]


def base(sid: str, port: int) -> str:
    return f"/preview/{sid}/{port}/"


def owner_token(settings: Settings, row: SessionRow, port: int) -> str:
    expiry = int(time.time() + settings.preview_owner_ttl_s)
    return f"{OWNER}{expiry}.{_owner_mac(user_keys(settings).current, row, port, expiry)}"


def _owner_mac(key: bytes, row: SessionRow, port: int, expiry: int) -> str:
    return keyed_hash(key, "preview", f"{row.id}:{port}:{row.user_id}:{expiry}")[:40]


def _share_hash(settings: Settings, secret: str) -> str:
    return keyed_hash(user_keys(settings).current, "preview-share", secret)


def admitted(db: Session, settings: Settings, row: SessionRow, port: int, token: str) -> None:
    """A 403 unless ``token`` opens this port's preview now."""
    if token.startswith(OWNER):
        expiry, _, mac = token[1:].partition(".")
        if expiry.isdigit() and int(expiry) > time.time():
            for key in user_keys(settings).keys:
                if hmac.compare_digest(_owner_mac(key, row, port, int(expiry)), mac):
                    return
    elif token.startswith(SHARE):
        share = db.exec(
            select(PreviewShare).where(PreviewShare.token_hash == _share_hash(settings, token))
        ).first()
        if (
            share is not None
            and share.session_id == row.id
            and share.port == port
            and share.revoked_at is None
            and share.expires_at > utcnow()
        ):
            return
    raise Problem(403, "this preview link was revoked, has expired or is not one")


def share(db: Session, settings: Settings, row: SessionRow, port: int) -> ShareOut:
    secret = SHARE + secrets.token_urlsafe(24)
    made = PreviewShare(
        session_id=row.id,
        port=port,
        token_hash=_share_hash(settings, secret),
        expires_at=utcnow() + timedelta(seconds=settings.preview_share_ttl_s),
    )
    db.add(made)
    db.commit()
    url = f"{base(row.id, port)}@{secret}/"
    return ShareOut(id=made.id, port=port, url=url, expires_at=made.expires_at)


def revoke(db: Session, row: SessionRow, share_id: str) -> None:
    found = db.get(PreviewShare, share_id)
    if found is None or found.session_id != row.id:
        raise Problem(404, f"no share {share_id[:40]} of session {row.id}")
    if found.revoked_at is None:
        found.revoked_at = utcnow()
        db.add(found)
        db.commit()


async def previews(db: Session, settings: Settings, row: SessionRow) -> PreviewsOut:
    sandbox = running_sandbox(db, row)
    async with guest_channel(settings, sandbox, "port", {"op": "listening"}) as link:
        found = await link.result()
    shares = db.exec(
        select(PreviewShare)
        .where(PreviewShare.session_id == row.id)
        .order_by(col(PreviewShare.created_at))
    ).all()
    return PreviewsOut(
        ports=[p for p in found.get("ports", []) if isinstance(p, int)],
        shares=[ShareInfo.model_validate(s, from_attributes=True) for s in shares],
    )


@router.api_route(
    "/preview/{sid}/{port}/@{token}/{path:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
)
async def forward(
    sid: str,
    port: PortPath,
    token: str,
    path: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
) -> Response:
    """One HTTP request to the app, its answer streamed back."""
    row = db.get(SessionRow, sid)
    if row is None:
        raise Problem(404, f"no session {sid}")
    admitted(db, settings, row, port, token)
    sandbox = running_sandbox(db, row)
    stack = AsyncExitStack()
    try:
        link = await stack.enter_async_context(
            guest_channel(settings, sandbox, "port", {"port": port})
        )
        await link.send(_request_head(request, path, port))
        async for chunk in request.stream():
            if chunk:
                await link.send(chunk)
        await link.end()
        chunks = link.chunks()
        status, headers, first = await _answer_head(chunks)
    except BaseException:
        await stack.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        async with stack:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk

    return StreamingResponse(body(), status_code=status, headers=headers)


def _request_head(request: Request, path: str, port: int) -> bytes:
    target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
    lines = [f"{request.method} {target} HTTP/1.0", f"Host: 127.0.0.1:{port}"]
    for name, value in request.headers.items():
        if name not in HOP_BY_HOP and name not in WITHHELD:
            lines.append(f"{name}: {value}")
    length = request.headers.get("content-length")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _answer_head(chunks: AsyncIterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """The app's status and headers (those passed on), and the body's first bytes."""
    held = b""
    while b"\r\n\r\n" not in held:
        try:
            held += await anext(chunks)
        except StopAsyncIteration:
            raise Problem(502, "the app closed the connection without an answer") from None
        if len(held) > MAX_HEAD_BYTES:
            raise Problem(502, "the app's answer has an overlong head")
    head, _, rest = held.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise Problem(502, "the app's answer is not HTTP")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name and name not in HOP_BY_HOP and name not in DROPPED:
            headers[name] = value.strip()
    return int(parts[1]), headers, rest


@router.websocket("/preview/{sid}/{port}/@{token}/{path:path}")
async def forward_socket(websocket: WebSocket, sid: str, port: int, token: str, path: str) -> None:
    """A WebSocket to the app, messages passed both ways until either side closes."""
    settings: Settings = websocket.app.state.settings
    with Session(websocket.app.state.engine) as db:
        row = db.get(SessionRow, sid)
        try:
            if row is None or not 1024 <= port <= 65535:
                raise Problem(404, "no such preview")
            admitted(db, settings, row, port, token)
            sandbox = running_sandbox(db, row)
        except Problem:
            await websocket.close(code=4403)
            return
    target = "/" + path + (f"?{websocket.url.query}" if websocket.url.query else "")
    async with guest_channel(settings, sandbox, "port", {"port": port}) as link:
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{target}"))
        await link.send(_handshake(client))
        chunks = link.chunks()
        if not await _handshook(client, chunks):
            await websocket.close(code=1011)
            return
        await websocket.accept()
        await _bridge(websocket, client, link, chunks)


def _handshake(client: ClientProtocol) -> bytes:
    client.send_request(client.connect())
    return b"".join(client.data_to_send())


async def _handshook(client: ClientProtocol, chunks: AsyncIterator[bytes]) -> bool:
    """Whether the app took the WebSocket handshake."""
    while True:
        try:
            client.receive_data(await anext(chunks))
        except (StopAsyncIteration, Problem):
            return False
        for event in client.events_received():
            if isinstance(event, WsResponse):
                return event.status_code == 101
        if client.handshake_exc is not None:
            return False


async def _bridge(
    websocket: WebSocket, client: ClientProtocol, link: Link, chunks: AsyncIterator[bytes]
) -> None:
    async def downward() -> None:
        async for chunk in chunks:
            client.receive_data(chunk)
            for frame in client.events_received():
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode is Opcode.TEXT:
                    await websocket.send_text(bytes(frame.data).decode())
                elif frame.opcode is Opcode.BINARY:
                    await websocket.send_bytes(bytes(frame.data))
                elif frame.opcode is Opcode.CLOSE:
                    return
            pending = b"".join(client.data_to_send())
            if pending:
                await link.send(pending)  # pongs, the close's answer

    async def upward() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is not None:
                    client.send_text(message["text"].encode())
                elif message.get("bytes") is not None:
                    client.send_binary(message["bytes"])
                await link.send(b"".join(client.data_to_send()))
        client.send_close()
        with contextlib.suppress(Exception):
            await link.send(b"".join(client.data_to_send()))

    tasks = [asyncio.create_task(downward()), asyncio.create_task(upward())]
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    with contextlib.suppress(Exception):
        await websocket.close()

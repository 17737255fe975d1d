"""The relay: how the API reaches a guest's channels (a person's file operations) through the
worker whose gateway holds the guest's link.

The worker listens on a loopback address (never the sandboxes' bridge); the API dials a
WebSocket to it with the relay token (derived from a secret both processes hold) in its
``Authorization`` header, and sends one JSON text message: ``{"sandbox_id", "kind",
"args"}``. Then binary messages are the channel's bytes either way; the API's text message
``end`` says it has no more; the relay's last message is a JSON text ``{"error", "result"}``
(the guest's close, or why the channel could not open), after which it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from guest_agent import protocol
from guest_agent.protocol import Close
from sandboxes.gateway import Channel, GuestGateway, GuestUnavailable

log = logging.getLogger("berth.relay")

PATH = "/relay"
END = "end"
# The opening message: a sandbox id, a kind and a few arguments.
MAX_OPENING = 4096


class Relay:
    def __init__(self, gateway: GuestGateway, token: str) -> None:
        self._gateway, self._token = gateway, token
        self._server: Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await serve(
            self._serve,
            host,
            port,
            process_request=self._authorize,
            max_size=protocol.MAX_DATA_BYTES + MAX_OPENING,
            compression=None,  # loopback: deflating files' bytes would only cost CPU
        )
        log.info("relay listening on %s:%d", host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        given = request.headers.get("Authorization", "")
        if request.path != PATH or not hmac.compare_digest(given, f"Bearer {self._token}"):
            return connection.respond(403, "refused\n")
        return None

    async def _serve(self, ws: ServerConnection) -> None:
        try:
            opening = json.loads(await ws.recv())
            sandbox_id, kind, args = opening["sandbox_id"], opening["kind"], opening["args"]
            if kind not in protocol.CHANNEL_KINDS or not isinstance(args, dict):
                raise ValueError(kind)
        except (ValueError, KeyError, TypeError):
            await ws.close(protocol.CLOSE_UNAUTHORIZED, "bad opening")
            return
        except ConnectionClosed:
            return
        try:
            async with self._gateway.channel(str(sandbox_id), kind, args) as channel:
                ending = await _bridge(ws, channel)
        except GuestUnavailable as exc:
            ending = Close("", error=f"unavailable: {exc}")
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"error": ending.error, "result": ending.result}))
            await ws.close()


async def _bridge(ws: ServerConnection, channel: Channel) -> Close:
    """Pass bytes both ways until the guest closes the channel; its close."""

    async def upward() -> None:
        with contextlib.suppress(ConnectionClosed):  # the guest's link, at the finish
            with contextlib.suppress(ConnectionClosed):  # the API's
                async for message in ws:
                    if isinstance(message, bytes):
                        await channel.send(message)
                    elif message == END:
                        await channel.finish()
                        return
                    else:
                        break
            await channel.finish("the API went away")  # what it sent is not whole

    feeding = asyncio.create_task(upward())
    try:
        while True:
            frame = await channel.receive()
            if isinstance(frame, Close):
                return frame
            await ws.send(frame.data)
    except ConnectionClosed:
        return Close(channel.id, error="the API went away")
    finally:
        feeding.cancel()

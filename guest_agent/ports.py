"""Ports of the machine for previews: which ones a server listens on, and a byte tunnel to
one of them over a channel (see protocol.py), so a person reaches a web app in the machine
through the backend while nothing in the machine listens to the outside.

Only unprivileged ports (1024 and up) are reached, on the loopback address: what a step's
server (run as the step user, who cannot bind lower) may have opened, nothing of root's.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from guest_agent.hands import Send
from guest_agent.protocol import MAX_DATA_BYTES, Close, Data

LOWEST_PORT = 1024
# The kernel's tables of TCP sockets; state 0A is LISTEN.
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
LISTEN = "0A"


def listening() -> list[int]:
    """The unprivileged TCP ports something listens on, on any address."""
    found: set[int] = set()
    for table in TCP_TABLES:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port >= LOWEST_PORT:
                    found.add(port)
    return sorted(found)


async def serve(
    channel: str, args: dict[str, Any], inbox: asyncio.Queue[Data | Close], send: Send
) -> None:
    """``listening`` ports, or a tunnel to ``port`` until either side ends it; its close is
    always sent."""
    if args.get("op") == "listening":
        await send(Close(channel, result={"ports": listening()}))
        return
    port = args.get("port")
    if not isinstance(port, int) or not LOWEST_PORT <= port <= 65535:
        await send(Close(channel, error=f"refused: port {port} is not one of 1024-65535"))
        return
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        await send(Close(channel, error=f"missing: nothing listens on port {port}"))
        return

    async def upward() -> None:
        while isinstance(frame := await inbox.get(), Data):
            writer.write(frame.data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()  # the backend's side is done; the answer may still come

    feeding = asyncio.create_task(upward())
    try:
        while chunk := await reader.read(MAX_DATA_BYTES):
            await send(Data(channel, chunk))
    except OSError:
        pass
    finally:
        feeding.cancel()
        writer.close()
    await send(Close(channel, result={}))

"""Berth from code: ``Berth`` (blocking) and ``AsyncBerth`` (asyncio) over the JSON API.

with Berth("http://127.0.0.1:8000", token) as berth:
    session = berth.sessions.create()
    print(session.run("$ echo hi").wait().steps[0].output)
"""

from berth_client.aio import AsyncBerth
from berth_client.errors import (
    BerthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    ProblemError,
    RateLimited,
    ServerError,
    StreamLost,
    TaskFailed,
    Unauthorized,
    Unavailable,
)
from berth_client.sync import Berth

__all__ = [
    "AsyncBerth",
    "Berth",
    "BerthError",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "ProblemError",
    "RateLimited",
    "ServerError",
    "StreamLost",
    "TaskFailed",
    "Unauthorized",
    "Unavailable",
]

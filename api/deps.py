"""Typed dependencies: settings, database session, Temporal client, the calling user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.client import Client

from api.security import read_token
from berth.settings import Settings
from berth.temporal import connect
from store.models import User
from store.notify import Hub


class Problem(Exception):
    """An error with an HTTP status and a message meant for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_db(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    with Session(engine) as db:
        yield db


class StreamCount:
    """Open streams per user in this process, so one user cannot hold the server's threads
    and connections with thousands of them."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        self._open[user_id] = self._open.get(user_id, 0) + 1
        try:
            yield
        finally:
            self._open[user_id] -= 1
            if not self._open[user_id]:
                del self._open[user_id]

    def check(self, user_id: str) -> None:
        if self._open.get(user_id, 0) >= self.most:
            raise Problem(
                429, f"you have {self.most} event streams open, the most allowed; close some"
            )


class TemporalLink:
    """Connects on first use and again after a failure, so the API starts (and says why it
    cannot serve) before Temporal is up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await connect(self.settings)
                except RuntimeError as exc:
                    where = self.settings.temporal_target
                    raise Problem(503, f"Temporal at {where}: {exc}") from exc
            return self._client


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def get_stream_count(request: Request) -> StreamCount:
    count: StreamCount = request.app.state.streams
    return count


async def get_temporal(request: Request) -> Client:
    link: TemporalLink = request.app.state.temporal
    return await link.client()


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DbDep = Annotated[Session, Depends(get_db)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
HubDep = Annotated[Hub, Depends(get_hub)]
StreamCountDep = Annotated[StreamCount, Depends(get_stream_count)]

bearer = HTTPBearer(auto_error=False)
UNAUTHORIZED = "missing or invalid token: POST /api/auth/token for one"


def user_from_token(db: Session, settings: Settings, token: str | None) -> User | None:
    user_id = read_token(settings.signing_key(), token) if token else None
    return db.get(User, user_id) if user_id else None


def current_user(
    db: DbDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    user = user_from_token(db, settings, credentials.credentials if credentials else None)
    if user is None:
        raise Problem(401, UNAUTHORIZED)
    return user


UserDep = Annotated[User, Depends(current_user)]

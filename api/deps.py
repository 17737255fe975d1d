"""Typed dependencies: settings, database session, Temporal client, the calling user (by
bearer token for the JSON API, by the dashboard's login cookie for its pages and the codec)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.requests import HTTPConnection
from temporalio.client import Client
from temporalio.service import RPCError

from api import accounts
from api.problems import Problem, logged
from api.security import Passwords
from config.settings import Settings
from store import streams
from store.models import ApiToken, User
from store.notify import Hub
from workflows import search
from workflows.client import connect

log = logging.getLogger("berth.api")
# How often a namespace without the search attributes is asked again.
SEARCHABLE_RECHECK_S = 300.0

__all__ = ["Problem"]  # raised by routes and services through this module


def app_settings(request: Request) -> Settings:
    """The settings the app was made with."""
    settings: Settings = request.app.state.settings
    return settings


def app_engine(request: Request) -> Engine:
    """The app's database engine (one pool for every request)."""
    engine: Engine = request.app.state.engine
    return engine


def get_db(engine: Annotated[Engine, Depends(app_engine)]) -> Iterator[Session]:
    with Session(engine) as db:
        yield db


class Streams:
    """Open streams per user, counted in the database across every API process (a lease
    each, store/streams.py), so one user cannot hold the servers' threads and connections
    with thousands of them; and how long one may last before the client is asked to
    reconnect (which it does where it left off), so none is held forever."""

    def __init__(self, engine: Engine, most: int, lifetime_s: float = 900.0) -> None:
        self.engine = engine
        self.most = most
        self.lifetime_s = lifetime_s

    def take(self, user_id: str) -> Callable[[], None]:
        """A place for one of the user's streams, taken now (so requests made at once cannot
        all pass a check before any stream starts), or a 429; returns what gives it back,
        which may be called more than once."""
        with Session(self.engine) as db:
            lease = streams.open_lease(db, user_id, self.most, self.lifetime_s)
        if lease is None:
            raise Problem(
                429, f"you have {self.most} event streams open, the most allowed; close some"
            )
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            with Session(self.engine) as db:
                streams.close_lease(db, lease)

        return give_back


class TemporalLink:
    """Connects on first use and again after a failure, so the API starts (and says why it
    cannot serve) before Temporal is up. Routes get the link, not a client: they connect
    only once the caller and the input have been checked."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        # Whether the namespace has Berth's search attributes, and when that was last asked
        # (a yes holds; a no is asked again, so a `temporal-setup` takes effect unrestarted).
        self._searchable = False
        self._searchable_at: float | None = None

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await connect(self.settings)
                except RuntimeError as exc:
                    # Where and why go to the log: the caller learns only what is down.
                    where = f"Temporal at {self.settings.temporal_target}: {exc}"
                    raise logged(503, "the orchestrator is unavailable; try again", where) from exc
            return self._client

    async def searchable(self) -> bool:
        """Whether sessions may carry the search attributes (workflows/search.py)."""
        now = time.monotonic()
        if self._searchable or (
            self._searchable_at is not None and now - self._searchable_at < SEARCHABLE_RECHECK_S
        ):
            return self._searchable
        self._searchable_at = now
        try:
            lacking = await search.missing(await self.client(), self.settings.temporal_namespace)
        except RPCError as exc:
            log.warning("could not list Temporal's search attributes: %s", exc)
            return False
        if lacking:
            log.warning(
                "the Temporal namespace lacks the search attributes %s: sessions run without "
                "them (`python -m berth temporal-setup` adds them)",
                ", ".join(lacking),
            )
        self._searchable = not lacking
        return self._searchable


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def get_stream_count(request: Request) -> Streams:
    count: Streams = request.app.state.streams
    return count


def get_temporal(request: Request) -> TemporalLink:
    link: TemporalLink = request.app.state.temporal
    return link


def get_passwords(request: Request) -> Passwords:
    passwords: Passwords = request.app.state.passwords
    return passwords


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


SettingsDep = Annotated[Settings, Depends(app_settings)]
EngineDep = Annotated[Engine, Depends(app_engine)]
DbDep = Annotated[Session, Depends(get_db)]
TemporalDep = Annotated[TemporalLink, Depends(get_temporal)]
HubDep = Annotated[Hub, Depends(get_hub)]
StreamsDep = Annotated[Streams, Depends(get_stream_count)]
PasswordsDep = Annotated[Passwords, Depends(get_passwords)]
IpDep = Annotated[str, Depends(client_ip)]

COOKIE = "berth_token"  # the dashboard's login: a token's secret
DASHBOARD_TOKEN = "dashboard"  # the name of the token each dashboard login makes
bearer = HTTPBearer(auto_error=False)
UNAUTHORIZED = "missing or invalid token: POST /api/auth/token for one"


def current_token(
    db: DbDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> tuple[User, ApiToken]:
    found = accounts.authenticate(db, settings, credentials.credentials) if credentials else None
    if found is None:
        raise Problem(
            401,
            "missing, invalid, expired or revoked token: POST /api/auth/token for one",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'} if credentials else None,
        )
    return found


def cookie_caller(
    request: HTTPConnection, db: Session, settings: Settings
) -> tuple[User, ApiToken] | None:
    """The user (and token) of the dashboard's login cookie, if it holds a live token."""
    secret = request.cookies.get(COOKIE)
    return accounts.authenticate(db, settings, secret) if secret else None


def current_user(found: Annotated[tuple[User, ApiToken], Depends(current_token)]) -> User:
    return found[0]


def current_admin(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise Problem(403, "only an admin may do this")
    return user


TokenDep = Annotated[tuple[User, ApiToken], Depends(current_token)]
UserDep = Annotated[User, Depends(current_user)]
AdminDep = Annotated[User, Depends(current_admin)]

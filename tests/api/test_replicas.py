"""API replicas admit exactly what one process would: two apps, each with its own engine
(its own connection pool, as two processes have) on one database, race more requests than a
limit allows, from threads released together; the limit holds across them. Live sessions a
user, streams a user, login attempts from an address, sign-ups from an address; on SQLite
and PostgreSQL alike. A stream on one replica follows events written through another."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

from api import accounts
from api.deps import Problem, Streams
from api.events import JSON_MESSAGES, KEEPALIVE_S, follow
from berth.web import create_app
from config.settings import Settings
from store import events
from store.db import get_engine, migrate
from store.events import EventType
from store.models import SessionRow, User
from store.notify import Hub
from tests.support.world import FAST_PASSWORDS, PASSWORD, make_user

T = TypeVar("T")
LIMIT, EXTRA = 3, 5


def replica_url(db_url: str, name: str) -> str:
    """The database's URL made distinct per replica, so get_engine gives each its own
    engine: a harmless option of each driver."""
    if db_url.startswith("postgresql"):
        return f"{db_url}?application_name={name}"
    return f"{db_url}?timeout={ {'a': 20, 'b': 30}[name] }"


@pytest.fixture
def replicas(
    db_url: str, temporal_address: str, tmp_path: Path
) -> Iterator[tuple[TestClient, TestClient]]:
    apps = [
        create_app(
            Settings(
                data_dir=tmp_path / name,
                database_url=replica_url(db_url, name),
                # Replicas share their secrets (a token made on one opens the other).
                user_token_secret="replicas-share-this-secret",
                temporal_address=temporal_address,
                max_live_sessions=LIMIT,
                max_streams_per_user=LIMIT,
                login_max_attempts=LIMIT,
                login_max_failures=100,  # only the address's attempts are raced here
                signup_max_attempts=LIMIT,
                **FAST_PASSWORDS,
            )
        )
        for name in ("a", "b")
    ]
    assert apps[0].state.engine is not apps[1].state.engine
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        yield first, second
    for app in apps:
        app.state.engine.dispose()


def race(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Every call at once, each on its own thread, released together."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def user_and_token(client: TestClient) -> tuple[str, dict[str, str]]:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with Session(engine) as db:
        user = make_user(db, "ann@example.com")
        _, secret = accounts.issue_token(db, settings, user, "test")
        return user.id, {"Authorization": f"Bearer {secret}"}


def statuses(answers: list[Any]) -> Counter[int]:
    return Counter(answer.status_code for answer in answers)


def test_live_sessions_across_replicas(replicas: tuple[TestClient, TestClient]) -> None:
    first, second = replicas
    user_id, token = user_and_token(first)
    calls = [
        (lambda c=client: c.post("/api/sessions", json={}, headers=token))
        for client in [first, second] * ((LIMIT + EXTRA + 1) // 2)
    ]
    answers = race(calls)
    assert statuses(answers) == {201: LIMIT, 429: len(calls) - LIMIT}, [a.text for a in answers]
    with Session(first.app.state.engine) as db:  # type: ignore[attr-defined]
        live = db.exec(
            select(func.count())
            .select_from(SessionRow)
            .where(SessionRow.user_id == user_id, col(SessionRow.ended_at).is_(None))
        ).one()
    assert live == LIMIT


def test_streams_across_replicas(replicas: tuple[TestClient, TestClient]) -> None:
    counts = [
        Streams(client.app.state.engine, LIMIT)  # type: ignore[attr-defined]
        for client in replicas
    ]

    def open_one(streams: Streams) -> Callable[[], Callable[[], None] | None]:
        def take() -> Callable[[], None] | None:
            try:
                return streams.take("ann")
            except Problem as refused:
                assert refused.status == 429
                return None

        return take

    taken = race([open_one(counts[i % 2]) for i in range(LIMIT + EXTRA)])
    held = [give_back for give_back in taken if give_back is not None]
    assert len(held) == LIMIT
    held[0]()  # a stream ends on one replica: the other may open one
    again = counts[1].take("ann")
    with pytest.raises(Problem):
        counts[0].take("ann")
    for give_back in [*held[1:], again]:
        give_back()


def test_login_attempts_across_replicas(replicas: tuple[TestClient, TestClient]) -> None:
    first, second = replicas
    user_and_token(first)
    wrong = {"email": "ann@example.com", "password": "not " + PASSWORD}
    calls = [
        (lambda c=client: c.post("/api/auth/token", json=wrong))
        for client in [first, second] * ((LIMIT + EXTRA + 1) // 2)
    ]
    answers = race(calls)
    # The address's first LIMIT attempts were judged (wrong password); the rest refused.
    assert statuses(answers) == {401: LIMIT, 429: len(calls) - LIMIT}


def test_sign_ups_across_replicas(replicas: tuple[TestClient, TestClient]) -> None:
    first, second = replicas
    calls = [
        (lambda c=client, i=i: c.post(
            "/api/auth/signup", json={"email": f"u{i}@example.com", "password": PASSWORD}
        ))
        for i, client in enumerate([first, second] * ((LIMIT + EXTRA + 1) // 2))
    ]  # fmt: skip
    answers = race(calls)
    assert statuses(answers) == {201: LIMIT, 429: len(calls) - LIMIT}
    with Session(get_engine(first.app.state.settings.db_url)) as db:  # type: ignore[attr-defined]
        assert db.exec(select(func.count()).select_from(User)).one() == LIMIT


async def test_a_stream_follows_its_session_from_another_replica(db_url: str) -> None:
    """Written through one replica's engine (or a worker's), followed on another's: the
    commit wakes the other process's stream at once (PostgreSQL: NOTIFY), not at its next
    keepalive read."""
    migrate(db_url)
    writer, reader = (get_engine(replica_url(db_url, name)) for name in ("a", "b"))
    with Session(writer) as db:
        sid = SessionRow(user_id=make_user(db, "ann@example.com").id)
        db.add(sid)
        db.commit()
        session_id = sid.id
    hub = Hub(reader)
    await hub.start()
    stream = cast(
        AsyncGenerator[str, None],
        follow(reader, hub, session_id, 0, JSON_MESSAGES, lifetime_s=30),
    )
    try:
        assert (await anext(stream)).startswith("retry:")
        await asyncio.sleep(0.2)  # PostgreSQL: the LISTEN is in place
        with Session(writer) as db:
            events.record(db, session_id, EventType.task_modified, {"from": "a"})
        # Sooner than the stream's own fallback read (at its keepalive): it was woken.
        message = await asyncio.wait_for(anext(stream), KEEPALIVE_S / 3)
        assert "id: 1" in message and '"from"' in message
    finally:
        await stream.aclose()
        await hub.stop()
        writer.dispose()
        reader.dispose()

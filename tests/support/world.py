"""A small world for API tests: three users (an owner, another user, an admin) and a
finished session of the owner's with a task, a step and its event log, written through the
event log exactly as the worker writes them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import Engine
from sqlmodel import Session

from api import accounts
from config.settings import Settings
from store import events
from store.events import EventType, NewEvent
from store.models import SessionRow, User

# Cheap password hashes for tests that are not about their cost.
FAST_PASSWORDS: dict[str, Any] = {
    "password_time_cost": 1,
    "password_memory_kib": 1024,
    "password_parallelism": 1,
}
PASSWORD = "correct horse battery"  # every user's
COMMAND = "echo hello from the world"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


@dataclass
class World:
    owner: User
    other: User
    admin: User
    session_id: str  # the owner's, ended
    task_id: str


def make_user(db: Session, email: str, is_admin: bool = False) -> User:
    user = User(email=email, password_hash=HASH, is_admin=is_admin)
    db.add(user)
    db.commit()
    db.refresh(user)
    return user


def recorded_session(db: Session, user: User) -> tuple[str, str]:
    """A session that ran one task of one step and ended: (session id, task id)."""
    row = SessionRow(user_id=user.id)
    db.add(row)
    db.commit()
    task_id = str(uuid.uuid4())
    step = {"kind": "shell", "command": COMMAND}
    drafts = [
        (EventType.session_status, {"status": "ready"}),
        (EventType.task_queued, {"task_id": task_id, "prompt": f"$ {COMMAND}"}),
        (EventType.task_plan, {"task_id": task_id, "first": 0, "steps": [step]}),
        (EventType.step_started, {"task_id": task_id, "index": 0, "step": step}),
        (
            EventType.step_finished,
            {"task_id": task_id, "index": 0, "step": step, "status": "succeeded"},
        ),
        (EventType.task_status, {"task_id": task_id, "status": "succeeded"}),
        (EventType.session_status, {"status": "ended"}),
    ]
    events.append(db, row.id, [NewEvent(type=kind, data=data) for kind, data in drafts])
    return row.id, task_id


def build(engine: Engine) -> World:
    with Session(engine) as db:
        owner = make_user(db, "owner@example.com")
        other = make_user(db, "other@example.com")
        admin = make_user(db, "admin@example.com", is_admin=True)
        session_id, task_id = recorded_session(db, owner)
        for user in (owner, other, admin):
            db.refresh(user)
            db.expunge(user)
    return World(owner, other, admin, session_id, task_id)


def bearer(engine: Engine, settings: Settings, user: User, name: str = "test") -> str:
    """A fresh API token of ``user`` (no password needed)."""
    with Session(engine) as db:
        return accounts.issue_token(db, settings, user, name)[1]

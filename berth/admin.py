"""``python -m berth create-admin EMAIL``: the first admin (or makes a user one). The password
is asked twice on a terminal, or read from the first line of standard input."""

from __future__ import annotations

import asyncio
import getpass
import sys

from pydantic import ValidationError
from sqlmodel import Session

from api.accounts import make_admin
from api.schemas import Credentials
from api.security import Passwords
from config.settings import get_settings
from store.db import get_engine, migrate


def read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        sys.exit("the passwords differ")
    return first


def create_admin(email: str) -> int:
    """Make ``email`` an admin, with a password read as above; exits with why if refused."""
    try:
        credentials = Credentials(email=email, password=read_password())
    except ValidationError as exc:
        sys.exit("; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors()))
    settings = get_settings()
    migrate(settings.db_url)
    with Session(get_engine(settings.db_url)) as db:
        passwords = Passwords(settings)
        user = asyncio.run(make_admin(db, passwords, credentials.email, credentials.password))
        print(f"{user.email} is an admin (user {user.id})")
    return 0

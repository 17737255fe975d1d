"""``python -m berth create-admin EMAIL``: the first admin, or, with ``--promote-existing``,
makes a registered user one (revoking every token and dashboard session the account had). The
password is asked twice on a terminal, or read from the first line of standard input."""

from __future__ import annotations

import asyncio
import getpass
import sys

from pydantic import ValidationError
from sqlmodel import Session

from api.accounts import AccountExists, make_admin
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


def create_admin(email: str, promote_existing: bool = False) -> int:
    """Make ``email`` an admin, with a password read as above; exits with why if refused."""
    try:
        credentials = Credentials(email=email, password=read_password())
    except ValidationError as exc:
        sys.exit("; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors()))
    settings = get_settings()
    migrate(settings.db_url)
    with Session(get_engine(settings.db_url)) as db:
        passwords = Passwords(settings)
        try:
            user = asyncio.run(
                make_admin(
                    db,
                    passwords,
                    credentials.email,
                    credentials.password,
                    promote_existing=promote_existing,
                )
            )
        except AccountExists:
            # Whoever registered it may not be who is meant to be admin: say so, do nothing.
            sys.exit(
                f"{credentials.email} is already registered (maybe by someone else, if sign-up "
                "is open): to make that account an admin, with this password and every token "
                "and dashboard session it had revoked, run again with --promote-existing"
            )
        print(f"{user.email} is an admin (user {user.id})")
    return 0

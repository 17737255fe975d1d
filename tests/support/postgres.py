"""Databases of their own on the local PostgreSQL (the host runs one on 127.0.0.1:5432, trust
auth): for the tests on PostgreSQL, and for the fleets the tests and the load benchmark start."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def fresh_database() -> str | None:
    """The URL of a new, empty database, or None when there is no PostgreSQL."""
    try:
        admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
        name = f"berth_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception:
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    """Drop a database fresh_database made, whoever is still connected to it."""
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()

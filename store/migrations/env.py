"""Alembic environment: runs against the URL that store.db.alembic_config sets."""

from alembic import context
from sqlmodel import SQLModel

import store.models  # noqa: F401  (registers the tables)
from store.db import get_engine

url = context.config.get_main_option("sqlalchemy.url")
assert url, "store.db.alembic_config sets sqlalchemy.url"

with get_engine(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

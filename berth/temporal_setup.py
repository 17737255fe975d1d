"""``python -m berth temporal-setup``: ready a Temporal cluster of one's own (or Temporal
Cloud's namespace, with an API key allowed to) for Berth, idempotently: its search
attributes (workflows/search.py). ``make run``'s dev server starts with them already."""

from __future__ import annotations

import asyncio

from config.settings import get_settings
from workflows import search
from workflows.client import connect


def temporal_setup() -> int:
    settings = get_settings()

    async def setup() -> list[str]:
        client = await connect(settings)
        return await search.register(client, settings.temporal_namespace)

    added = asyncio.run(setup())
    where = f"namespace {settings.temporal_namespace!r} at {settings.temporal_target}"
    if added:
        print(f"added the search attributes {', '.join(added)} to {where}")
    else:
        print(f"{where} has Berth's search attributes already")
    return 0

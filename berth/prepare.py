"""Making the host ready for sandboxes ahead of the first session: ``prepare`` starts the
engine or the libvirt daemons and builds every template's image, printing progress. The CLI
calls it (``python -m berth prepare``, and ``make`` through it), so the first session does not
wait for a build."""

from __future__ import annotations

import asyncio
import logging

from berth.host import make_gateway, make_provider
from config.settings import get_settings
from sandboxes.docker import engine_running, start_engine


def prepare(provider: str | None) -> int:
    """Ready the host for ``provider``'s sandboxes ("docker" or "libvirt"; the settings' when
    None); returns the exit status."""
    if provider not in (None, "docker", "libvirt"):
        raise ValueError(f"no sandbox provider {provider!r}: docker or libvirt")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    if provider:
        settings = settings.model_copy(update={"sandbox_provider": provider})
    sandboxes = make_provider(settings, make_gateway(settings))
    if settings.sandbox_provider == "docker" and not engine_running():
        print("starting the Docker engine", flush=True)
        start_engine(settings.data_dir / "logs" / "dockerd.log")
    print(f"preparing {sandboxes.name} sandboxes (the first build takes a few minutes)", flush=True)
    asyncio.run(sandboxes.prepare())
    print("sandboxes ready", flush=True)
    return 0

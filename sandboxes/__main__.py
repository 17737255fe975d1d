"""``python -m sandboxes prepare``: start the engine if needed and build every template's
image, printing progress. ``make`` calls it so the first session does not wait for a build."""

from __future__ import annotations

import asyncio
import logging
import sys

from berth.settings import get_settings
from sandboxes.docker import engine_running, start_engine
from sandboxes.factory import make_gateway, make_provider


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python -m sandboxes prepare")
    settings = get_settings()
    if settings.sandbox_provider == "docker" and not engine_running():
        print("starting the Docker engine", flush=True)
        start_engine(settings.data_dir / "logs" / "dockerd.log")
    provider = make_provider(settings, make_gateway(settings))
    print(
        f"preparing {provider.name} sandboxes (the first build takes about four minutes)",
        flush=True,
    )
    asyncio.run(provider.prepare())
    print("sandboxes ready", flush=True)


if __name__ == "__main__":
    main()

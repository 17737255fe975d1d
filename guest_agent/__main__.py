"""Entry point: ``python3 -m guest_agent``, configured by the environment the provider sets."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from guest_agent.agent import GuestAgent, GuestConfig


def config_from_env() -> GuestConfig:
    missing = [
        name
        for name in ("BERTH_GUEST_URL", "BERTH_SANDBOX_ID", "BERTH_GUEST_TOKEN")
        if not os.environ.get(name)
    ]
    if missing:
        sys.exit(f"guest_agent: set {', '.join(missing)}")
    return GuestConfig(
        url=os.environ["BERTH_GUEST_URL"],
        sandbox_id=os.environ["BERTH_SANDBOX_ID"],
        token=os.environ["BERTH_GUEST_TOKEN"],
        workdir=os.environ.get("BERTH_GUEST_WORKDIR", os.path.expanduser("~")),
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(GuestAgent(config_from_env()).run_forever())


if __name__ == "__main__":
    main()

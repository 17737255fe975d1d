"""Entry point of the guest agent, configured by the environment the machine sets.

Machines start it with ``python3 -I`` from ``/``, its package and ``site`` put on
``sys.path`` by name (the Docker template's CMD, vm_templates/guest/agent), so nothing
of the step user's (a user site's ``.pth``, a ``playwright/`` folder in the workspace,
``PYTHON*`` variables) is on its path; once configured, it keeps a clean environment of its
own, which is what Playwright's driver inherits.

``BERTH_GUEST_URL`` and ``BERTH_SANDBOX_ID`` say where to dial and as whom; for a ``wss://``
URL, ``BERTH_GUEST_GATEWAY_SHA256`` is the gateway certificate's pin (guest_agent/pinning.py).
The token comes from ``BERTH_GUEST_TOKEN_FILE`` (a root-only file the provider writes after
the machine starts, so it is in no image, argument list or environment);
``BERTH_GUEST_TOKEN`` is read too, for an agent run by hand, and removed from the environment
either way, so that nothing the agent starts inherits it. ``BERTH_GUEST_USER`` names the
unprivileged user steps run as. With ``BERTH_SNAPSHOT`` set (the VM a template's snapshot is
taken of) all of these come later, over the identity port (guest_agent/identity.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from guest_agent import identity
from guest_agent.agent import GuestAgent, GuestConfig
from guest_agent.pinning import PIN_VARIABLE, SECURE_SCHEME
from guest_agent.user import StepUser, own_environment

TOKEN_VARIABLE = "BERTH_GUEST_TOKEN"
# How long the agent waits for its token file: the provider writes it right after start.
TOKEN_WAIT_S = 120.0


def read_token(path: Path, wait_s: float = TOKEN_WAIT_S) -> str:
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"guest_agent: no token in {path} after {wait_s:.0f} s")
        time.sleep(0.05)
    return path.read_text().strip()


def config_from_env() -> GuestConfig:
    token = os.environ.pop(TOKEN_VARIABLE, "")
    token_file = os.environ.get("BERTH_GUEST_TOKEN_FILE")
    if token_file:
        token = read_token(Path(token_file))
    missing = [name for name in ("BERTH_GUEST_URL", "BERTH_SANDBOX_ID") if not os.environ.get(name)]
    if not token:
        missing.append(f"{TOKEN_VARIABLE}_FILE")
    pin = os.environ.get(PIN_VARIABLE) or None
    if os.environ.get("BERTH_GUEST_URL", "").startswith(f"{SECURE_SCHEME}://") and not pin:
        missing.append(PIN_VARIABLE)
    if missing:
        sys.exit(f"guest_agent: set {', '.join(missing)}")
    user_name = os.environ.get("BERTH_GUEST_USER")
    user = StepUser.named(user_name) if user_name else None
    home = user.home if user else os.path.expanduser("~")
    return GuestConfig(
        url=os.environ["BERTH_GUEST_URL"],
        sandbox_id=os.environ["BERTH_SANDBOX_ID"],
        token=token,
        gateway_sha256=pin,
        workdir=os.environ.get("BERTH_GUEST_WORKDIR") or home,
        user=user,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if os.environ.get(identity.SNAPSHOT_VARIABLE):
        # Everything is imported by now: a VM restored from here only dials.
        identity.at_snapshot_point()
    agent = GuestAgent(config_from_env())  # reads what it needs of the environment
    identity.watch_for_new_identity(agent.config.sandbox_id)
    os.environ.clear()
    os.environ.update(own_environment())
    asyncio.run(agent.run_forever())


if __name__ == "__main__":
    main()

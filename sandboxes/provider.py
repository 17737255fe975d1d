"""The sandbox provider interface.

A provider makes and removes machines (containers now, libvirt VMs next); everything that
goes through the guest agent (waiting for it, running steps) is shared and goes through the
gateway, whatever the machine is.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import time

from guest_agent.pinning import PIN_VARIABLE
from sandboxes.gateway import ArtifactSink, GuestGateway, OutputSink
from sandboxes.models import Health, Machine, SandboxInfo, Step, StepOutcome
from sandboxes.tokens import guest_token

log = logging.getLogger("berth.sandboxes")

# The guest token's name in guest_env(): a provider hands it to the guest agent by a way no
# step can read (never the machine's environment).
TOKEN_VARIABLE = "BERTH_GUEST_TOKEN"


def machine_name(sandbox_id: str) -> str:
    """The provider's name for a sandbox's machine (a container's, a domain's)."""
    return f"berth-{sandbox_id}"


class SandboxProvider(abc.ABC):
    name: str

    def __init__(self, gateway: GuestGateway, key: bytes, host_id: str, task_queue: str) -> None:
        self.gateway = gateway
        self._key = key
        self.host_id = host_id
        # Which install a machine belongs to, derived from its signing key: two installs that
        # share a container engine (and a host id) never take each other's machines for theirs.
        self.deployment = hashlib.sha256(b"deployment:" + key).hexdigest()[:12]
        self.task_queue = task_queue

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Make the host ready (engine, network, images). Called once at worker start."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Undo what prepare() opened in the host's firewall for this worker; its machines
        carry on (they are found again by the next worker's reconciliation)."""

    @abc.abstractmethod
    async def create(
        self, sandbox_id: str, session_id: str, template: str, env: dict[str, str]
    ) -> str:
        """Start a machine whose guest agent dials in with ``env``; return its handle.

        Idempotent per ``sandbox_id``: a retried provisioning gets the machine made before.
        """

    @abc.abstractmethod
    async def machines(self) -> list[Machine]:
        """Every machine of this host, whatever its state, for reconciliation."""

    @abc.abstractmethod
    async def remove(self, handle: str) -> None:
        """Stop and delete the machine. Removing one that is gone is not an error."""

    @abc.abstractmethod
    async def suspend(self, handle: str) -> None:
        """Stop the machine with its memory and disk kept (hibernation), until resume().
        Suspending a suspended machine is not an error."""

    @abc.abstractmethod
    async def resume(self, handle: str) -> None:
        """Continue a suspended machine where it stopped, its processes included. Resuming a
        running machine is not an error."""

    async def assign(self, handle: str, session_id: str) -> None:
        """Record ``session_id`` as the machine's owner (a warm pool's machine, claimed), so
        reconciliation finds it the session's. Only providers whose machines can change
        owner can serve a warm pool."""
        raise NotImplementedError(f"{self.name} machines cannot change owner (no warm pool)")

    @abc.abstractmethod
    async def is_running(self, handle: str) -> tuple[bool, str]:
        """Whether the machine runs, and the provider's word on its state."""

    @abc.abstractmethod
    def guest_url(self) -> str:
        """The gateway's address as seen from inside a machine."""

    def guest_env(self, sandbox_id: str) -> dict[str, str]:
        """What a sandbox's guest agent needs to dial in: where (and the pin of the
        gateway's certificate), as whom, its token."""
        env = {
            "BERTH_GUEST_URL": self.guest_url(),
            "BERTH_SANDBOX_ID": sandbox_id,
            TOKEN_VARIABLE: guest_token(self._key, sandbox_id),
        }
        if self.gateway.pin:
            env[PIN_VARIABLE] = self.gateway.pin
        return env

    async def provision(self, sandbox_id: str, session_id: str, template: str) -> SandboxInfo:
        handle = await self.create(sandbox_id, session_id, template, self.guest_env(sandbox_id))
        return SandboxInfo(
            id=sandbox_id,
            session_id=session_id,
            provider=self.name,
            host_id=self.host_id,
            task_queue=self.task_queue,
            template=template,
            handle=handle,
        )

    async def wait_connected(self, sandbox: SandboxInfo, timeout_s: float) -> None:
        await self.gateway.wait_connected(sandbox.id, timeout_s)

    async def run_step(
        self,
        sandbox: SandboxInfo,
        exec_id: str,
        step: Step,
        timeout_s: float,
        on_output: OutputSink,
        after_seq: int = 0,
        on_artifact: ArtifactSink | None = None,
    ) -> StepOutcome:
        return await self.gateway.run(
            sandbox.id, exec_id, step, timeout_s, on_output, after_seq, on_artifact
        )

    async def cancel_step(self, sandbox: SandboxInfo, exec_id: str) -> None:
        await self.gateway.cancel(sandbox.id, exec_id)

    async def destroy(self, sandbox: SandboxInfo) -> None:
        self.gateway.forget(sandbox.id)
        # No handle yet when the session ended during provisioning: the name is known.
        await self.remove(sandbox.handle or machine_name(sandbox.id))

    async def wake(self, sandbox: SandboxInfo, timeout_s: float) -> None:
        """Resume a suspended machine, wait for its guest, and set the guest's clock, which
        stood still while the machine was suspended."""
        await self.resume(sandbox.handle)
        await self.wait_connected(sandbox, timeout_s)
        # The agent sets it (steps are unprivileged), before it takes the next step.
        await self.gateway.set_clock(sandbox.id, time.time())

    async def health(self, sandbox: SandboxInfo) -> Health:
        running, detail = await self.is_running(sandbox.handle)
        return Health(
            running=running, guest_connected=self.gateway.is_connected(sandbox.id), detail=detail
        )

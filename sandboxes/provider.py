"""The sandbox provider interface.

A provider makes and removes machines (containers now, libvirt VMs next); everything that
goes through the guest agent (waiting for it, running steps) is shared and goes through the
gateway, whatever the machine is.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from guest_agent.pinning import PIN_VARIABLE
from sandboxes.gateway import ArtifactSink, GuestGateway, OutputSink, SandboxDied
from sandboxes.models import (
    Health,
    Machine,
    MachineUsage,
    SandboxInfo,
    Step,
    StepOutcome,
    TerminalStep,
)
from sandboxes.tokens import guest_token

log = logging.getLogger("berth.sandboxes")

# The guest token's name in guest_env(): a provider hands it to the guest agent by a way no
# step can read (never the machine's environment).
TOKEN_VARIABLE = "BERTH_GUEST_TOKEN"
# What is_running() says of a machine that does not exist (any more).
MISSING = "missing"
# A sandbox id as it may name a folder: the workflow makes hex ids, but a resumed session's
# kept id comes back through the database and the workflow's input, which the root worker
# must not trust to stay inside its folders ("../..", "/etc").
SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def _discard(seq: int, stream: str, text: str) -> None:
    """Output of the provider's own commands in a guest is not kept."""


def machine_name(sandbox_id: str) -> str:
    """The provider's name for a sandbox's machine (a container's, a domain's)."""
    return f"berth-{sandbox_id}"


@dataclass(frozen=True)
class SandboxHost:
    """The sandbox host a provider works for, whatever its kind of machine: made from the
    settings by the composition at the top (berth/host.py), so no provider reads them."""

    # The current guest key: it signs each guest's token, and names the install.
    key: bytes = field(repr=False)
    host_id: str
    # The host's Temporal task queue, which its sessions' workflows and activities share.
    task_queue: str
    # Where preserved sandboxes' disks or workspaces are kept (see SandboxProvider.preserved).
    preserved_root: Path
    # The install the machines are made for: its data dir, absolute. Each machine carries it
    # (a label, the domain's metadata), so `python -m berth machines` can tell the machines
    # of an install whose data dir is gone, which no worker will ever find again.
    install: str = ""


class SandboxProvider(abc.ABC):
    name: str

    def __init__(self, gateway: GuestGateway, host: SandboxHost) -> None:
        self.gateway = gateway
        self.preserved_root = host.preserved_root
        self._key = host.key
        self.host_id = host.host_id
        # Which install a machine belongs to, derived from its signing key: two installs that
        # share a container engine (and a host id) never take each other's machines for theirs.
        self.deployment = hashlib.sha256(b"deployment:" + host.key).hexdigest()[:12]
        self.task_queue = host.task_queue
        self.install = host.install
        # A guest's token opens its link only while its machine runs (so not once its
        # sandbox is destroyed, whatever the gateway remembers).
        gateway.alive = self._machine_runs

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

    async def keep(self, sandbox: SandboxInfo, folder: Path) -> None:
        """Save what a preserved session keeps (a VM's disk, a container's workspace) into
        ``folder``, then remove the machine. Idempotent: a retry after the machine is gone
        keeps what was saved."""
        raise NotImplementedError(f"{self.name} machines cannot be preserved")

    async def bring_back(self, sandbox: SandboxInfo, folder: Path, timeout_s: float) -> None:
        """Give the freshly provisioned ``sandbox`` what ``keep`` saved in ``folder``.
        Called before its boot where the machine boots from it (``boots_from_kept``), else
        once its guest has connected."""
        raise NotImplementedError(f"{self.name} machines cannot be preserved")

    # Whether bring_back() goes before the machine starts (a VM's disk) or after (files).
    boots_from_kept: bool = False

    async def usage(self, machines: list[Machine]) -> dict[str, MachineUsage]:
        """The running machines' CPU and memory use, by sandbox id (cheaply: one call for
        all where the provider allows)."""
        return {}

    @abc.abstractmethod
    async def is_running(self, handle: str) -> tuple[bool, str]:
        """Whether the machine runs, and the provider's word on its state."""

    @abc.abstractmethod
    def guest_url(self) -> str:
        """The gateway's address as seen from inside a machine."""

    def accel(self) -> str:
        """How its machines run, for the host registry: "kvm" or "tcg" for VMs, "none" for
        containers (the host's own kernel)."""
        return "none"

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

    async def _machine_runs(self, sandbox_id: str) -> bool:
        running, _ = await self.is_running(machine_name(sandbox_id))
        return running

    async def provision(self, sandbox_id: str, session_id: str, template: str) -> SandboxInfo:
        self.gateway.admit(sandbox_id)
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

    def placeholder(self, sandbox_id: str, session_id: str, template: str) -> SandboxInfo:
        """The sandbox as known before its machine is made: by its name, which is enough to
        remove it."""
        return SandboxInfo(
            id=sandbox_id, session_id=session_id, provider=self.name, host_id=self.host_id,
            task_queue=self.task_queue, template=template, handle=machine_name(sandbox_id),
        )  # fmt: skip

    def preserved(self, sandbox_id: str) -> Path:
        """Where a preserved sandbox's disk or workspace is kept: outside every machine's
        folder, so neither reconciliation nor a removal ever deletes it."""
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise ValueError(f"not a sandbox id: {sandbox_id[:80]!r}")
        return self.preserved_root / sandbox_id

    async def preserve(self, sandbox: SandboxInfo, timeout_s: float) -> None:
        """End the machine, keeping its disk (or workspace) under preserved(): a hibernated
        one is woken first, and the guest's writes flushed, so the disk is whole."""
        folder = self.preserved(sandbox.id)
        running, state = await self.is_running(sandbox.handle)
        # Missing: a retry after an attempt that kept the disk and removed the machine, but
        # whose answer was lost. Waking it would wait for a guest that never comes; keep()
        # says whether what it saved is there.
        if state != MISSING:
            try:
                if not running:
                    await self.wake(sandbox, timeout_s)
                await self.in_guest(sandbox, "sync")
            except Exception as exc:
                # The user asked to keep this disk: a machine that will not wake or a guest
                # that will not answer must not cost it. A disk that lives on the host is
                # kept as the machine last wrote it (what the guest had not flushed is
                # lost); a container's workspace lives only in the running container.
                if not self.boots_from_kept:
                    raise
                log.warning("keeping the disk of %s without its guest's flush: %s", sandbox.id, exc)
        folder.mkdir(parents=True, exist_ok=True)
        self.gateway.forget(sandbox.id)
        await self.keep(sandbox, folder)

    async def restore(
        self, preserved_id: str, sandbox_id: str, session_id: str, template: str, timeout_s: float
    ) -> SandboxInfo:
        """A new machine for the session with a preserved sandbox's disk or workspace,
        connected; what was kept is deleted only once the new machine has it."""
        folder = self.preserved(preserved_id)
        if not folder.exists():
            if (await self.is_running(machine_name(sandbox_id)))[0]:
                # A retry after an attempt that restored it and deleted the kept copy, but
                # whose answer was lost: the machine made then is the one (made again, it is
                # found by its id); failing here would destroy the only copy of the files.
                sandbox = await self.provision(sandbox_id, session_id, template)
                await self.wait_connected(sandbox, timeout_s)
                return sandbox
            raise FileNotFoundError(f"nothing of sandbox {preserved_id} was kept")
        sandbox = await self.made_from(folder, sandbox_id, session_id, template, timeout_s)
        await asyncio.to_thread(shutil.rmtree, folder, True)
        return sandbox

    async def made_from(
        self, folder: Path, sandbox_id: str, session_id: str, template: str, timeout_s: float
    ) -> SandboxInfo:
        """A new machine, connected, with the disk or workspace kept in ``folder`` (which
        stays): booted from it, or given it once up."""
        placeholder = self.placeholder(sandbox_id, session_id, template)
        if self.boots_from_kept:
            await self.bring_back(placeholder, folder, timeout_s)
        sandbox = await self.provision(sandbox_id, session_id, template)
        await self.wait_connected(sandbox, timeout_s)
        if not self.boots_from_kept:
            await self.bring_back(sandbox, folder, timeout_s)
        return sandbox

    # ---- checkpoints (sessions' saved states; their folders beside the preserved disks)

    def checkpoint_folder(self, checkpoint_id: str) -> Path:
        if not SANDBOX_ID.fullmatch(checkpoint_id):
            raise ValueError(f"not a checkpoint id: {checkpoint_id[:80]!r}")
        return self.preserved_root.parent / "checkpoints" / checkpoint_id

    async def save_checkpoint(self, sandbox: SandboxInfo, folder: Path, memory: bool) -> bool:
        """Save the running machine's state into ``folder``, the machine going on; whether
        its memory was kept too (asked by ``memory``, and the provider can)."""
        raise NotImplementedError(f"{self.name} machines cannot be checkpointed")

    async def load_checkpoint(
        self, sandbox: SandboxInfo, folder: Path, timeout_s: float
    ) -> SandboxInfo:
        """Put the machine back to the state saved in ``folder`` (no step runs meanwhile),
        connected: by default made again under its id from the saved disk (a VM's)."""
        if not self.boots_from_kept:
            raise NotImplementedError(f"{self.name} machines cannot be rolled back")
        self.gateway.forget(sandbox.id)
        await self.remove(sandbox.handle)
        await self.bring_back(sandbox, folder, timeout_s)
        again = await self.provision(sandbox.id, sandbox.session_id, sandbox.template)
        await self.wait_connected(again, timeout_s)
        return again

    async def from_checkpoint(
        self, folder: Path, sandbox_id: str, session_id: str, template: str, timeout_s: float
    ) -> SandboxInfo:
        """A new machine with a checkpoint's state (a fork), connected; the checkpoint stays."""
        if not await asyncio.to_thread(folder.exists):
            raise FileNotFoundError(f"checkpoint {folder.name} is not kept on this host")
        return await self.made_from(folder, sandbox_id, session_id, template, timeout_s)

    async def in_guest(self, sandbox: SandboxInfo, command: str) -> None:
        """Run one of the provider's own commands in the guest (its output not kept)."""
        step = TerminalStep(command=command)
        outcome = await self.run_step(sandbox, f"host-{uuid.uuid4().hex}", step, 60, _discard)
        if not outcome.ok:
            log.warning("sandbox %s: %r failed: %s", sandbox.id, command, outcome)

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
        stood still while the machine was suspended. SandboxDied if the machine is gone
        (removed while it slept): no guest would ever come back."""
        if (await self.is_running(sandbox.handle))[1] == MISSING:
            raise SandboxDied(f"its machine {sandbox.handle[:12]} is gone (removed while it slept)")
        await self.resume(sandbox.handle)
        await self.wait_connected(sandbox, timeout_s)
        # The agent sets it (steps are unprivileged), before it takes the next step.
        await self.gateway.set_clock(sandbox.id, time.time())

    async def health(self, sandbox: SandboxInfo) -> Health:
        running, detail = await self.is_running(sandbox.handle)
        return Health(
            running=running, guest_connected=self.gateway.is_connected(sandbox.id), detail=detail
        )

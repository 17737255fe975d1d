"""Docker containers as sandboxes: the seed's "mock mode".

No registry is reachable, so images are made here: the template's debootstrap root
filesystem (sandboxes.rootfs, shared with the VM images) goes through ``docker import`` into
a base image, and the template's Dockerfile adds the guest agent. Containers sit on an
internal bridge whose only way out is the guest gateway's port on the host (and the host
ports the settings allow besides).

Inside, the guest agent is root with only the capabilities it needs to run steps as the
unprivileged `berth` (see guest_agent/user.py) and kill them; the root filesystem is
read-only, and the writable places are size-limited tmpfs: the workspace, /tmp and /run.
The guest token is never in the container's configuration (environment, arguments: all of
it shows in `docker inspect`): it goes in through `docker exec`'s standard input into a
root-only file, once the container runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import guest_agent
import vm_templates
from guest_agent.user import STEP_UID, STEP_USER, WORKSPACE, WORKSPACE_MODE
from sandboxes import firewall
from sandboxes.gateway import GuestGateway
from sandboxes.models import HostMachine, Machine, MachineUsage, SandboxInfo
from sandboxes.provider import (
    MISSING,
    TOKEN_VARIABLE,
    SandboxHost,
    SandboxProvider,
    machine_name,
)
from sandboxes.rootfs import copy_site, rootfs, site_packages, versions

log = logging.getLogger("berth.docker")

NETWORK = "berth-sandbox"
BRIDGE = "berth0"
FIREWALL_CHAIN = "BERTH-SANDBOX"
LABEL = "berth.sandbox"
SESSION_LABEL = "berth.session"
HOST_LABEL = "berth.host"
DEPLOYMENT_LABEL = "berth.deployment"
INSTALL_LABEL = "berth.install"
TOKEN_FILE = "/run/berth/token"
# Writes the token from standard input, whole or not at all (the agent waits for the file).
WRITE_TOKEN = (
    f"umask 077 && mkdir -p {os.path.dirname(TOKEN_FILE)} && cat > {TOKEN_FILE}.part "
    f"&& chmod 0400 {TOKEN_FILE}.part && mv {TOKEN_FILE}.part {TOKEN_FILE}"
)
# The agent's capabilities: to become the steps' user (setpriv), to signal its processes,
# to give Chromium's profile directory to that user. Nothing else; no NET_RAW.
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL", "CHOWN")


# A kept session's files. The workspace (guest_agent.user.WORKSPACE) is a tmpfs, which
# `docker cp` does not see: they are copied with `docker exec` and tar, as the steps' user
# (root in the container has no DAC_OVERRIDE to read its home).
WORKSPACE_TAR = "workspace.tar"
# A kept workspace's archive holds its data and a header per file: at most twice the
# workspace's size, and this much more.
KEPT_SLACK_MB = 64
UNITS = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "kB": 1e3 / 2**20,
         "MB": 1e6 / 2**20, "GB": 1e9 / 2**20}  # fmt: skip


class DockerError(RuntimeError):
    pass


def _mebibytes(text: str) -> float:
    """``docker stats``' "12.5MiB" in MiB."""
    number = text.rstrip("BKMGiakb")
    return float(number) * UNITS[text[len(number) :]]


async def _run(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode().strip()


async def docker(*args: str) -> str:
    code, out, err = await _run(*args)
    if code != 0:
        raise DockerError(f"docker {args[0]} failed: {err}")
    return out


async def exists(kind: str, name: str) -> bool:
    code, _, _ = await _run(kind, "inspect", name)
    return code == 0


# `docker ps` line of a machine: labels are ids and paths (no tabs); CreatedAt, with spaces,
# comes last.
MACHINE_FORMAT = "\t".join(
    ["{{.ID}}", "{{.Names}}"]
    + [f'{{{{.Label "{label}"}}}}' for label in (LABEL, SESSION_LABEL, HOST_LABEL, INSTALL_LABEL)]
    + ["{{.State}}", "{{.CreatedAt}}"]
)


def _created(text: str) -> datetime:
    # "2006-01-02 15:04:05 -0700 MST": the zone's name adds nothing to the offset.
    return datetime.strptime(text.rsplit(" ", 1)[0], "%Y-%m-%d %H:%M:%S %z")


async def every_machine(*labels: str) -> list[HostMachine]:
    """Every Berth container on this engine, of any install or host (or those with each of
    ``labels``, ``NAME=VALUE``)."""
    filters = [arg for label in (LABEL, *labels) for arg in ("--filter", f"label={label}")]
    out = await docker("ps", "--all", "--no-trunc", *filters, "--format", MACHINE_FORMAT)
    found = []
    for line in out.splitlines():
        handle, name, sandbox_id, session_id, host_id, install, state, created = line.split("\t")
        found.append(
            HostMachine(
                kind="docker",
                name=name,
                handle=handle,
                sandbox_id=sandbox_id,
                session_id=session_id,
                host_id=host_id,
                install=install,
                state=state,
                created_at=_created(created),
            )
        )
    return found


def engine_running() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def start_engine(log_path: Path, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start dockerd (no systemd here). Containers outlive it (live-restore), so durable
    sessions find their sandboxes again after a restart."""
    if shutil.which("dockerd") is None:
        raise DockerError("dockerd is not installed: run `make setup` (Debian package docker.io)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as sink:
        process = subprocess.Popen(
            ["dockerd", "--live-restore"], stdout=sink, stderr=sink, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while not engine_running():
        if process.poll() is not None or time.monotonic() > deadline:
            raise DockerError(f"dockerd did not come up; see {log_path}")
        time.sleep(0.5)
    return process


class DockerProvider(SandboxProvider):
    name = "docker"

    def __init__(
        self,
        gateway: GuestGateway,
        host: SandboxHost,
        *,
        gateway_port: int,
        build_dir: Path,
        mirror: str,
        cpus: float,
        memory_mb: int,
        pids: int,
        workspace_mb: int = 512,
        tmp_mb: int = 128,
        host_ports: tuple[int, ...] = (),
        network: str = NETWORK,
        bridge: str = BRIDGE,
    ) -> None:
        super().__init__(gateway, host)
        # One engine, many hosts (a local fleet): each host's sandboxes on a network of its
        # own, whose subnet Docker picks; the default one is shared by every install.
        self.network = network
        self.bridge = bridge
        self.gateway_port = gateway_port
        self.build_dir = build_dir
        self.mirror = mirror
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.pids = pids
        self.workspace_mb = workspace_mb
        self.tmp_mb = tmp_mb
        self.host_ports = host_ports
        self._gateway_ip: str | None = None

    @property
    def host_address(self) -> str:
        """The host's address on the sandboxes' bridge: where they reach the gateway and the
        allowed host ports."""
        assert self._gateway_ip, "prepare() first"
        return self._gateway_ip

    async def prepare(self) -> None:
        self._gateway_ip = await self._ensure_network()
        self._ensure_firewall()
        for template in vm_templates.names():
            await self.ensure_image(template)

    def guest_url(self) -> str:
        return self.gateway.url(self.host_address, self.gateway_port)

    async def create(
        self, sandbox_id: str, session_id: str, template: str, env: dict[str, str]
    ) -> str:
        image = await self.ensure_image(template)
        name = machine_name(sandbox_id)
        args = [
            "run",
            "--detach",
            "--init",
            "--name",
            name,
            "--hostname",
            f"berth-{sandbox_id[:12]}",
            "--label",
            f"{LABEL}={sandbox_id}",
            "--label",
            f"{SESSION_LABEL}={session_id}",
            "--label",
            f"{HOST_LABEL}={self.host_id}",
            "--label",
            f"{DEPLOYMENT_LABEL}={self.deployment}",
            "--label",
            f"{INSTALL_LABEL}={self.install}",
            "--network",
            self.network,
            f"--cpus={self.cpus}",
            f"--memory={self.memory_mb}m",
            f"--pids-limit={self.pids}",
            "--security-opt",
            "no-new-privileges",
            "--cap-drop",
            "ALL",
            *(f"--cap-add={capability}" for capability in AGENT_CAPABILITIES),
            # No unprivileged ICMP sockets either (Docker allows them by default).
            "--sysctl",
            "net.ipv4.ping_group_range=1 0",
            "--read-only",
            "--tmpfs",
            f"{WORKSPACE}:rw,exec,nosuid,nodev,size={self.workspace_mb}m,"
            f"uid={STEP_UID},gid={STEP_UID},mode={WORKSPACE_MODE:o}",
            "--tmpfs",
            f"/tmp:rw,exec,nosuid,nodev,size={self.tmp_mb}m,mode=1777",
            "--tmpfs",
            "/run:rw,noexec,nosuid,nodev,size=1m,mode=0755",
        ]
        for key, value in env.items():
            if key != TOKEN_VARIABLE:
                args += ["--env", f"{key}={value}"]
        code, handle, err = await _run(*args, image)
        if code == 0:
            await self._give_token(handle, env[TOKEN_VARIABLE])
            return handle
        # A retried provisioning finds the container of an earlier attempt under the name.
        found, existing, _ = await _run(
            "inspect", "--type", "container", "--format", "{{.Id}} {{.State.Status}}", name
        )
        if found != 0:
            raise DockerError(f"docker run failed: {err}")
        handle, state = existing.split()
        if state != "running":
            await docker("start", handle)
        await self._give_token(handle, env[TOKEN_VARIABLE])  # /run is a tmpfs: gone if stopped
        log.info("sandbox %s: reusing container %s (was %s)", sandbox_id, handle[:12], state)
        return handle

    async def _give_token(self, handle: str, token: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "docker", "exec", "--interactive", "--user", "0", handle, "/bin/sh", "-c", WRITE_TOKEN,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await process.communicate(token.encode())
        if process.returncode != 0:
            raise DockerError(f"could not give container {handle[:12]} its token: {err.decode()}")

    async def machines(self) -> list[Machine]:
        ours = (f"{HOST_LABEL}={self.host_id}", f"{DEPLOYMENT_LABEL}={self.deployment}")
        machines: list[Machine] = [*await every_machine(*ours)]
        return machines

    async def remove(self, handle: str) -> None:
        code, _, err = await _run("rm", "--force", handle)
        # A container already gone is what we wanted; other failures should surface.
        if code != 0 and await exists("container", handle):
            raise DockerError(f"could not remove container {handle[:12]}: {err}")

    async def suspend(self, handle: str) -> None:
        # The mock of a VM's hibernation: frozen processes, memory kept in place.
        if (await self.is_running(handle))[0]:
            await docker("pause", handle)

    async def resume(self, handle: str) -> None:
        if (await self.is_running(handle))[1] == "paused":
            await docker("unpause", handle)

    async def keep(self, sandbox: SandboxInfo, folder: Path) -> None:
        # Written aside and renamed: a retry after the container is gone keeps it.
        archive = folder / WORKSPACE_TAR
        if await exists("container", sandbox.handle):
            await self._archive(sandbox.handle, archive)
        if not archive.exists():
            raise DockerError(f"container {sandbox.handle[:12]} is gone, its workspace unsaved")
        await self.remove(sandbox.handle)

    async def _archive(self, handle: str, archive: Path) -> None:
        """A tar of the workspace made inside (``docker cp`` would miss a tmpfs workspace),
        written aside and renamed to ``archive``."""
        draft = archive.with_suffix(".part")
        # The guest's files are the user's: a sparse file of any size costs the tmpfs
        # nothing, so holes stay holes (--sparse), and the archive may not grow past
        # what a full workspace makes (the client's file size limit) on the host's disk.
        most = (2 * self.workspace_mb + KEPT_SLACK_MB) * 2**20
        with draft.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                "prlimit", f"--fsize={most}", "--",
                "docker", "exec", "--user", STEP_USER, handle,
                "tar", "--sparse", "-C", WORKSPACE, "-cf", "-", ".",
                stdout=sink, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await process.communicate()
        if process.returncode != 0:
            why = err.decode().strip() or f"an archive of more than {most} bytes"
            raise DockerError(f"saving the workspace failed: {why}")
        draft.replace(archive)

    async def bring_back(self, sandbox: SandboxInfo, folder: Path, timeout_s: float) -> None:
        with (folder / WORKSPACE_TAR).open("rb") as source:
            process = await asyncio.create_subprocess_exec(
                "docker", "exec", "-i", "--user", STEP_USER, sandbox.handle,
                "tar", "-C", WORKSPACE, "-xf", "-", stdin=source, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await process.communicate()
        if process.returncode != 0:
            raise DockerError(f"restoring the workspace failed: {err.decode().strip()}")

    async def save_checkpoint(self, sandbox: SandboxInfo, folder: Path, memory: bool) -> bool:
        # The mock keeps the workspace only: a container's memory cannot be saved here.
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        await self._archive(sandbox.handle, folder / WORKSPACE_TAR)
        return False

    async def load_checkpoint(
        self, sandbox: SandboxInfo, folder: Path, timeout_s: float
    ) -> SandboxInfo:
        # In place: everything in the workspace goes (the step user's files), then the
        # archive's comes back.
        await docker(
            "exec", "--user", STEP_USER, sandbox.handle,
            "find", WORKSPACE, "-mindepth", "1", "-delete",
        )  # fmt: skip
        await self.bring_back(sandbox, folder, timeout_s)
        return sandbox

    async def usage(self, machines: list[Machine]) -> dict[str, MachineUsage]:
        """One ``docker stats`` for every running container."""
        running = {m.handle: m.sandbox_id for m in machines if m.state == "running"}
        if not running:
            return {}
        code, out, _ = await _run(
            "stats", "--no-stream", "--no-trunc", "--format",
            "{{.ID}}\t{{.CPUPerc}}\t{{.MemUsage}}", *running,
        )  # fmt: skip
        found: dict[str, MachineUsage] = {}
        for line in out.splitlines() if code == 0 else []:
            handle, cpu, memory = line.split("\t")
            sandbox_id = running.get(handle)
            with contextlib.suppress(ValueError):
                if sandbox_id is not None:
                    found[sandbox_id] = MachineUsage(
                        cpu_percent=float(cpu.rstrip("%")),
                        memory_mb=_mebibytes(memory.split("/")[0].strip()),
                    )
        return found

    async def is_running(self, handle: str) -> tuple[bool, str]:
        code, state, _ = await _run("inspect", "--format", "{{.State.Status}}", handle)
        return code == 0 and state == "running", state if code == 0 else MISSING

    async def _ensure_network(self) -> str:
        if not await exists("network", self.network):
            await docker(
                "network",
                "create",
                "--internal",
                "--opt",
                f"com.docker.network.bridge.name={self.bridge}",
                "--opt",
                "com.docker.network.bridge.enable_icc=false",
                self.network,
            )
        return await docker(
            "network", "inspect", self.network, "--format", "{{(index .IPAM.Config 0).Gateway}}"
        )

    def _ensure_firewall(self) -> None:
        """Sandboxes may reach the host on the gateway's port, and the allowed host ports,
        over IPv4, and nothing else (see sandboxes/firewall.py for how installs share the
        chain)."""
        try:
            firewall.no_ipv6(self.bridge)
        except OSError as exc:
            # /proc/sys read-only (a worker in a container, docker-compose.yml): Docker gives
            # its containers no IPv6 and steps cannot turn it on, so this is the second line.
            log.warning("IPv6 stays on on %s, the sandboxes' bridge: %s", self.bridge, exc)
        firewall.ensure_chain(FIREWALL_CHAIN)
        tag = firewall.owner_tag(self.gateway_port)
        firewall.remove_tagged(FIREWALL_CHAIN, tag)  # left by a worker that crashed
        for port in (self.gateway_port, *self.host_ports):
            firewall.accept_port(FIREWALL_CHAIN, port, tag)
        firewall.ensure_rule(FIREWALL_CHAIN, "-j", "DROP")
        firewall.ensure_rule("INPUT", "-i", self.bridge, "-j", FIREWALL_CHAIN, first=True)

    async def close(self) -> None:
        firewall.remove_tagged(FIREWALL_CHAIN, firewall.owner_tag(self.gateway_port))
        if self.network == NETWORK:
            return  # shared by every install: it stays
        # A host's own network goes with it, unless sandboxes of its still sit on it (their
        # sessions carry on; the next start of this host finds it again).
        code, _, err = await _run("network", "rm", self.network)
        if code != 0:
            log.info("network %s stays: %s", self.network, err.strip())
            return
        if firewall.has_rule("INPUT", "-i", self.bridge, "-j", FIREWALL_CHAIN):
            firewall.run("-D", "INPUT", "-i", self.bridge, "-j", FIREWALL_CHAIN)

    async def ensure_image(self, template: str) -> str:
        folder = vm_templates.path(template)
        base = f"berth-base-{template}:{vm_templates.fingerprint(folder / 'packages')}"
        site = site_packages(template)
        # The image changes with the template, the guest, its packages and how its files are
        # laid out (rootfs.py: copy_site and the modes it gives them).
        key = vm_templates.fingerprint(
            folder,
            Path(guest_agent.__file__).parent,
            Path(__file__).with_name("rootfs.py"),
            extra=versions(site),
        )
        image = f"berth-sandbox-{template}:{key}"
        if await exists("image", image):
            return image
        if not await exists("image", base):
            await asyncio.to_thread(self._build_base, template, base)
        log.info("building %s", image)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.build_dir) as context:
            shutil.copytree(
                Path(guest_agent.__file__).parent,
                Path(context) / "guest_agent",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            shutil.copy(folder / "Dockerfile", context)
            copy_site(site, Path(context) / "site")
            # The classic builder uses the local base image as is; BuildKit would try a pull.
            process = await asyncio.create_subprocess_exec(
                "docker",
                "build",
                "--build-arg",
                f"BASE={base}",
                "--tag",
                image,
                "--quiet",
                context,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _, err = await process.communicate()
            if process.returncode != 0:
                raise DockerError(f"building {image} failed: {err.decode().strip()}")
        return image

    def _build_base(self, template: str, tag: str) -> None:
        """Import the template's root filesystem (debootstrapped once, shared with VMs)."""
        root = rootfs(template, self.mirror, self.build_dir)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-", tag], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL
        )
        if tar.wait() != 0:
            raise DockerError("tar of the root filesystem failed")

"""The whole system as a child process, on a data dir of its own and free ports, started
exactly as ``make run`` starts it: what the benchmarks and the end-to-end tests drive."""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
from temporalio.client import Client

from berth.privileges import interpreter
from config.settings import Settings
from workflows.client import connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range, for a listener started long after
    it is chosen: the ports the system's own servers are given (Temporal's dev server opens
    several) come from that range, so they cannot take it meanwhile (seen once in CI)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def quiet_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports below the ephemeral range (a fleet's
    API replicas and guest gateways take the ports after the first)."""
    while True:
        first = quiet_port()
        rest = []
        try:
            for port in range(first + 1, first + n):
                s = socket.socket()
                rest.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in rest:
                s.close()
        return first


def python_script(name: str, *lines: str) -> str:
    """A step's command that writes a Python script and runs it: a loop in a form the default
    command policy allows (no shell loops, no substitutions)."""
    return f"printf '%s\\n' {' '.join(map(shlex.quote, lines))} > {name}; python3 {name}"


def traversable(data: Path) -> None:
    """Let other users pass (not list) the folders of ours in the temporary dir on the way to
    ``data``: run as root, the system runs its API and Temporal as another user, who must reach
    the data dir (pytest's temporary folders are private)."""
    temporary = Path(tempfile.gettempdir()).resolve()
    for folder in reversed(data.resolve().parents):
        if folder.is_relative_to(temporary) and folder != temporary:
            st = folder.stat()
            if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
                folder.chmod(stat.S_IMODE(st.st_mode) | 0o001)


def reachable_by_others(path: Path) -> bool:
    return all(folder.stat().st_mode & 0o001 for folder in (*path.parents, path))


@dataclass
class LocalSystem:
    base: str  # the API's URL
    temporal: str  # host:port of its Temporal server
    data: Path
    process: subprocess.Popen[bytes]
    verify: ssl.SSLContext | bool = True  # trusts the API's certificate, when it serves HTTPS
    host_id: str = ""  # its worker's
    # The environment it was started with, which another host of it starts from.
    environment: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        data: Path,
        name: str,
        env: dict[str, str] | None = None,
        timeout_s: float = 180,
        provider: str | None = "docker",
        hosts: int = 1,
        api_replicas: int = 1,
    ) -> Self:
        """Start it and wait until the API answers and the worker is up; ``name`` makes its
        host id (and so its containers' label) its own. Sandboxes are Docker containers
        unless ``provider`` says otherwise (None: the system's default, as ``make run``).
        ``hosts`` and ``api_replicas`` make it a fleet (``run --hosts N --api-replicas N``):
        up once every worker is. RuntimeError, with the log's tail, if it does not come up.

        A free port can be taken between its choice and Temporal's bind (the dev server picks
        more ports of its own): a start that failed on that is tried again on new ports."""
        for attempt in range(3):
            try:
                return cls._start(data, name, env, timeout_s, provider, hosts, api_replicas)
            except RuntimeError:
                temporal_log = data / "logs" / "temporal.log"
                taken = temporal_log.exists() and "address already in use" in (
                    temporal_log.read_text(errors="replace")
                )
                if not taken or attempt == 2:
                    raise
                temporal_log.unlink()
        raise AssertionError("unreachable")

    @classmethod
    def _start(
        cls,
        data: Path,
        name: str,
        env: dict[str, str] | None,
        timeout_s: float,
        provider: str | None,
        hosts: int,
        api_replicas: int,
    ) -> Self:
        port, temporal_port = free_port(), free_port()
        if api_replicas > 1:
            port = quiet_ports(api_replicas + 1)
        settings = {
            "BERTH_DATA_DIR": str(data),
            "BERTH_PORT": str(port),
            "BERTH_TEMPORAL_PORT": str(temporal_port),
            "BERTH_TEMPORAL_UI_PORT": str(free_port()),
            "BERTH_GATEWAY_PORT": str(free_port() if hosts == 1 else quiet_ports(hosts)),
            "BERTH_RELAY_PORT": str(free_port() if hosts == 1 else quiet_ports(hosts)),
            "BERTH_HOST_ID": f"{name}{port}",
        }
        if provider is not None:
            settings["BERTH_SANDBOX_PROVIDER"] = provider
        data.mkdir(parents=True, exist_ok=True)
        traversable(data)
        if not all(reachable_by_others(folder) for folder in interpreter()):
            # A Python only root reaches (pyenv in /root, say): nothing to drop to.
            settings["BERTH_RUN_AS"] = ""
        environment = {**os.environ, **settings, **(env or {})}
        with (data / "run.log").open("wb") as log:
            fleet = ["--hosts", str(hosts), "--api-replicas", str(api_replicas)]
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "berth",
                    "run",
                    *(fleet if hosts + api_replicas > 2 else []),
                ],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        certificate = environment.get("BERTH_TLS_CERT_FILE")
        base = f"{'https' if certificate else 'http'}://127.0.0.1:{port}"
        verify = ssl.create_default_context(cafile=certificate) if certificate else True
        system = cls(
            base, f"127.0.0.1:{temporal_port}", data, process, verify,
            settings["BERTH_HOST_ID"], environment,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            if system.healthy() and system.log().count("worker up") >= hosts:
                return system
            time.sleep(0.3)
        system.stop()
        raise RuntimeError(f"the system did not come up:\n{system.log()[-3000:]}")

    def add_host(self, name: str) -> subprocess.Popen[bytes]:
        """A second sandbox host of this system: a worker with a host id, gateway and relay
        ports of its own, on the same database and Temporal (a fleet of two on one machine). Its
        output goes to ``<data>/<name>.log``; it is up once its host is in the registry."""
        environment = {
            **self.environment,
            "BERTH_HOST_ID": f"{name}{self.host_id}",
            "BERTH_GATEWAY_PORT": str(free_port()),
            "BERTH_RELAY_PORT": str(free_port()),
            "BERTH_TEMPORAL_ADDRESS": self.temporal,
        }
        with (self.data / f"{name}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "berth", "worker"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def client(self) -> Client:
        """A Temporal client of this system's, with its payload keys (from its data dir)."""
        return await connect(Settings(data_dir=self.data, temporal_address=self.temporal))

    def healthy(self) -> bool:
        try:
            return (
                httpx.get(f"{self.base}/healthz", timeout=2, verify=self.verify).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        """What the supervisor and its children printed."""
        return (self.data / "run.log").read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C; the supervisor's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

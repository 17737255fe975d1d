"""``python -m berth run``: the whole system in the foreground.

Migrates the database, then starts what is not running yet (the Docker engine, the Temporal
dev server unless BERTH_TEMPORAL_ADDRESS names one), then the worker and the API. With
``--hosts N`` it starts N worker hosts, the first the settings' own and each other one with
an id, gateway port, sandbox bridge and subnet of its own (``fleet_host``); with
``--api-replicas N``, N API processes on the ports after BERTH_PORT and nginx on BERTH_PORT
in front of them (berth/balancer.py): a fleet on one machine, for tests and demos. Started as
root, it runs the API and Temporal as BERTH_RUN_AS (berth/privileges.py). A child
that dies is restarted after a backoff (1 s, doubling up to 30 s, back to 1 s once it has
stayed up a minute); each child's pid is in ``<data dir>/run/<name>.pid``. Ctrl-C or SIGTERM
stops everything it started, newest first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sqlalchemy.exc import SQLAlchemyError

from berth.balancer import REPLICA_HEADER, Balancer
from berth.privileges import Unreachable, hand_over, settle_layout, unprivileged
from config.settings import Settings, get_settings
from sandboxes.docker import engine_running, start_engine
from store import nofollow
from store.db import migrate
from telemetry import logs
from workflows import search

STOP_GRACE_S = 15.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 60.0  # a child up this long counts as healthy again
# API replicas import and start together, beside the workers: on two busy cores, minutes.
REPLICAS_START_S = 240.0


log = logging.getLogger("berth.run")


def say(message: str) -> None:
    log.info(message)


def wait_for_port(
    name: str, host: str, port: int, process: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def fleet_host(settings: Settings, k: int) -> dict[str, str]:
    """The settings of the fleet's host ``k`` (from 1) that differ from the first's, as
    environment: the first is the settings' own host; host k is ``<host id>-k``, its gateway
    on the k-th port from BERTH_GATEWAY_PORT, its VMs on a bridge and subnet of their own
    (the subnet after the first's, and so on), its containers on a Docker network of their
    own (whose subnet Docker picks)."""
    if k == 1:
        return {}
    host_id = f"{settings.host_id}-{k}"
    first = ipaddress.IPv4Network(settings.vm_subnet)
    start = int(first.network_address) + (k - 1) * first.num_addresses
    # Linux names a bridge in 15 characters; the Docker one is unique to the install (its
    # data dir) and host, as installs on one engine may each run a fleet.
    digest = hashlib.sha256(f"{settings.data_dir.resolve()}/{host_id}".encode()).hexdigest()
    env = {
        "BERTH_HOST_ID": host_id,
        "BERTH_GATEWAY_PORT": str(settings.gateway_port + k - 1),
        "BERTH_RELAY_PORT": str(settings.relay_port + k - 1),
        "BERTH_VM_BRIDGE": f"{settings.vm_bridge[:11]}-{k}",
        "BERTH_VM_SUBNET": str(ipaddress.IPv4Network((start, first.prefixlen))),
        "BERTH_DOCKER_NETWORK": f"{settings.docker_network}-{digest[:12]}",
        "BERTH_DOCKER_BRIDGE": f"berth-{digest[:9]}",
    }
    for name in ("worker_metrics_port", "temporal_metrics_port"):
        port: int = getattr(settings, name)
        if port:
            env[f"BERTH_{name.upper()}"] = str(port + k - 1)
    return env


class Child:
    """A process the supervisor keeps running: started by ``launch``, restarted with backoff."""

    def __init__(
        self, name: str, launch: Callable[[], subprocess.Popen[bytes]], pid_dir: Path
    ) -> None:
        self.name = name
        self.launch = launch
        self.pid_file = pid_dir / f"{name}.pid"
        self.backoff_s = BACKOFF_MIN_S
        self.restart_at: float | None = None  # set while a restart is pending
        self.started_at = time.monotonic()
        self.process = launch()
        self.write_pid()

    def tend(self) -> None:
        """Notice that the process died, and restart it once its backoff has passed."""
        if self.restart_at is None:
            if self.process.poll() is not None:
                self.schedule_restart(f"exited with {self.process.returncode}")
            return
        if time.monotonic() < self.restart_at:
            return
        self.restart_at = None
        self.started_at = time.monotonic()
        try:
            self.process = self.launch()
        except (OSError, RuntimeError) as exc:
            self.schedule_restart(f"did not start ({exc})")
            return
        self.write_pid()

    def write_pid(self) -> None:
        # Written aside, then renamed: a reader never sees a half-written file.
        draft = self.pid_file.with_name(f"{self.pid_file.name}.new")
        draft.write_text(f"{self.process.pid}\n")
        draft.replace(self.pid_file)

    def schedule_restart(self, why: str) -> None:
        now = time.monotonic()
        if now - self.started_at >= BACKOFF_RESET_S:
            self.backoff_s = BACKOFF_MIN_S
        say(f"{self.name} {why}; restarting in {self.backoff_s:.0f} s")
        self.restart_at = now + self.backoff_s
        self.backoff_s = min(2 * self.backoff_s, BACKOFF_MAX_S)

    def stop(self) -> None:
        self.restart_at = None
        self.pid_file.unlink(missing_ok=True)
        if self.process.poll() is not None:
            return
        say(f"stopping {self.name}")
        self.process.terminate()
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Supervisor:
    def __init__(self, settings: Settings, hosts: int = 1, api_replicas: int = 1) -> None:
        self.settings = settings
        self.hosts = hosts
        self.api_replicas = api_replicas
        self.logs = settings.data_dir / "logs"
        self.pids = settings.data_dir / "run"
        self.children: list[Child] = []
        self.account = unprivileged(settings)
        self.unprivileged_env: dict[str, str] = {}

    def spawn(
        self,
        name: str,
        args: list[str],
        log: bool = False,
        privileged: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a child, with ``env`` added to its environment; an unprivileged one runs as
        the account, if there is one."""
        drop: dict[str, Any] = {"env": {**os.environ, **env} if env else None}
        if not privileged and self.account is not None:
            drop = {
                "user": self.account.uid,
                "group": self.account.gid,
                "extra_groups": [],
                "env": {**self.unprivileged_env, **(env or {})},
            }

        def launch() -> subprocess.Popen[bytes]:
            if not log:
                return subprocess.Popen(args, **drop)
            with (self.logs / f"{name}.log").open("ab") as sink:
                return subprocess.Popen(args, stdout=sink, stderr=sink, **drop)

        child = Child(name, launch, self.pids)
        self.children.append(child)
        return child.process

    def codec_endpoint(self) -> str:
        host = self.settings.host
        reachable = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"{self.settings.api_scheme}://{reachable}:{self.settings.port}/codec"

    def temporal_tuning(self) -> list[str]:
        limit = self.settings.temporal_suggest_continue_as_new
        if limit is None:
            return []
        return ["--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={limit}"]

    def sandboxes(self) -> str:
        """Which sandboxes sessions get, and how to choose the other kind."""
        settings = self.settings
        if settings.sandbox_provider == "docker":
            return (
                "sandboxes: Docker containers (mock mode; unset BERTH_SANDBOX_PROVIDER for "
                "libvirt VMs)"
            )
        pool = (
            f"a warm pool of {settings.vm_pool_min} to {settings.vm_pool_max} VMs per template"
            if settings.warm_pool
            else "no warm pool"
        )
        return (
            f"sandboxes: libvirt VMs, one per session, {pool} "
            "(BERTH_SANDBOX_PROVIDER=docker for containers, mock mode)"
        )

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        settle_layout(self.settings)
        # Once here, so that the worker and the API start on a schema that is already there.
        say("migrating the database")
        migrate(self.settings.db_url)
        fleet = self.hosts > 1 or self.api_replicas > 1
        if fleet and self.settings.db_url.startswith("sqlite"):
            say(
                "a fleet on SQLite: one machine only (BERTH_DATABASE_URL=postgresql+psycopg://"
                "... for hosts and replicas on several)"
            )
        if self.api_replicas > 1:
            with nofollow.folder(self.settings.shared_dir, "nginx"):
                pass  # nginx's own folder, handed over to the account with the others
        if self.account is not None:
            try:
                self.unprivileged_env = hand_over(self.settings, self.account)
                say(f"the API and Temporal run as user {self.account.name}")
            except Unreachable as exc:
                # Running beats refusing to: said, with what would let it drop root.
                say(f"the API and Temporal stay root: {exc}")
                self.account = None
        bin_dir = Path(sys.executable).parent
        say(self.sandboxes())
        if self.settings.sandbox_provider == "docker" and not engine_running():
            say("starting the Docker engine")
            log = self.logs / "dockerd.log"
            self.children.append(Child("dockerd", lambda: start_engine(log), self.pids))
        if self.settings.temporal_address is None:
            say(f"starting Temporal (Web UI on port {self.settings.temporal_ui_port})")
            temporal = self.spawn(
                "temporal",
                [
                    str(bin_dir / "temporal"),
                    "server",
                    "start-dev",
                    "--db-filename",
                    str((self.settings.shared_dir / "temporal.db").resolve()),
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.settings.temporal_port),
                    "--ui-port",
                    str(self.settings.temporal_ui_port),
                    # Payloads are encrypted: the Web UI shows them through the API's codec
                    # endpoint, to an admin (see api/codec.py).
                    "--ui-codec-endpoint",
                    self.codec_endpoint(),
                    "--log-level",
                    "warn",
                    # WAL and NORMAL sync: every workflow step is a few history writes.
                    "--sqlite-pragma",
                    "journal_mode=wal",
                    "--sqlite-pragma",
                    "synchronous=normal",
                    *self.temporal_tuning(),
                    # The sessions' filters in the Web UI (workflows/search.py).
                    *search.dev_server_flags(),
                ],
                log=True,
                privileged=False,
            )
            wait_for_port(
                "temporal", "127.0.0.1", self.settings.temporal_port, temporal, timeout_s=60
            )
        self.start_workers()
        self.start_api()
        base = f"{self.settings.api_scheme}://{self.settings.host}:{self.settings.port}"
        say(f"dashboard   {base}/")
        say(f"API docs    {base}/docs")
        if self.settings.temporal_address is None:
            say(f"Temporal UI http://127.0.0.1:{self.settings.temporal_ui_port}/")
        say("Ctrl-C stops everything")

    def start_workers(self) -> None:
        if self.hosts == 1:
            say("starting the worker (it builds the sandbox image on first use)")
            self.spawn("worker", [sys.executable, "-m", "berth", "worker"])
            return
        for k in range(1, self.hosts + 1):
            env = fleet_host(self.settings, k)
            host_id = env.get("BERTH_HOST_ID", self.settings.host_id)
            port = env.get("BERTH_GATEWAY_PORT", self.settings.gateway_port)
            say(f"starting worker-{k}: host {host_id}, guest gateway port {port}")
            self.spawn(f"worker-{k}", [sys.executable, "-m", "berth", "worker"], env=env)

    def start_api(self) -> None:
        settings = self.settings
        command = [sys.executable, "-m", "berth", "api"]
        if self.api_replicas == 1:
            api = self.spawn("api", command, privileged=False)
            wait_for_port("api", settings.host, settings.port, api, timeout_s=60)
            return
        # Behind nginx, on loopback: the ports after the public one.
        replicas = {f"api-{k}": settings.port + k for k in range(1, self.api_replicas + 1)}
        started = [
            (port, self.spawn(name, command, privileged=False,
                              env={"BERTH_HOST": "127.0.0.1", "BERTH_PORT": str(port)}))
            for name, port in replicas.items()
        ]  # fmt: skip
        for port, api in started:
            wait_for_port("api", "127.0.0.1", port, api, timeout_s=REPLICAS_START_S)
        env = self.unprivileged_env or dict(os.environ)
        tls = None
        if settings.tls_cert_file and settings.tls_key_file:
            # The account's copies, when it could not read the originals (hand_over).
            cert = env.get("BERTH_TLS_CERT_FILE", str(settings.tls_cert_file))
            tls = (Path(cert), Path(env.get("BERTH_TLS_KEY_FILE", str(settings.tls_key_file))))
        balancer = Balancer(
            listen_host=settings.host,
            listen_port=settings.port,
            replicas=replicas,
            config_file=settings.data_dir / "balancer" / "nginx.conf",
            folder=settings.shared_dir / "nginx",
            max_body_bytes=settings.max_body_bytes,
            tls=tls,
        )
        balancer.write()
        ports = ", ".join(map(str, replicas.values()))
        say(
            f"starting nginx on port {settings.port} before {len(replicas)} API replicas "
            f"(ports {ports}; the {REPLICA_HEADER} header says which answered)"
        )
        nginx = self.spawn("nginx", balancer.command(), privileged=False)
        wait_for_port("nginx", settings.host, settings.port, nginx, timeout_s=30)

    def watch(self) -> NoReturn:
        while True:
            for child in self.children:
                child.tend()
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def run(hosts: int = 1, api_replicas: int = 1) -> int:
    """The whole system until Ctrl-C or SIGTERM, with ``hosts`` worker hosts and
    ``api_replicas`` API processes (behind nginx when more than one); 1 if it could not
    start."""
    settings = get_settings()
    # What `make run` says goes to its terminal, as it always has.
    logs.configure("run", settings.log_format, stream=sys.stdout, text="berth: %(message)s")
    supervisor = Supervisor(settings, hosts, api_replicas)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.start()
        supervisor.watch()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, SQLAlchemyError) as exc:
        say(f"could not start: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave children behind half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()

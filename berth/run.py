"""``python -m berth run``: the whole system in the foreground.

Starts what is not running yet (the Docker engine, the Temporal dev server unless
BERTH_TEMPORAL_ADDRESS names one), then the worker and the API. Ctrl-C or SIGTERM, or any
of them dying, stops everything it started, newest first.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from berth.settings import Settings, get_settings
from sandboxes.docker import engine_running, start_engine

STOP_GRACE_S = 15.0


def say(message: str) -> None:
    print(f"berth: {message}", flush=True)


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


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logs = settings.data_dir / "logs"
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, args: list[str], log: bool = False) -> subprocess.Popen[bytes]:
        sink = (self.logs / f"{name}.log").open("ab") if log else None
        process = subprocess.Popen(args, stdout=sink, stderr=sink)
        self.children.append((name, process))
        return process

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        if self.settings.sandbox_provider == "docker" and not engine_running():
            say("starting the Docker engine")
            self.children.append(("dockerd", start_engine(self.logs / "dockerd.log")))
        if self.settings.temporal_address is None:
            say(f"starting Temporal (Web UI on port {self.settings.temporal_ui_port})")
            temporal = self.spawn(
                "temporal",
                [
                    str(bin_dir / "temporal"),
                    "server",
                    "start-dev",
                    "--db-filename",
                    str((self.settings.data_dir / "temporal.db").resolve()),
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.settings.temporal_port),
                    "--ui-port",
                    str(self.settings.temporal_ui_port),
                    "--log-level",
                    "warn",
                ],
                log=True,
            )
            wait_for_port(
                "temporal", "127.0.0.1", self.settings.temporal_port, temporal, timeout_s=60
            )
        say("starting the worker (it builds the sandbox image on first use)")
        self.spawn("worker", [sys.executable, "-m", "berth.worker"])
        api = self.spawn("api", [sys.executable, "-m", "api"])
        wait_for_port("api", self.settings.host, self.settings.port, api, timeout_s=60)
        say(f"dashboard   http://{self.settings.host}:{self.settings.port}/")
        say(f"API docs    http://{self.settings.host}:{self.settings.port}/docs")
        if self.settings.temporal_address is None:
            say(f"Temporal UI http://127.0.0.1:{self.settings.temporal_ui_port}/")
        say("Ctrl-C stops everything")

    def watch(self) -> None:
        while True:
            for name, process in self.children:
                if process.poll() is not None:
                    say(f"{name} exited with {process.returncode}; stopping")
                    return
            time.sleep(0.5)

    def stop(self) -> None:
        for name, process in reversed(self.children):
            if process.poll() is None:
                say(f"stopping {name}")
                process.terminate()
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def main() -> int:
    supervisor = Supervisor(get_settings())

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.start()
        supervisor.watch()
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        say(f"could not start: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave children behind half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()

"""Checkpoints, rollback and forks on this host: ``make bench-fork`` (``python -m berth bench
fork``). Per provider (Docker: the workspace as a tar; libvirt: the VM's disk, TCG here), with
a real guest gateway: a disk checkpoint of a running machine; a rollback until a command
answers; a fork of 4 machines from a checkpoint until all 4 guests are connected. Prints a
markdown table, writes JSON to ``--out`` (default ``.berth/bench/fork.json``). ``--runs``
(default 3) sets the repetitions; ``--providers`` which providers (default both)."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import vm_templates
from bench.spine import Metric, machine, table, timed, write_report
from bench.vm import CONNECT_TIMEOUT_S, quiet
from berth.host import make_gateway, make_provider, open_host
from config.settings import Settings
from sandboxes.kept import size_on_disk
from sandboxes.models import SandboxInfo, TerminalStep
from sandboxes.provider import SandboxProvider
from tests.support.local import free_port

FORKS = 4
# Some files in the workspace, so the checkpoint holds more than an empty folder.
FILES = "mkdir -p bench && seq 1 200000 > bench/numbers && head -c 4000000 /dev/urandom > bench/r"


async def answered(provider: SandboxProvider, sandbox: SandboxInfo) -> None:
    step = TerminalStep(command="test -s bench/numbers")
    outcome = await provider.run_step(sandbox, uuid.uuid4().hex, step, 60, quiet)
    if not outcome.ok:
        raise RuntimeError(f"the rolled-back machine lacks its files: {outcome}")


async def fork_one(provider: SandboxProvider, folder: Path, template: str) -> SandboxInfo:
    new = uuid.uuid4().hex
    return await provider.from_checkpoint(folder, new, new, template, CONNECT_TIMEOUT_S)


async def measure_provider(provider: SandboxProvider, runs: int) -> list[Metric]:
    name = provider.name
    sandbox = await provider.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
    made = []
    try:
        await provider.wait_connected(sandbox, CONNECT_TIMEOUT_S)
        await provider.in_guest(sandbox, FILES)
        saves, rollbacks, forks, sizes = [], [], [], []
        for _ in range(runs):
            folder = provider.checkpoint_folder(uuid.uuid4().hex)
            started = time.monotonic()
            await provider.save_checkpoint(sandbox, folder, memory=False)
            saves.append(time.monotonic() - started)
            sizes.append(size_on_disk(folder))
            await provider.in_guest(sandbox, "rm -rf bench")
            started = time.monotonic()
            sandbox = await provider.load_checkpoint(sandbox, folder, CONNECT_TIMEOUT_S)
            await answered(provider, sandbox)
            rollbacks.append(time.monotonic() - started)
            started = time.monotonic()
            batch = await asyncio.gather(
                *(fork_one(provider, folder, sandbox.template) for _ in range(FORKS))
            )
            forks.append(time.monotonic() - started)
            made += batch
            for fork in batch:
                await provider.destroy(fork)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        for left in [sandbox, *made]:
            await provider.destroy(left)
    size = round(sorted(sizes)[len(sizes) // 2] / 2**20, 1)
    return [
        timed(f"{name}: disk checkpoint of a running machine", saves, 300),
        Metric(f"{name}: checkpoint on disk (4 MB of files written)", size, None, " MiB"),
        timed(f"{name}: rollback until a command answers", rollbacks, 2000),
        timed(f"{name}: fork of {FORKS} until all are connected", forks, 5000),
    ]


async def measure(runs: int, providers: list[str]) -> list[Metric]:
    metrics: list[Metric] = []
    for kind in providers:
        print(f"measuring: {kind}", flush=True)
        settings = Settings(
            sandbox_provider=kind,
            host_id=f"bench-{uuid.uuid4().hex[:8]}",
            gateway_port=free_port(),
        )
        gateway = make_gateway(settings)
        provider = make_provider(settings, gateway)
        try:
            await open_host(settings, gateway, provider)
            metrics += await measure_provider(provider, runs)
        except Exception as exc:
            metrics.append(Metric(f"{kind}: checkpoints", None, None, "ms", error=repr(exc)))
        finally:
            for left in await provider.machines():
                await provider.remove(left.handle)
            await gateway.stop()
            await provider.close()
    return metrics


def bench(out: Path, runs: int, providers: list[str]) -> int:
    """Measure, print the table, write the results to ``out``; 1 if any measurement failed."""
    began, started = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; date: {started}", flush=True)
    metrics = asyncio.run(measure(runs, providers))
    print(table(metrics))
    write_report(out, metrics, info, started, time.monotonic() - began)
    return 1 if any(m.error for m in metrics) else 0

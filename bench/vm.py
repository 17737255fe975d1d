"""Cost of a sandbox VM on this host: ``make bench-vm`` (``python -m berth bench vm``).

Measures, with the template image of the data dir (built by ``make setup``) and a real guest
gateway: building the image from the cached root filesystem; a cold create until the guest
agent is connected, through libvirt, restored from the template's snapshot and booted; the
physical floor, the same kernel, initramfs and disk booted by a bare ``qemu-system-x86_64``
on the same bridge until its agent connects; suspend (managed save) and resume until a
command answers; host RAM per idle VM (RSS of its QEMU process); density: ``--idle-vms``
idle VMs at once (default 20), the host memory each holds (RSS, and PSS, which counts a
page that same-page merging shares once across the VMs sharing it) before and after KSM has
gone over them, and what KSM shares; how soon a destroyed VM, and one whose guest is cut
off, are reported; on the whole system, with VMs restored and then booted: ten sessions
started 2 s apart as soon as it is up, session-ready latency on a warm-pool hit
(``--warm-runs`` sessions, default 8) and the pool's refill after each claim.
Prints a markdown table, writes JSON to ``--out`` (default ``.berth/bench/vm.json``).
``--runs`` (default 3) sets the other repetitions; ``--only PART`` picks parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

import vm_templates
from activities.models import pool_workflow_id
from bench.spine import Metric, Stream, call, is_status, machine, table, timed, write_report
from berth.host import make_gateway, make_provider, open_host
from config.settings import Settings
from sandboxes import firewall, libvirt_host, monitor, vm_image
from sandboxes.libvirt import LibvirtProvider, qemu_pid
from sandboxes.models import Machine, MachineUsage, SandboxInfo, TerminalStep
from store.events import EventType
from tests.support.local import LocalSystem, free_port
from workflows.pool import SandboxPool

CONNECT_TIMEOUT_S = 300.0
IDLE_S = 10.0  # a booted guest settles before its RSS is read
KSM_SETTLE_S = 240.0  # longest the density step waits for KSM to stop finding more to share
KSM_POLL_S = 15.0
KSM_MIN_S = 60.0  # a pass of ksmd over 20 VMs takes about half a minute: two at least
DENSITY_TARGET_MIB = 160.0  # the issue's: 20 idle VMs of 512 MiB in 20 x 160 MiB
TAP = "berth-benchtap"


async def quiet(seq: int, stream: str, text: str) -> None:
    """Output of the bench's commands is not kept."""


async def connected(provider: LibvirtProvider) -> tuple[SandboxInfo, float]:
    started = time.monotonic()
    sandbox = await provider.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
    await provider.wait_connected(sandbox, CONNECT_TIMEOUT_S)
    return sandbox, time.monotonic() - started


async def answered(provider: LibvirtProvider, sandbox: SandboxInfo) -> None:
    outcome = await provider.run_step(
        sandbox, uuid.uuid4().hex, TerminalStep(command="true"), 60, quiet
    )
    if not outcome.ok:
        raise RuntimeError(f"a command in the guest failed: {outcome}")


def qemu_rss_mib(handle: str) -> float:
    for line in Path(f"/proc/{qemu_pid(handle)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS for QEMU")


def qemu_memory_mib(handle: str) -> tuple[float, float]:
    """QEMU's RSS and PSS, in MiB."""
    found = {}
    for line in Path(f"/proc/{qemu_pid(handle)}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Rss", "Pss"):
            found[name] = int(value.split()[0]) / 1024
    return found["Rss"], found["Pss"]


async def density(provider: LibvirtProvider, count: int) -> list[Metric]:
    """``count`` idle VMs at once: the host memory each holds once booted and settled, and
    again once same-page merging has gone over them (what it shares stops growing)."""
    sandboxes: list[SandboxInfo] = []

    async def boot() -> None:
        sandboxes.append((await connected(provider))[0])

    try:
        await asyncio.gather(*(boot() for _ in range(count)))
        await asyncio.sleep(IDLE_S)
        before = [qemu_memory_mib(s.handle) for s in sandboxes]
        # KSM goes over them while their memory, all told, shrinks by more than 1% a poll.
        held, waited = sum(pss for _, pss in before), 0.0
        while waited < KSM_SETTLE_S:
            await asyncio.sleep(KSM_POLL_S)
            waited += KSM_POLL_S
            now = sum(pss for _, pss in (qemu_memory_mib(s.handle) for s in sandboxes))
            if waited >= KSM_MIN_S and now > 0.99 * held:
                break
            held = now
        shared = libvirt_host.ksm_shared_bytes()
        after = [qemu_memory_mib(s.handle) for s in sandboxes]
    finally:
        for sandbox in sandboxes:
            await provider.destroy(sandbox)

    def spread(name: str, values: list[float], target: float | None = None) -> Metric:
        values = sorted(values)
        p50, top = round(values[len(values) // 2], 1), round(values[-1], 1)
        return Metric(name, p50, top, " MiB", target, "p50", len(values))

    total = sum(pss for _, pss in after)
    return [
        spread(f"RSS per idle VM, {count} at once, booted", [rss for rss, _ in before]),
        spread(f"RSS per idle VM, {count} at once, after KSM", [rss for rss, _ in after]),
        spread(f"PSS per idle VM, {count} at once, booted", [pss for _, pss in before]),
        spread(
            f"PSS per idle VM, {count} at once, after KSM ({waited:.0f} s)",
            [pss for _, pss in after],
            DENSITY_TARGET_MIB,
        ),
        Metric(f"host memory of {count} idle VMs (sum of PSS)", round(total), None, " MiB",
               DENSITY_TARGET_MIB * count, ""),
        Metric("KSM: memory shared, host-wide (pages_sharing)", round(shared / 2**20), None,
               " MiB", None, ""),
    ]  # fmt: skip


async def cold_creates(provider: LibvirtProvider, runs: int) -> list[Metric]:
    """Creates until the guest is connected: restored from the template's snapshot (what
    new VMs do), then booted (the fallback), ``runs`` each."""
    creates: dict[bool, list[float]] = {True: [], False: []}
    rss, removes = [], []
    snapshots = provider.snapshots
    try:
        for restore, seconds in creates.items():
            provider.snapshots = restore
            for _ in range(runs):
                sandbox, took = await connected(provider)
                want = "snapshot " if restore else "boot"
                if not provider.origin(sandbox.handle).startswith(want):
                    raise RuntimeError(f"a VM did not start by {want.strip()}")
                seconds.append(took)
                await asyncio.sleep(IDLE_S)
                rss.append(qemu_rss_mib(sandbox.handle))
                started = time.monotonic()
                await provider.destroy(sandbox)
                removes.append(time.monotonic() - started)
    finally:
        provider.snapshots = snapshots
    memory_mb = vm_templates.spec(vm_templates.DEFAULT).machine.memory_mb
    rss.sort()
    ram = f"host RAM per idle VM (QEMU RSS; guest has {memory_mb} MiB)"
    p50, top = round(rss[len(rss) // 2], 1), round(rss[-1], 1)
    return [
        timed("snapshot restore to guest connected (libvirt)", creates[True], 1500),
        timed("boot to guest connected (libvirt; the fallback)", creates[False]),
        Metric(ram, p50, top, " MiB", memory_mb + 40, "p50", len(rss)),
        timed("remove (ACPI shutdown, undefine, delete overlay)", removes),
    ]


async def hibernation(provider: LibvirtProvider, runs: int) -> list[Metric]:
    sandbox, _ = await connected(provider)
    suspends, resumes = [], []
    try:
        for _ in range(runs):
            await answered(provider, sandbox)
            started = time.monotonic()
            await provider.suspend(sandbox.handle)
            suspends.append(time.monotonic() - started)
            started = time.monotonic()
            await provider.resume(sandbox.handle)
            await answered(provider, sandbox)
            resumes.append(time.monotonic() - started)
    finally:
        await provider.destroy(sandbox)
    return [
        timed("suspend (managed save of guest RAM)", suspends),
        timed("resume until a command answers", resumes),
    ]


async def detection(provider: LibvirtProvider, runs: int) -> list[Metric]:
    """From breaking a VM until the host's watch (as the worker runs it) reports it: the
    domain destroyed behind Berth's back, or its guest cut off while it runs (its packets
    dropped on the host, so no heartbeat is answered)."""
    deaths: dict[str, float] = {}

    async def died(machine: Machine, reason: str) -> None:
        deaths[machine.sandbox_id] = time.monotonic()

    async def sample(usage: dict[str, MachineUsage], machines: list[Machine]) -> None:
        pass

    stop = asyncio.Event()
    watcher = asyncio.create_task(monitor.watch(provider, died, sample, stop))
    seconds: dict[str, list[float]] = {"destroyed": [], "cut off": []}
    try:
        for _ in range(runs):
            for how, measured in seconds.items():
                sandbox, _ = await connected(provider)
                address = provider.address(sandbox.handle)
                destroy = ["virsh", "-c", provider.uri, "destroy", sandbox.handle]
                await asyncio.sleep(monitor.POLL_S)  # heard from just now, as any guest
                broken = time.monotonic()
                with contextlib.ExitStack() as undo:
                    if how == "destroyed":
                        await asyncio.to_thread(subprocess.run, destroy, check=True)
                    else:
                        undo.enter_context(firewall.cut_off(address, "berth-bench-cut-off"))
                    try:
                        async with asyncio.timeout(60):
                            while sandbox.id not in deaths:  # noqa: ASYNC110
                                await asyncio.sleep(0.05)
                        measured.append(deaths[sandbox.id] - broken)
                    finally:
                        await provider.destroy(sandbox)
    finally:
        stop.set()
        await watcher
    return [
        timed("dead VM reported (virsh destroy → the host's watch)", seconds["destroyed"],
              10_000, "p95"),
        timed("silent guest reported (cut off → the host's watch)", seconds["cut off"],
              10_000, "p95"),
    ]  # fmt: skip


@contextlib.contextmanager
def tap(bridge: str) -> Any:
    subprocess.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", TAP, "master", bridge, "up"], check=True)
        yield TAP
    finally:
        subprocess.run(["ip", "link", "del", TAP], check=False)


async def bare_qemu(provider: LibvirtProvider, runs: int) -> list[Metric]:
    """The floor: the same image booted by QEMU alone, no libvirt, to guest connected."""
    assert provider.host is not None
    image = provider.build_image(vm_templates.DEFAULT)
    spec = vm_templates.spec(vm_templates.DEFAULT)
    accel = "kvm" if provider.host.accel == "kvm" else "tcg"
    # The subnet's last address: libvirt VMs get the lowest free ones.
    address = provider.subnet.broadcast_address - 1
    seconds = []
    with tap(provider.bridge), tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            sandbox_id = uuid.uuid4().hex
            overlay, seed = Path(tmp) / "disk.qcow2", Path(tmp) / "seed.raw"
            overlay.unlink(missing_ok=True)
            await asyncio.to_thread(vm_image.overlay, image.disk, overlay)
            env = provider.guest_env(sandbox_id)
            vm_image.write_seed(seed, provider.seed_values(env, address, spec))
            started = time.monotonic()
            qemu = await asyncio.create_subprocess_exec(
                "qemu-system-x86_64", "-accel", accel, "-machine", "pc", "-nodefaults",
                "-m", str(spec.machine.memory_mb), "-smp", str(spec.machine.vcpus),
                "-display", "none", "-serial", "null", "-no-reboot",
                "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-drive", f"file={overlay},if=virtio,format=qcow2",
                "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
                "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,romfile=,mac={bare_mac(address)}",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await provider.gateway.wait_connected(sandbox_id, CONNECT_TIMEOUT_S)
                seconds.append(time.monotonic() - started)
            finally:
                qemu.kill()
                await qemu.wait()
                provider.gateway.forget(sandbox_id)
    return [timed("floor: bare qemu-system-x86_64 to guest connected", seconds)]


def bare_mac(address: ipaddress.IPv4Address) -> str:
    return "52:54:ff:" + ":".join(f"{b:02x}" for b in address.packed[1:])


async def image_build(provider: LibvirtProvider) -> list[Metric]:
    """Building the template image again, into a scratch dir (root filesystem cached)."""
    with tempfile.TemporaryDirectory(dir=provider.data_dir) as tmp:
        started = time.monotonic()
        await asyncio.to_thread(
            vm_image.build_image,
            Path(tmp),
            vm_templates.DEFAULT,
            provider.mirror,
            provider.data_dir / "build",
        )
        return [timed("image build (root filesystem cached)", [time.monotonic() - started])]


BURST = 10  # sessions started one after another right after the system is up
BURST_GAP_S = 2.0


async def new_session(http: httpx.AsyncClient) -> tuple[float, bool]:
    """POST /api/sessions until ``ready`` on its event stream (s), and whether its VM came
    from the warm pool; the session is then ended."""
    start = time.time()
    sid = (await call(http, "POST", "/api/sessions", 201, json={}))["id"]
    stream = Stream(http, sid)
    try:
        seen = await stream.until(is_status(EventType.session_status, "ready"))
        pooled = any(
            e["data"].get("pooled") for _, e in seen if e["type"] == EventType.sandbox_ready
        )
        await call(http, "DELETE", f"/api/sessions/{sid}", 202)
        await stream.until(is_status(EventType.session_status, "ended"))
    finally:
        await stream.close()
    return seen[-1][0] - start, pooled


async def whole_system(provider: LibvirtProvider, runs: int, snapshots: bool) -> list[Metric]:
    """The whole system as ``make run`` starts it (libvirt, a warm pool), its VMs restored
    from the template's snapshot or (``snapshots`` off) booted: BURST sessions started
    BURST_GAP_S apart as soon as it is up (``POST /api/sessions`` until ``ready`` on its
    event stream); then ``runs`` warm-pool hits, each once the pool has a VM ready again,
    and how long the pool took to have one again after each claim (its refill)."""
    how = "restored" if snapshots else "booted"
    data = Path(tempfile.mkdtemp(prefix="bench-warm-", dir=provider.data_dir))
    env = {"BERTH_VM_IMAGES_DIR": str(provider.images), "BERTH_VM_SNAPSHOTS": str(snapshots)}
    system = await asyncio.to_thread(LocalSystem.start, data, "benchwarm", env, 300, None)
    host_id = f"benchwarm{system.base.rsplit(':', 1)[1]}"
    burst: list[float] = []
    ready: list[float] = []
    refills: list[float] = []
    try:
        temporal = await system.client()
        pool = temporal.get_workflow_handle(pool_workflow_id(host_id, vm_templates.DEFAULT))
        async with httpx.AsyncClient(base_url=system.base, timeout=120) as http:
            credentials = {"email": "bench@example.com", "password": "a long password"}
            await call(http, "POST", "/api/auth/signup", 201, json=credentials)
            token = (await call(http, "POST", "/api/auth/token", 200, json=credentials))["token"]
            http.headers["Authorization"] = f"Bearer {token}"

            async def later(delay: float) -> tuple[float, bool]:
                await asyncio.sleep(delay)
                return await new_session(http)

            started = await asyncio.gather(*(later(i * BURST_GAP_S) for i in range(BURST)))
            burst = [seconds for seconds, _ in started]
            for _ in range(runs):
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    while not (await pool.query(SandboxPool.state)).ready:  # noqa: ASYNC110
                        await asyncio.sleep(0.2)
                await asyncio.sleep(IDLE_S / 2)  # the refilled VM has settled
                claimed = time.monotonic()
                seconds, pooled = await new_session(http)
                if not pooled:
                    raise RuntimeError("the session was not served from the warm pool")
                ready.append(seconds)
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    while not (await pool.query(SandboxPool.state)).ready:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                refills.append(time.monotonic() - claimed)
    finally:
        await asyncio.to_thread(system.stop)
        settings = Settings(data_dir=data, sandbox_provider="libvirt", host_id=host_id)
        left = make_provider(settings, make_gateway(settings))
        for machine_left in await left.machines():  # none, unless the stop failed
            await left.remove(machine_left.handle)
        shutil.rmtree(data, ignore_errors=True)
    target = 1500 if snapshots else None
    metrics = [
        timed(f"{BURST} sessions {BURST_GAP_S:.0f} s apart right after start, ready ({how})",
              burst, 2000 if snapshots else None, "p95"),
        timed(f"pool refill per VM (claim → pool ready again; {how})", refills, target),
    ]  # fmt: skip
    if snapshots:
        metrics += [
            timed("session ready on a warm-pool hit (POST → `ready` on SSE)", ready, 100),
            timed("session ready on a warm-pool hit, p95", ready, 250, on="p95"),
        ]
    return metrics


Measure = Callable[[], Awaitable[list[Metric]]]


async def measure(
    runs: int, warm_runs: int, only: list[str] | None, idle_vms: int = 20
) -> list[Metric]:
    port = free_port()
    settings = Settings(
        sandbox_provider="libvirt", host_id=f"bench-{uuid.uuid4().hex[:8]}", gateway_port=port
    )
    # The cap counts every Berth VM on the host (other installs' too): room for the idle ones.
    settings = settings.model_copy(update={"vm_max_running": settings.vm_max_running + idle_vms})
    gateway = make_gateway(settings)
    provider = make_provider(settings, gateway)
    assert isinstance(provider, LibvirtProvider)
    metrics: list[Metric] = []
    try:
        await open_host(settings, gateway, provider)
        steps: list[tuple[str, str, Measure]] = [
            ("image", "image build", lambda: image_build(provider)),
            ("cold", "cold create", lambda: cold_creates(provider, runs)),
            ("density", "density", lambda: density(provider, idle_vms)),
            ("floor", "bare qemu floor", lambda: bare_qemu(provider, runs)),
            ("hibernation", "hibernation", lambda: hibernation(provider, runs)),
            ("detection", "failure detection", lambda: detection(provider, runs)),
            ("system", "whole system, VMs restored",
             lambda: whole_system(provider, warm_runs, True)),
            ("system", "whole system, VMs booted",
             lambda: whole_system(provider, warm_runs, False)),
        ]  # fmt: skip
        for part, name, step in steps:
            if only and part not in only:
                continue
            print(f"measuring: {name}", flush=True)
            try:
                metrics += await step()
            except Exception as exc:
                metrics.append(Metric(name, None, None, "ms", error=repr(exc)))
    finally:
        for left in await provider.machines():
            await provider.remove(left.handle)
        await gateway.stop()
        await provider.close()  # its gateway's port in the host's firewall
    return metrics


def bench(
    out: Path, runs: int, warm_runs: int, only: list[str] | None = None, idle_vms: int = 20
) -> int:
    """Measure, print the table, write the results to ``out``; 1 if any measurement failed."""
    began, started = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; date: {started}", flush=True)
    print(f"runs {runs}, warm runs {warm_runs}, idle VMs {idle_vms}", flush=True)
    metrics = asyncio.run(measure(runs, warm_runs, only, idle_vms))
    floor = next((m for m in metrics if m.name.startswith("floor") and m.p50), None)
    cold = next((m for m in metrics if m.name.startswith("boot to guest") and m.p50), None)
    if floor and cold and floor.p50 and cold.p50:
        ratio = cold.p50 / floor.p50
        metrics.append(Metric("boot / floor (p50)", round(ratio, 2), None, "x", 1.5))
    print(table(metrics))
    write_report(out, metrics, info, started, time.monotonic() - began)
    return 1 if any(m.error for m in metrics) else 0

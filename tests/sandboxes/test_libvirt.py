"""The libvirt provider on real libvirt and QEMU (TCG here): a VM boots from the template
image, its guest agent dials a real gateway, steps run through RunStep, suspend and resume
keep files and processes, reconciliation finds VMs by their metadata, and nothing is left
behind. At most two VMs run at once (the machine is shared)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from sqlalchemy import Engine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

import vm_templates
from activities.models import ClaimRequest, RestoreRequest, pool_workflow_id
from activities.sandbox import SandboxActivities
from activities.vm import VmActivities
from berth.host import make_gateway, make_provider, open_host
from berth.worker import session_owner
from config.keys import guest_keys
from config.settings import Settings
from sandboxes import firewall, libvirt_host, monitor, vm_image
from sandboxes.gateway import GuestGateway
from sandboxes.libvirt import LibvirtProvider, qemu_pid
from sandboxes.models import BrowserStep, Check, Machine, SandboxInfo
from sandboxes.provider import SandboxProvider, machine_name
from sandboxes.reconcile import reconcile
from store.artifacts import ArtifactStore
from store.events import EventType
from tests.activities.test_run_step import attempt, sqlite_engine, step_request, stored
from tests.e2e.test_system import DONE, read_events, token_for, wait_status
from tests.sandboxes.test_containment import Sandbox, host_addresses, link_locals, speaks_ipv6
from tests.support.local import LocalSystem, free_port, python_script
from tests.workflows.test_session import env
from vm_templates import NetworkSpec
from workflows.pool import PoolInput, PoolState, SandboxPool

__all__ = ["env", "sqlite_engine"]  # fixtures of other tests' (a Temporal dev server, SQLite)

CONNECT_TIMEOUT_S = 180.0  # TCG on a shared 2-core machine: ~12 s when idle


def scratch_artifacts() -> ArtifactStore:
    """Where a test's steps would keep their artifacts (terminal steps make none)."""
    return ArtifactStore(Path(tempfile.mkdtemp(prefix="berth-vm-artifacts-")), 1 << 20)


def unavailable() -> str | None:
    """Why libvirt VMs cannot run on this machine at all, or None. `make test` installs
    everything they need, so there this is None."""
    if os.geteuid() != 0:
        return "libvirt VMs need root (daemons, bridge, firewall)"
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make setup` installs it)"
    if not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")):
        return "no Debian cloud kernel (`make setup` installs linux-image-cloud-amd64)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun for the VMs' network devices"
    return None


pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture(scope="module")
async def vms() -> AsyncIterator[LibvirtProvider]:
    # A host id of its own, so the test sees only its VMs; the image cache is the data dir's.
    port = free_port()
    settings = Settings(
        sandbox_provider="libvirt",
        host_id=f"vmtest-{uuid.uuid4().hex[:8]}",
        guest_token_secret="libvirt-test",
        gateway_port=port,
    )
    gateway = GuestGateway(guest_keys(settings).current, reconnect_grace_s=60)
    provider = make_provider(settings, gateway)
    assert isinstance(provider, LibvirtProvider)
    # As the worker does: wss, listening on the bridge's address only.
    listen = await open_host(settings, gateway, provider)
    assert provider.host is not None and listen == provider.host.router
    try:
        yield provider
    finally:
        await remove_all(provider)
        await gateway.stop()
        await provider.close()


async def remove_all(provider: SandboxProvider) -> None:
    for machine in await provider.machines():
        await provider.remove(machine.handle)


async def boot(provider: LibvirtProvider) -> SandboxInfo:
    sandbox = await provider.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
    await provider.wait_connected(sandbox, CONNECT_TIMEOUT_S)
    return sandbox


async def run(
    provider: LibvirtProvider, engine: Engine, sandbox: SandboxInfo, command: str
) -> tuple[int, str]:
    """One step through the RunStep activity: its exit code and stored output."""
    request = step_request(engine, sandbox.id, command, task_id=uuid.uuid4().hex)
    request = request.model_copy(
        update={"sandbox": sandbox.model_copy(update={"session_id": request.sandbox.session_id})}
    )
    activities = SandboxActivities(provider, engine, CONNECT_TIMEOUT_S, scratch_artifacts())
    _, task = await attempt(activities, request, 1)
    outcome = await asyncio.wait_for(task, 120)
    row, _ = stored(engine, request)
    return outcome.exit_code, row.output


async def gone(provider: LibvirtProvider, sandbox: SandboxInfo) -> bool:
    running, state = await provider.is_running(sandbox.handle)
    return not running and state == "missing" and not provider.vm_dir(sandbox.id).exists()


async def test_a_vm_boots_runs_a_step_and_is_removed_without_a_trace(
    vms: LibvirtProvider, sqlite_engine: Engine
) -> None:
    sandbox = await boot(vms)
    (machine,) = await vms.machines()
    assert (machine.sandbox_id, machine.session_id, machine.state) == (
        sandbox.id, sandbox.session_id, "running",
    )  # fmt: skip
    code, output = await run(vms, sqlite_engine, sandbox, "uname -r; cat /etc/berth-template")
    assert code == 0
    assert "cloud-amd64" in output and "default" in output
    # The token reached the guest through its seed disk, not its kernel's command line.
    code, output = await run(vms, sqlite_engine, sandbox, "cat /proc/cmdline")
    assert code == 0 and "console=ttyS0" in output
    token = vms.guest_env(sandbox.id)["BERTH_GUEST_TOKEN"]
    assert token not in output
    # Steps are berth's (as in a container: tests/sandboxes/test_containment.py), without
    # capabilities; the token, root's alone, is in no file or environment they can read.
    code, output = await Sandbox(vms, sandbox).run(
        "id -un; pwd; grep CapEff /proc/self/status; touch /x /etc/x; cat /run/berth/token;"
        " env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done;"
        f" echo found:$(grep -rlsF --exclude-dir=proc --exclude-dir=sys -e {token[:16]} /)",
        # Reading the whole disk under TCG takes a while, longer on a busy host.
        timeout_s=300,
    )
    assert "found:" in output, f"the search did not finish (exit {code}): {output[-500:]}"
    assert output.startswith("berth\n/home/berth\nCapEff:\t0000000000000000\n"), output
    assert "/run/berth/token: Permission denied" in output
    assert output.count("Permission denied") >= 3  # /x, /etc/x and the token
    assert "\nfound:\n" in output
    assert token not in output.replace(f"-e {token[:16]}", "")

    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)
    assert await vms.machines() == []


PAGE = "<html><body><h1>Hello from a Berth VM</h1></body></html>"


async def test_a_vm_drives_its_browser(vms: LibvirtProvider) -> None:
    """Chromium through Playwright in the VM (under TCG here: ~40 s to the first page), on
    a page served inside it; each step returns a screenshot."""
    sandbox = await boot(vms)
    serve = (
        f"printf '%s' '{PAGE}' > page.html && "
        "(setsid python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &)"
    )
    assert (await Sandbox(vms, sandbox).run(serve))[0] == 0
    shots: list[tuple[str, bytes]] = []

    async def keep(name: str, media_type: str, data: bytes) -> str:
        shots.append((media_type, data))
        return name

    steps = [
        BrowserStep(
            action="navigate",
            url="http://127.0.0.1:8080/page.html",
            check=Check(kind="page_text_contains", value="Hello from a Berth VM"),
            timeout_s=120,
        ),
        BrowserStep(action="extract", selector="h1"),
    ]
    outcomes = [
        await vms.run_step(sandbox, uuid.uuid4().hex, step, 300, scratch_output, 0, keep)
        for step in steps
    ]
    assert all(outcome.ok for outcome in outcomes), outcomes
    assert outcomes[0].check is not None and outcomes[0].check.ok
    assert outcomes[1].result is not None and "Hello from a Berth VM" in str(outcomes[1].result)
    assert len(shots) == 2 and all(
        kind == "image/jpeg" and data[:2] == b"\xff\xd8" for kind, data in shots
    )
    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)


async def scratch_output(seq: int, stream: str, text: str) -> None:
    """A browser step's output is not kept here."""


async def test_the_guest_reaches_the_gateway_but_no_other_port_of_the_host(
    vms: LibvirtProvider, sqlite_engine: Engine
) -> None:
    knocks: list[str] = []

    async def knocked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        knocks.append("knock")
        writer.close()

    port = free_port()
    server = await asyncio.start_server(knocked, "0.0.0.0", port)
    sandbox = await boot(vms)
    try:
        assert vms.host is not None
        probe = python_script(
            "probe.py",
            "import socket, sys",
            f'socket.create_connection(("{vms.host.router}", int(sys.argv[1])), timeout=3)',
        )
        code, _ = await run(vms, sqlite_engine, sandbox, f"{probe} {vms.gateway_port}")
        assert code == 0
        code, output = await run(vms, sqlite_engine, sandbox, f"{probe} {port}")
        assert code != 0 and "timed out" in output
        assert knocks == []
    finally:
        server.close()
        await vms.destroy(sandbox)


# Test-only: a root shell for the test's own VM, on the guest's loopback. Its initramfs is the
# image's plus an /init that, before handing over, adds this server to the root disk's
# inittab (the VM's overlay alone; the image is untouched). Steps talk to it (root_client).
ROOT_PORT = 7777
ROOT_SERVER = f"""import socket, subprocess
server = socket.create_server(("127.0.0.1", {ROOT_PORT}))
while True:
    link, _ = server.accept()
    with link:
        command = b""
        while chunk := link.recv(65536):
            command += chunk
        done = subprocess.run(["/bin/sh", "-c", command.decode()], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)
        link.sendall(done.stdout)
"""
ROOT_CLIENT = f"""import socket, sys, time
for _ in range(600):
    try:
        link = socket.create_connection(("127.0.0.1", {ROOT_PORT}), timeout=150)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
link.sendall(sys.stdin.buffer.read())
link.shutdown(socket.SHUT_WR)
while chunk := link.recv(65536):
    sys.stdout.write(chunk.decode())
"""


def rooted_initrd(image: vm_image.Image, folder: Path) -> Path:
    """The image's initramfs, with an /init that also starts ROOT_SERVER in the guest."""
    init = (vm_image.GUEST_FILES / "init").read_text()
    hook = (
        f"cat > /root/opt/berth-test-root.py <<'EOF'\n{ROOT_SERVER}EOF\n"
        "echo '::respawn:/usr/bin/python3 -I /opt/berth-test-root.py' >> /root/etc/inittab\n"
    )
    assert init.count("umount /proc /sys\n") == 1
    init = init.replace("umount /proc /sys\n", hook + "umount /proc /sys\n")
    extra = vm_image.Cpio()
    extra.file("init", init.encode(), 0o755)  # the later archive's /init wins
    path = folder / f"test-initrd-{uuid.uuid4().hex[:8]}.img"
    path.write_bytes(image.initrd.read_bytes() + extra.gzipped())
    path.chmod(0o644)  # QEMU's user reads it
    return path


async def as_root(sandbox: Sandbox, command: str) -> str:
    """``command``'s output, run by root in a VM booted with rooted_initrd."""
    code, out = await sandbox.run(
        f"cat > root.py <<'EOF'\n{ROOT_CLIENT}EOF\npython3 root.py <<'ROOT'\n{command}\nROOT",
        timeout_s=180,
    )
    assert code == 0, out
    return out


KNOCK = """import socket, sys
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    address, _, device = host.strip("[]").partition("%")
    try:
        if device:  # link-local IPv6: its scope, the guest's interface, by number
            scope = int(open(f"/sys/class/net/{device}/ifindex").read())
            link = socket.socket(socket.AF_INET6)
            link.settimeout(3)
            link.connect((address, int(port), 0, scope))
        else:
            link = socket.create_connection((address, int(port)), timeout=3)
        link.close()
        print(target, "open")
    except Exception as exc:
        print(target, type(exc).__name__)
"""


async def knock(sandbox: Sandbox, targets: list[str]) -> dict[str, str]:
    """Connect (as the step user) to each ``host:port``: "open", or why not."""
    code, out = await sandbox.run(
        f"cat > knock.py <<'EOF'\n{KNOCK}EOF\npython3 knock.py {' '.join(targets)}"
    )
    assert code == 0, out
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def neighbour(bridge: str, address: str) -> str:
    """The host's neighbour entry for ``address`` on the bridge (empty: none)."""
    shown = ["ip", "neigh", "show", "to", address, "dev", bridge]
    return subprocess.run(shown, capture_output=True, text=True, check=True).stdout.strip()


# Sent by root in the guest: ARP requests to the host claiming addresses that are not the
# guest's, with its MAC (another guest's address) or with another MAC; the host would
# take each claim into its neighbour table.
SPOOF_ARP = """import socket, struct, sys, time
claims = [(bytes.fromhex(mac.replace(":", "")), ip) for mac, ip in zip(*[iter(sys.argv[2:])] * 2)]
router = socket.inet_aton(sys.argv[1])
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(("eth0", 0))
for _ in range(3):
    for mac, ip in claims:
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(ip)
        raw.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp + bytes(6) + router)
    time.sleep(0.2)
print("sent")
"""


PROTECTED = ("symlinks", "hardlinks", "fifos", "regular")


async def test_a_vm_is_bound_to_its_address_and_mac_and_reaches_no_ipv6(
    vms: LibvirtProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From inside a real VM: the step user reaches the host by no IPv6 (link-local) and
    the gateway on none of the host's other addresses; root in the guest gets nothing
    through with a second address, nor poisons the host's ARP for another address or with
    another MAC. And root follows no link, opens no file or FIFO the step user laid in
    /tmp (the fs.protected_* settings of the VM's init)."""
    assert vms.host is not None
    image = vms.build_image(vm_templates.DEFAULT)
    initrd = rooted_initrd(image, vms.data_dir)
    monkeypatch.setattr(vms, "build_image", lambda template: replace(image, initrd=initrd))
    # Booted with that initramfs (a VM restored from the template's snapshot has its own).
    monkeypatch.setattr(vms, "snapshots", False)
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = listener.getsockname()[1]  # on every address of the host, IPv4 and IPv6
    sandbox = await boot(vms)
    try:
        guest = Sandbox(vms, sandbox)
        own = vms.address(sandbox.handle)
        router, gateway = vms.host.router, vms.gateway_port
        # The step user, by link-local IPv6 to the host's side of the bridge (where the
        # host has none: IPv6 is off there, and the VM's port passes none).
        assert not await asyncio.to_thread(speaks_ipv6, vms.bridge)
        others = [a for a in host_addresses() if a != router and not a.startswith("127.")]
        assert others, "the host has no address but the bridge's"
        v6 = [f"[{a}%eth0]" for a in await asyncio.to_thread(link_locals, vms.bridge)]
        found = await knock(
            guest,
            [f"{router}:{gateway}"]
            + [f"{address}:{p}" for address in v6 for p in (port, gateway)]
            + [f"{address}:{gateway}" for address in others],
        )
        assert found.pop(f"{router}:{gateway}") == "open"
        assert "open" not in found.values(), found

        # Root: a second IPv4 address (a free one of the subnet, as another guest's would be).
        *_, spare, victim, stranger = vms.subnet.hosts()
        second = (
            f"/opt/berth/busybox ip addr add {spare}/32 dev eth0\n"
            'python3 -c "import socket; s = socket.socket(); s.settimeout(3); '
            f"s.bind(('{spare}', 0)); s.connect(('{router}', {gateway})); print('open')\" "
            "2>&1 | tail -n 1\n"
            f"/opt/berth/busybox ip addr del {spare}/32 dev eth0"
        )
        assert (await as_root(guest, second)).strip() == "TimeoutError: timed out"
        # Root: ARP claiming another address with its own MAC, and with another MAC.
        other_mac = "52:54:0a:d5:ff:fd"
        own_mac = neighbour(vms.bridge, own).split()[2]  # "ADDRESS lladdr MAC STATE"
        spoof = (
            f"cat > /tmp/arp.py <<'EOF'\n{SPOOF_ARP}EOF\n"
            f"python3 /tmp/arp.py {router} {own_mac} {victim} {other_mac} {stranger}"
        )
        assert (await as_root(guest, spoof)).strip() == "sent"
        await asyncio.sleep(1)
        assert neighbour(vms.bridge, str(victim)) == ""
        assert neighbour(vms.bridge, str(stranger)) == ""
        assert neighbour(vms.bridge, own).split()[2] == own_mac
        # The guest's own traffic flows as before.
        assert await guest.run("echo still here") == (0, "still here\n")

        # fs.protected_*: what the step user lays in /tmp, root neither follows nor opens.
        laid = "ln -s /etc/hostname /tmp/link && echo mine > /tmp/planted && mkfifo /tmp/fifo"
        assert await guest.run(laid) == (0, "")
        knobs = " ".join(f"/proc/sys/fs/protected_{k}" for k in PROTECTED)
        out = await as_root(
            guest,
            f"cat {knobs}; cat /tmp/link; echo root > /tmp/planted;"
            " timeout 5 sh -c 'echo root > /tmp/fifo'; echo done",
        )
        assert out.startswith("1\n1\n2\n2\n") and out.endswith("done\n"), out
        assert out.count("Permission denied") == 3, out
    finally:
        listener.close()
        await vms.destroy(sandbox)
        initrd.unlink()
    assert await gone(vms, sandbox)


@contextlib.contextmanager
def page_host(tmp: Path) -> Iterator[tuple[str, str, int]]:
    """A host of the test's own beyond the VMs' host: a network namespace behind a veth pair,
    serving a page on two addresses, (first, second, port)."""
    tag = uuid.uuid4().hex[:6]
    namespace, outside, inside = f"berth-t{tag}", f"bt{tag}h", f"bt{tag}n"
    # A documentation range (TEST-NET-2), public to the firewall: only the template's list
    # keeps a guest from the second address.
    low = 8 * (int(tag[:2], 16) % 32)
    net = "198.51.100"
    first, second, port = f"{net}.{low + 2}", f"{net}.{low + 3}", free_port()
    (tmp / "index.html").write_text("the allowed page\n")
    steps = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", namespace],
        ["ip", "addr", "add", f"{net}.{low + 1}/29", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", namespace, "addr", "add", f"{first}/29", "dev", inside],
        ["ip", "-n", namespace, "addr", "add", f"{second}/29", "dev", inside],
        ["ip", "-n", namespace, "link", "set", inside, "up"],
    ]
    server = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server", str(port)],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection((first, port), 0.5):
                break
            time.sleep(0.1)
        yield first, second, port
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # takes the veths


def egress_rules() -> str:
    return subprocess.run(
        ["iptables", "-S", libvirt_host.FIREWALL_OUT], capture_output=True, text=True, check=True
    ).stdout


async def test_an_allow_list_template_reaches_its_networks_and_nothing_else(
    vms: LibvirtProvider, sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with page_host(tmp_path) as (allowed, other, port):
        # The default template, narrowed to one address of the test's page host.
        spec = vm_templates.spec(vm_templates.DEFAULT).model_copy(
            update={"network": NetworkSpec(egress="allow", allow=[f"{allowed}/32"])}
        )
        monkeypatch.setattr(vms, "spec", lambda template: spec)
        rules = await asyncio.to_thread(egress_rules)
        sandbox = await boot(vms)  # the gateway is reachable, whatever the list says
        fetch = python_script(
            "fetch.py",
            "import sys, urllib.request as u",
            'print(u.urlopen(sys.argv[1], timeout=3).read().decode(), end="")',
        )
        code, output = await run(vms, sqlite_engine, sandbox, f"{fetch} http://{allowed}:{port}/")
        assert code == 0 and output == "the allowed page\n"
        code, output = await run(vms, sqlite_engine, sandbox, f"{fetch} http://{other}:{port}/")
        assert code != 0 and "timed out" in output
        await vms.destroy(sandbox)
        assert await gone(vms, sandbox)
        assert await asyncio.to_thread(egress_rules) == rules  # its own rules went with it


async def test_suspend_and_resume_keep_files_and_running_processes(
    vms: LibvirtProvider, env: WorkflowEnvironment, sqlite_engine: Engine
) -> None:
    sandbox = await boot(vms)
    start = python_script(
        "start.py",
        "import subprocess",
        "open('kept', 'w').write('kept\\n')",
        "quiet = subprocess.DEVNULL",
        "sleeper = subprocess.Popen(['sleep', '3600'], stdout=quiet, stderr=quiet,"
        " start_new_session=True)",
        "open('pid', 'w').write(str(sleeper.pid))",
    )
    assert (await run(vms, sqlite_engine, sandbox, start))[0] == 0

    # Through the activities a session would run.
    activities = VmActivities(vms, env.client, CONNECT_TIMEOUT_S)
    await ActivityEnvironment().run(activities.hibernate, sandbox)
    running, state = await vms.is_running(sandbox.handle)
    assert not running and state.startswith("hibernated")
    assert [m.state for m in await vms.machines()] == ["hibernated"]
    await vms.suspend(sandbox.handle)  # again: nothing to do

    await asyncio.sleep(3)  # the guest's clock stands still meanwhile
    await ActivityEnvironment().run(activities.wake, sandbox)
    await vms.resume(sandbox.handle)  # again: nothing to do
    assert (await vms.is_running(sandbox.handle))[0]
    before = time.time()
    code, output = await run(vms, sqlite_engine, sandbox, "date +%s.%N")
    after = time.time()
    # Set from the host's on wake, within 50 ms (it stood still while the VM slept).
    assert code == 0 and before - 0.05 <= float(output) <= after + 0.05, (before, output, after)
    check = python_script(
        "check.py",
        "import os",
        "print(open('kept').read(), end='')",
        "os.kill(int(open('pid').read()), 0)",
        "print('alive')",
    )
    code, output = await run(vms, sqlite_engine, sandbox, check)
    assert code == 0 and output == "kept\nalive\n"

    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)


async def test_reconcile_destroys_an_orphan_vm_and_keeps_a_live_one(
    vms: LibvirtProvider,
) -> None:
    live, orphan = [
        await vms.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
        for _ in range(2)
    ]

    async def owner(session_id: str) -> str | None:
        return live.id if session_id == live.session_id else None

    report = await reconcile(vms, owner, grace_s=0)
    assert report.adopted == [live.id] and report.destroyed == [orphan.id]
    assert await gone(vms, orphan)
    assert [m.sandbox_id for m in await vms.machines()] == [live.id]
    await vms.destroy(live)
    assert await gone(vms, live)


async def test_boots_wait_for_a_boot_slot(
    vms: LibvirtProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vms, "boots", asyncio.Semaphore(1))
    ids = [uuid.uuid4().hex for _ in range(2)]
    creates = {
        asyncio.create_task(vms.provision(sandbox_id, uuid.uuid4().hex, vm_templates.DEFAULT))
        for sandbox_id in ids
    }
    done, pending = await asyncio.wait(creates, return_when=asyncio.FIRST_COMPLETED)
    (first,) = [task.result() for task in done]
    # The first holds the only slot until its guest is up; the second has not started.
    assert vms.gateway.is_connected(first.id)
    (other,) = [sandbox_id for sandbox_id in ids if sandbox_id != first.id]
    assert not (await vms.is_running(machine_name(other)))[0]
    (second,) = await asyncio.gather(*pending)
    assert vms.gateway.is_connected(second.id)
    for sandbox in (first, second):
        await vms.destroy(sandbox)
        assert await gone(vms, sandbox)


async def test_a_vm_that_dies_is_seen_in_its_health(vms: LibvirtProvider) -> None:
    sandbox = await vms.provision(uuid.uuid4().hex, uuid.uuid4().hex, vm_templates.DEFAULT)
    assert (await vms.health(sandbox)).running
    os.kill(qemu_pid(sandbox.handle), signal.SIGKILL)
    for _ in range(100):  # libvirt notices QEMU's end on its monitor socket, then says so
        health = await vms.health(sandbox)
        if not health.running and "last event stopped (" in health.detail:
            break
        await asyncio.sleep(0.1)
    assert not health.ok and not health.running
    assert "last event stopped (" in health.detail
    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)


def admin_headers(base: str, data: Path) -> dict[str, str]:
    subprocess.run(
        [sys.executable, "-m", "berth", "create-admin", "admin@example.com"],
        input="an admin's password\n", text=True, check=True,
        env={**os.environ, "BERTH_DATA_DIR": str(data)},
    )  # fmt: skip
    admin = {"email": "admin@example.com", "password": "an admin's password"}
    token = httpx.post(f"{base}/api/auth/token", json=admin).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def warm_pool(base: str, headers: dict[str, str], ready: int) -> dict[str, Any]:
    """The default template's pool once ``ready`` VMs are ready in it."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while (pool := httpx.get(f"{base}/api/pools/default", headers=headers).json())[
        "ready"
    ] < ready and time.monotonic() < deadline:
        time.sleep(0.5)
    return pool  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_by_default_a_session_runs_its_task_in_a_warm_vm_of_its_own(vms: LibvirtProvider) -> None:
    """The whole system with no provider setting, as ``make run``: libvirt VMs, a warm pool
    per template, a session served from it; the session's end removes its VM."""
    # QEMU (an unprivileged user) must reach the VMs' files: not under pytest's 0700 tmp.
    data = Path(tempfile.mkdtemp(prefix="e2e-vm-", dir=vms.data_dir))
    env = {"BERTH_VM_IMAGES_DIR": str(vms.images)}
    system = LocalSystem.start(data, "e2evm", env=env, provider=None)
    host_id = f"e2evm{system.base.rsplit(':', 1)[1]}"
    settings = Settings(data_dir=data, sandbox_provider="libvirt", host_id=host_id)
    left = make_provider(settings, make_gateway(settings))  # to see its VMs, of its host
    try:
        assert "sandboxes: libvirt VMs, one per session, a warm pool of 1 to 3" in system.log()
        base = system.base
        headers = token_for(base, "vm@example.com")
        # The pool's state is an admin's to read.
        assert httpx.get(f"{base}/api/pools/default", headers=headers).status_code == 403
        admin = admin_headers(base, data)
        assert httpx.get(f"{base}/api/pools/nope", headers=admin).status_code == 404
        pool = warm_pool(base, admin, ready=1)
        assert (pool["target"], pool["ready"], pool["hits"]) == (1, 1, 0)

        session = httpx.post(f"{base}/api/sessions", json={}, headers=headers)
        sid = session.json()["id"]
        wait_status(base, headers, sid, "ready")
        prompt = "$ echo hello from && cat /etc/berth-template && uname -r"
        task = httpx.post(
            f"{base}/api/sessions/{sid}/tasks", json={"prompt": prompt}, headers=headers
        )
        assert task.status_code == 202
        events = read_events(base, headers, sid, DONE)
        output = "".join(e["data"]["text"] for e in events if e["type"] == EventType.step_output)
        assert output.startswith("hello from\ndefault\n") and "cloud-amd64" in output
        sandbox = next(e["data"] for e in events if e["type"] == EventType.sandbox_ready)
        assert sandbox["provider"] == "libvirt" and sandbox["pooled"] is True  # a warm hit
        assert httpx.get(f"{base}/api/pools/default", headers=admin).json()["hits"] == 1
        assert httpx.delete(f"{base}/api/sessions/{sid}", headers=headers).status_code == 202
        wait_status(base, headers, sid, "ended")
        names = [domain.name() for domain in libvirt.open(vms.uri).listAllDomains()]
        assert sandbox["handle"] not in names
        assert not (data / "vms" / sandbox["sandbox_id"]).exists()
        warm_pool(base, admin, ready=1)  # refilled
        assert len(asyncio.run(left.machines())) == 1
        assert system.stop() == 0
        # Its stop (Ctrl-C) ended the warm pool, which destroyed its VMs: none outlives it.
        assert asyncio.run(left.machines()) == []
    finally:
        assert system.stop() == 0
        asyncio.run(remove_all(left))  # what a failure left
        shutil.rmtree(data, ignore_errors=True)


async def pool_state(handle: Any, wanted: Callable[[PoolState], bool]) -> PoolState:
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        while True:
            state: PoolState = await handle.query(SandboxPool.state)
            if wanted(state):
                return state
            await asyncio.sleep(0.5)


async def test_a_warm_pool_hands_out_ready_vms_refills_and_falls_back_to_cold(
    vms: LibvirtProvider, env: WorkflowEnvironment, sqlite_engine: Engine
) -> None:
    client, queue = env.client, f"pool-{uuid.uuid4().hex[:8]}"
    sandboxes = SandboxActivities(vms, sqlite_engine, CONNECT_TIMEOUT_S, scratch_artifacts())
    pool = VmActivities(vms, client, CONNECT_TIMEOUT_S)

    async def claim(session_id: str) -> SandboxInfo | None:
        request = ClaimRequest(session_id=session_id, template=vm_templates.DEFAULT)
        claimed: SandboxInfo | None = await ActivityEnvironment().run(pool.claim, request)
        return claimed

    async with Worker(
        client,
        task_queue=queue,
        workflows=[SandboxPool],
        activities=[sandboxes.provision, sandboxes.destroy, pool.claim],
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        handle = await client.start_workflow(
            SandboxPool.run,
            PoolInput(template=vm_templates.DEFAULT, host_task_queue=queue, min_size=1, max_size=1),
            id=pool_workflow_id(vms.host_id, vm_templates.DEFAULT),
            task_queue=queue,
        )
        # Still booting: the claim says so at once, and the session would create one cold.
        assert await claim(uuid.uuid4().hex) is None
        first = (await pool_state(handle, lambda s: len(s.ready) == 1)).ready[0]

        session_id = uuid.uuid4().hex
        claimed = await claim(session_id)
        assert claimed is not None and claimed.id == first.id
        assert claimed.session_id == session_id and (await vms.health(claimed)).ok
        again = await claim(session_id)  # a retried claim: the same VM, not another
        assert again is not None and again.id == first.id
        # Claimed, not yet relabelled: the pool still answers for it, so it is kept.
        report = await reconcile(vms, session_owner(client, vms.host_id), grace_s=0)
        assert first.id in report.adopted
        await ActivityEnvironment().run(pool.assign, claimed)
        (machine,) = [m for m in await vms.machines() if m.sandbox_id == first.id]
        assert machine.session_id == session_id  # now the session's, for reconciliation
        await vms.destroy(claimed)  # the session's end

        state = await pool_state(handle, lambda s: len(s.ready) == 1 and s.ready[0].id != first.id)
        assert (state.hits, state.misses) == (1, 1)
        # Reconciliation asks the pool about its members, and keeps them.
        report = await reconcile(vms, session_owner(client, vms.host_id), grace_s=0)
        assert report.adopted == [state.ready[0].id] and report.destroyed == []

        await handle.signal(SandboxPool.stop)
        await handle.result()
    assert await vms.machines() == []


async def test_a_preserved_vm_disk_comes_back_on_a_new_vm(
    vms: LibvirtProvider, env: WorkflowEnvironment, sqlite_engine: Engine
) -> None:
    sandbox = await boot(vms)
    assert (await run(vms, sqlite_engine, sandbox, "echo kept > kept.txt"))[0] == 0
    activities = VmActivities(vms, env.client, CONNECT_TIMEOUT_S)
    await ActivityEnvironment().run(activities.preserve, sandbox)
    assert await gone(vms, sandbox)  # the domain and its folder; the disk is kept aside
    assert (vms.preserved(sandbox.id) / "disk.qcow2").exists()

    request = RestoreRequest(
        preserved=sandbox, sandbox_id=uuid.uuid4().hex, session_id=sandbox.session_id
    )
    restored: SandboxInfo = await ActivityEnvironment().run(activities.restore, request)
    assert restored.id != sandbox.id and vms.gateway.is_connected(restored.id)
    code, output = await run(vms, sqlite_engine, restored, "cat kept.txt")
    assert (code, output) == (0, "kept\n")
    assert not vms.preserved(sandbox.id).exists()  # now the new VM's disk
    await vms.destroy(restored)
    assert await gone(vms, restored)


async def test_a_machine_that_will_not_wake_still_has_its_disk_kept(
    vms: LibvirtProvider, env: WorkflowEnvironment, sqlite_engine: Engine
) -> None:
    """A preserve whose machine was shut off behind Berth's back (its guest cannot flush)
    keeps the disk as last written, rather than failing and having the session destroy it."""
    sandbox = await boot(vms)
    assert (await run(vms, sqlite_engine, sandbox, "echo kept > kept.txt"))[0] == 0
    await vms.in_guest(sandbox, "sync")  # on the disk before the power goes
    destroy = ["virsh", "-c", vms.uri, "destroy", sandbox.handle]
    virsh = await asyncio.to_thread(subprocess.run, destroy, capture_output=True)
    assert virsh.returncode == 0, virsh.stderr
    activities = VmActivities(vms, env.client, CONNECT_TIMEOUT_S)
    await ActivityEnvironment().run(activities.preserve, sandbox)
    assert (vms.preserved(sandbox.id) / "disk.qcow2").exists()

    request = RestoreRequest(
        preserved=sandbox, sandbox_id=uuid.uuid4().hex, session_id=sandbox.session_id
    )
    restored: SandboxInfo = await ActivityEnvironment().run(activities.restore, request)
    assert (await run(vms, sqlite_engine, restored, "cat kept.txt")) == (0, "kept\n")
    await vms.destroy(restored)
    assert await gone(vms, restored)


Broken = Callable[
    [LibvirtProvider, SandboxInfo, Engine], contextlib.AbstractAsyncContextManager[str]
]


@contextlib.asynccontextmanager
async def destroyed(
    vms: LibvirtProvider, sandbox: SandboxInfo, engine: Engine
) -> AsyncIterator[str]:
    destroy = ["virsh", "-c", vms.uri, "destroy", sandbox.handle]  # behind Berth's back
    virsh = await asyncio.to_thread(subprocess.run, destroy, capture_output=True)
    assert virsh.returncode == 0, virsh.stderr
    yield "its machine is shut off (it was not ended by Berth)"


@contextlib.asynccontextmanager
async def cut_off(vms: LibvirtProvider, sandbox: SandboxInfo, engine: Engine) -> AsyncIterator[str]:
    """The VM runs on, but nothing it sends reaches the host (a hung or cut-off guest)."""
    address = vms.address(sandbox.handle)
    assert ipaddress.ip_address(address) in vms.subnet, address
    with firewall.cut_off(address, f"berth-test-cut-off-{sandbox.id[:8]}"):
        yield "its guest agent answered nothing for"


@pytest.mark.parametrize("break_it", [destroyed, cut_off], ids=["destroyed", "silent"])
async def test_a_broken_vm_is_reported_and_its_step_fails_at_once(
    vms: LibvirtProvider, sqlite_engine: Engine, break_it: Broken
) -> None:
    """Destroyed behind Berth's back, or running with its guest's heartbeats unanswered:
    the host's watch reports it and the running step fails."""
    sandbox = await boot(vms)
    deaths: list[str] = []

    async def died(machine: Machine, reason: str) -> None:
        deaths.append(f"{machine.sandbox_id}: {reason}")

    request = step_request(sqlite_engine, sandbox.id, "sleep 300", task_id=uuid.uuid4().hex)
    request = request.model_copy(
        update={"sandbox": sandbox.model_copy(update={"session_id": request.sandbox.session_id})}
    )
    activities = SandboxActivities(vms, sqlite_engine, CONNECT_TIMEOUT_S, scratch_artifacts())
    _, step = await attempt(activities, request, 1)
    await asyncio.sleep(1)  # the command runs
    async with break_it(vms, sandbox, sqlite_engine) as why:
        reported: set[str] = set()
        deadline = time.monotonic() + 3 * monitor.SILENCE_S
        while not deaths and time.monotonic() < deadline:
            machines = await monitor.check(vms, died, reported)
            await asyncio.sleep(monitor.POLL_S)
        assert machines == [m for m in await vms.machines() if m.sandbox_id == sandbox.id]
        assert len(deaths) == 1 and deaths[0].startswith(f"{sandbox.id}: {why}"), deaths
        with pytest.raises(ApplicationError) as failed:
            await asyncio.wait_for(step, 10)
        assert failed.value.type == "SandboxDied" and failed.value.non_retryable
    await vms.destroy(sandbox)
    assert await gone(vms, sandbox)

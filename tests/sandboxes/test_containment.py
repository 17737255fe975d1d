"""Guest containment, tested from inside real Docker sandboxes.

The steps here go straight to the guest through the gateway, as RunStep sends them after the
command policy, but without it: whatever a step does, the sandbox must hold. A step runs as
an unprivileged user with no capabilities, cannot read the guest token, writes only to its
size-limited workspace and /tmp, opens no raw sockets, and reaches nothing on the host or
beside it but the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import vm_templates
from berth.host import gateway_certificate, make_gateway, make_provider
from config.settings import Settings
from guest_agent import protocol
from guest_agent.user import WORKSPACE
from sandboxes.docker import BRIDGE, FIREWALL_CHAIN, DockerProvider
from sandboxes.gateway import CLOSE_IN_USE, GuestGateway
from sandboxes.models import BrowserStep, Check, FileStep, SandboxInfo, TerminalStep
from sandboxes.provider import TOKEN_VARIABLE, SandboxProvider
from tests.support.local import free_port

WORKSPACE_MB = 64


@dataclass
class Sandbox:
    """A sandbox whose guest is driven straight through the gateway (no command policy)."""

    provider: SandboxProvider
    info: SandboxInfo

    @property
    def token(self) -> str:
        return self.provider.guest_env(self.info.id)[TOKEN_VARIABLE]

    async def run(self, command: str, timeout_s: float = 60) -> tuple[int, str]:
        """Exit code and output (both streams) of ``command`` in the guest."""
        lines: list[str] = []

        async def keep(seq: int, stream: str, text: str) -> None:
            lines.append(text)

        step = TerminalStep(command=command)
        outcome = await self.provider.run_step(self.info, uuid.uuid4().hex, step, timeout_s, keep)
        return outcome.exit_code, "".join(lines)

    def inspect(self) -> str:
        return subprocess.run(
            ["docker", "inspect", self.info.handle], capture_output=True, text=True, check=True
        ).stdout


@dataclass
class Host:
    settings: Settings
    provider: DockerProvider
    gateway: GuestGateway
    first: Sandbox
    second: Sandbox


@pytest.fixture(scope="module")
async def host(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Host]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("containment"),
        host_id=f"contain-{uuid.uuid4().hex[:8]}",
        temporal_address=f"127.0.0.1:{free_port()}",  # nothing there: not needed here
        gateway_port=free_port(),
        sandbox_workspace_mb=WORKSPACE_MB,
        sandbox_tmp_mb=16,
        sandbox_provider="docker",  # the VMs' side is in tests/sandboxes/test_libvirt.py
    )
    gateway = make_gateway(settings)
    provider = make_provider(settings, gateway)
    assert isinstance(provider, DockerProvider)
    await provider.prepare()
    certificate = gateway_certificate(settings, [provider.host_address])  # wss, as by default
    await gateway.start(provider.host_address, settings.gateway_port, certificate)
    made: list[SandboxInfo] = []
    try:
        for _ in range(2):
            made.append(
                await provider.provision(uuid.uuid4().hex, "containment", vm_templates.DEFAULT)
            )
            await provider.wait_connected(made[-1], 60)
        yield Host(settings, provider, gateway, *(Sandbox(provider, info) for info in made))
    finally:
        for info in made:
            await provider.destroy(info)
        await gateway.stop()
        await provider.close()


async def test_steps_run_unprivileged_without_capabilities(host: Host) -> None:
    code, out = await host.first.run("id -u; id -G; grep -E '^(Cap|NoNewPrivs)' /proc/self/status")
    assert code == 0, out
    status = dict(line.split(":\t") for line in out.splitlines()[2:])
    assert out.splitlines()[:2] == ["1000", "1000"]
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[capabilities], 16) == 0, out
    assert status["NoNewPrivs"] == "1"
    # No way back to root: setuid binaries give nothing under no_new_privs.
    code, out = await host.first.run("su -c id root </dev/null; setpriv --reuid=0 id -u")
    assert code != 0 and "\n0\n" not in f"\n{out}"
    # The step's cwd and HOME are the workspace.
    assert await host.first.run("pwd; echo $HOME") == (0, f"{WORKSPACE}\n{WORKSPACE}\n")


async def test_the_guest_token_is_nowhere_a_step_can_read(host: Host) -> None:
    token = host.first.token
    _, out = await host.first.run(
        "env; cat /proc/1/environ /proc/1/cmdline; ps -eo args;"
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done;"
        "echo found:$(grep -rlsF --exclude-dir=proc --exclude-dir=sys -e" + f" {token[:16]} /);"
        "cat /run/berth/token"
    )
    assert token[:16] not in out.replace("-e " + token[:16], "")
    assert "\nfound:\n" in out  # searched every readable file, found nothing
    assert "/run/berth/token: Permission denied" in out
    # Nor in the container's configuration, which `docker inspect` shows any operator.
    assert token not in host.first.inspect()


async def test_a_step_cannot_take_over_the_link_with_or_without_the_token(host: Host) -> None:
    url = host.provider.guest_url()
    assert url.startswith("wss://")
    probe = (
        "import asyncio, json, ssl, sys\n"
        "from websockets import connect\n"
        # A step trusts any certificate: what it would do to talk to the gateway.
        "tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
        "tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE\n"
        "async def main(token):\n"
        f"    async with connect({url!r}, ssl=tls) as ws:\n"
        f"        await ws.send(json.dumps(dict(type='hello', sandbox_id={host.first.info.id!r},"
        " token=token)))\n"
        "        try:\n"
        "            await ws.recv()\n"
        "        except Exception:\n"
        "            pass\n"
        "        print(ws.close_code)\n"
        "for token in sys.argv[1:]:\n"
        "    asyncio.run(main(token))\n"
    )
    await host.first.run(f"cat > probe.py <<'EOF'\n{probe}EOF")
    # A forged token is refused; even the real one (say it leaked) cannot open a second link
    # while the agent's is up.
    _, out = await host.first.run(f"python3 probe.py forged {host.first.token}")
    assert out.split() == ["4401", str(CLOSE_IN_USE)], out
    assert await host.first.run("echo the agent is still here") == (0, "the agent is still here\n")


async def test_the_root_filesystem_is_read_only_and_the_workspace_is_bounded(host: Host) -> None:
    _, out = await host.first.run(
        "for p in /x /etc/x /usr/bin/x /opt/berth/x /var/tmp/x /run/x; do"
        " touch $p 2>/dev/null && echo wrote $p; done; touch /tmp/ok ~/ok && echo ok"
    )
    assert out == "ok\n"
    # Filling the workspace stops at its size, in the sandbox's tmpfs, not on the host.
    _, out = await host.first.run(
        "trap 'rm -f big fill' EXIT; fallocate -l 200G big;"
        " dd if=/dev/zero of=fill bs=1M count=1000 status=none;"
        " df --output=size,target -BM . | tail -n 1; du -sBM fill"
    )
    assert out.count("No space left on device") == 2, out
    size, filled = out.splitlines()[-2:]
    assert size.split() == [f"{WORKSPACE_MB}M", WORKSPACE]
    assert int(filled.split()[0].removesuffix("M")) <= WORKSPACE_MB
    diff = await asyncio.to_thread(
        subprocess.run,
        ["docker", "diff", host.first.info.handle],
        capture_output=True,
        text=True,
        check=True,
    )
    # Nothing of it in the container's layer on the host's disk (--init's binary aside).
    assert set(diff.stdout.splitlines()) <= {"C /usr", "C /usr/sbin", "A /usr/sbin/docker-init"}


async def test_file_steps_act_with_the_users_rights(host: Host) -> None:
    lines: list[str] = []

    async def keep(seq: int, stream: str, text: str) -> None:
        lines.append(text)

    async def file_step(op: str, path: str) -> tuple[int, str | None]:
        outcome = await host.provider.run_step(
            host.first.info, uuid.uuid4().hex, FileStep(op=op, path=path, content="x"), 30, keep
        )
        return outcome.exit_code, outcome.error

    # The token's directory, reached by a symlink in the workspace, is refused as outside it;
    # and a file written is the user's, so later commands can change it.
    await host.first.run("ln -sfn /run/berth secrets")
    code, error = await file_step("read", "secrets/token")
    assert code == 1 and error and "outside the workspace" in error
    assert await file_step("write", "made/by/step.txt") == (0, None)
    assert await host.first.run("stat -c %U made made/by/step.txt") == (0, "berth\nberth\n")


# Python that, wherever it runs, leaves a file saying as whom (root's: 0).
PLANTED = "import os; open(f'/tmp/{}-ran-as-{{os.getuid()}}', 'a').close()"


async def test_nothing_a_step_leaves_runs_as_root(host: Host) -> None:
    # A user site .pth and a playwright package in the workspace (the agent's old cwd): both
    # would run in any Python started with the user's HOME, or from the workspace.
    site = "~/.local/lib/python3.11/site-packages"
    code, out = await host.first.run(
        f"mkdir -p {site} playwright && echo {PLANTED.format('pth')!r} > {site}/x.pth"
        f" && echo {PLANTED.format('playwright')!r} > playwright/__init__.py"
        " && python3 -c 'import playwright' && ls /tmp"
    )
    assert code == 0 and "pth-ran-as-1000" in out, out  # they do run, as the user
    # Root starts Python now: Playwright's driver and the Chromium launcher at a browser
    # step, a regex check's matcher, a file check.
    lines: list[str] = []

    async def keep(seq: int, stream: str, text: str) -> None:
        lines.append(text)

    # The gateway is all a page can reach from inside: Chromium starts, whatever it shows.
    url = f"http://{host.provider.host_address}:{host.settings.gateway_port}/"
    browser = BrowserStep(action="navigate", url=url, timeout_s=30)
    outcome = await host.provider.run_step(host.first.info, uuid.uuid4().hex, browser, 120, keep)
    assert "did not start" not in (outcome.error or ""), (outcome, lines)
    assert any("navigate" in line or "failed" in line for line in lines), lines
    matched = TerminalStep(command="echo hi", check=Check(kind="output_regex", value="^h"))
    outcome = await host.provider.run_step(host.first.info, uuid.uuid4().hex, matched, 30, keep)
    assert outcome.ok, outcome
    peek = TerminalStep(command="true", check=Check(kind="file_exists", value="/run/berth/token"))
    outcome = await host.provider.run_step(host.first.info, uuid.uuid4().hex, peek, 30, keep)
    assert outcome.check is not None and not outcome.check.ok  # root-only: not seen
    assert outcome.check.detail == "/run/berth/token does not exist"
    code, out = await host.first.run("ls /tmp; cat /run/berth/token")
    assert "-ran-as-0" not in out, out
    assert "/run/berth/token: Permission denied" in out


async def test_no_raw_or_icmp_sockets(host: Host) -> None:
    _, out = await host.first.run(
        "python3 - <<'EOF'\n"
        "import socket\n"
        "for kind, proto in ((socket.SOCK_RAW, socket.IPPROTO_ICMP),"
        " (socket.SOCK_DGRAM, socket.IPPROTO_ICMP), (socket.SOCK_RAW, socket.IPPROTO_TCP)):\n"
        "    try:\n"
        "        socket.socket(socket.AF_INET, kind, proto)\n"
        "        print('opened', kind, proto)\n"
        "    except PermissionError:\n"
        "        print('refused')\n"
        "EOF"
    )
    assert out == "refused\nrefused\nrefused\n", out


def firewall_ports() -> set[int]:
    """Host ports some install's sandboxes may reach (tests running beside this one)."""
    rules = subprocess.run(["iptables", "-S", FIREWALL_CHAIN], capture_output=True, text=True)
    words = rules.stdout.split()
    return {int(words[i + 1]) for i, word in enumerate(words) if word == "--dport"}


def closed_port() -> int:
    allowed = firewall_ports()
    while (port := free_port()) in allowed:
        pass
    return port


@contextlib.contextmanager
def listening(port: int) -> Iterator[None]:
    """A TCP listener on every address of the host (what an API on 0.0.0.0 would be)."""
    server = socket.create_server(("0.0.0.0", port))
    try:
        yield
    finally:
        server.close()


def link_locals(device: str) -> list[str]:
    """The host's IPv6 link-local addresses on ``device``, and the one it takes from its
    current MAC (EUI-64) once IPv6 is on there: where a sandbox would reach the host."""
    mac = bytearray.fromhex(Path(f"/sys/class/net/{device}/address").read_text().replace(":", ""))
    mac[0] ^= 0x02
    eui = bytes(mac[:3]) + b"\xff\xfe" + bytes(mac[3:])
    shown = ["ip", "-6", "-o", "addr", "show", "dev", device, "scope", "link"]
    out = subprocess.run(shown, capture_output=True, text=True, check=True).stdout
    had = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return sorted({*had, str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))})


def speaks_ipv6(device: str) -> bool:
    """Whether the host has IPv6 on ``device`` (on, or any address of it)."""
    if Path(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6").read_text() != "1\n":
        return True
    shown = subprocess.run(["ip", "-6", "addr", "show", "dev", device], capture_output=True)
    return shown.stdout.strip() != b""


def host_addresses() -> list[str]:
    """The host's IPv4 addresses, on every interface."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


async def probe(sandbox: Sandbox, targets: list[tuple[str, int]]) -> dict[str, str]:
    """Connect to each target from inside at once: "open", or why not."""
    script = (
        "import asyncio, json, sys\n"
        "async def knock(host, port):\n"
        "    try:\n"
        "        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 3)\n"
        "        w.close()\n"
        "        return 'open'\n"
        "    except Exception as exc:\n"
        "        return type(exc).__name__\n"
        "async def main(targets):\n"
        "    found = await asyncio.gather(*(knock(h, p) for h, p in targets))\n"
        "    print(json.dumps({f'{h}:{p}': r for (h, p), r in zip(targets, found)}))\n"
        f"asyncio.run(main({targets!r}))\n"
    )
    code, out = await sandbox.run(f"python3 - <<'EOF'\n{script}EOF")
    assert code == 0, out
    found: dict[str, str] = json.loads(out)
    return found


async def test_nothing_but_the_gateway_answers_from_inside(host: Host) -> None:
    gateway = (host.provider.host_address, host.settings.gateway_port)
    api = closed_port()
    # The other guest serves on a port of its own, which it reaches itself.
    await host.second.run(
        "python3 -m http.server 8000 >/dev/null 2>&1 & for _ in $(seq 100); do"
        " (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done"
    )
    second_ip = (await host.second.run("hostname -i"))[1].split()[0]
    assert (await probe(host.second, [("127.0.0.1", 8000)]))["127.0.0.1:8000"] == "open"
    targets = [gateway, (second_ip, 8000)]
    for address in [host.provider.host_address, *host_addresses()]:
        # The API (a listener on every address), PostgreSQL, Redis, Temporal, SSH.
        targets += [(address, port) for port in (api, 5432, 6379, 7233, 22)]
    with listening(api):
        socket.create_connection(("127.0.0.1", api), timeout=3).close()  # it does answer
        found = await probe(host.first, targets)
    assert found.pop(f"{gateway[0]}:{gateway[1]}") == "open"
    assert "open" not in found.values(), found


async def test_the_host_speaks_no_ipv6_to_sandboxes(host: Host) -> None:
    # Docker gives its containers no IPv6; the host has none on their bridge either, so no
    # listener on :: is reached past the IPv4 rules, whatever a sandbox's network becomes.
    assert not await asyncio.to_thread(speaks_ipv6, BRIDGE)
    for address in await asyncio.to_thread(link_locals, BRIDGE):
        code, out = await host.first.run(
            f"python3 -c \"import socket; socket.create_connection(('{address}%eth0', "
            f'{host.settings.gateway_port}), timeout=3)"'
        )
        assert code != 0, out


async def test_the_token_of_a_destroyed_sandbox_opens_nothing(host: Host) -> None:
    """Its guest is cut off, and its token is refused at once, and by a worker started
    afresh (which remembers nothing of it: its machine is gone)."""
    info = await host.provider.provision(uuid.uuid4().hex, "containment", vm_templates.DEFAULT)
    await host.provider.wait_connected(info, 60)
    ended = Sandbox(host.provider, info)
    await host.provider.destroy(info)
    assert not host.gateway.is_connected(info.id)
    restarted = make_gateway(host.settings)
    make_provider(host.settings, restarted)  # what says which machines run
    port = free_port()
    await restarted.start("127.0.0.1", port)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    try:
        for url, context in (
            (host.provider.guest_url(), tls),
            (f"ws://127.0.0.1:{port}/guest", None),
        ):
            async with ws_connect(url, ssl=context) as ws:
                hello = {"type": protocol.HELLO, "sandbox_id": info.id, "token": ended.token}
                await ws.send(json.dumps(hello))
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == protocol.CLOSE_UNAUTHORIZED, url
    finally:
        await restarted.stop()


async def test_a_sandbox_has_no_way_out_to_other_networks(host: Host) -> None:
    # Mock mode's network is internal: no route beyond the host's bridge address.
    found = await probe(host.first, [("1.1.1.1", 443), ("10.213.0.1", 8765), ("8.8.8.8", 53)])
    assert "open" not in found.values(), found


def test_a_token_file_is_read_and_the_variable_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guest_agent.__main__ import config_from_env

    (tmp_path / "token").write_text("from-the-file\n")
    monkeypatch.setenv("BERTH_GUEST_URL", "ws://127.0.0.1:1/guest")
    monkeypatch.setenv("BERTH_SANDBOX_ID", "s")
    monkeypatch.setenv("BERTH_GUEST_TOKEN", "from-the-environment")
    monkeypatch.setenv("BERTH_GUEST_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.delenv("BERTH_GUEST_USER", raising=False)
    config = config_from_env()
    assert config.token == "from-the-file"
    assert "BERTH_GUEST_TOKEN" not in os.environ

"""Making this host ready for libvirt VMs: the daemons, KVM or TCG, the guests' bridge and its
egress firewall, same-page merging (KSM). Every step is idempotent; `python -m berth prepare`
(berth/prepare.py) runs them.

There is no systemd here, so virtlogd and libvirtd are started by hand. Whether KVM works is
decided by booting a guest kernel with it, not by /dev/kvm existing: on nested hosts /dev/kvm
may be present while guests hang at boot. Where it does not work, libvirtd must never see it
either (it re-probes QEMU on every domain start otherwise, 20-45 s each): it runs in a mount
namespace of its own where /dev/kvm is covered by an unreadable file, with ``namespaces = []``
so QEMU inherits that view.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sandboxes import firewall, vm_image

log = logging.getLogger("berth.libvirt")

Accel = Literal["kvm", "tcg"]

STATE_DIR = Path("/run/berth")  # host-wide: one libvirtd serves every install on the host
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
KVM_MASK = STATE_DIR / "kvm-masked"
PROBE_TIMEOUT_S = 20.0  # a KVM boot takes ~1 s; a broken KVM hangs
DAEMON_TIMEOUT_S = 30.0
FIREWALL_IN = "BERTH-VM-IN"
FIREWALL_OUT = "BERTH-VM-OUT"
REPLIES = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED")
# Never reachable from a guest, whatever its template says: private, shared, link-local,
# loopback, multicast and reserved ranges.
NON_PUBLIC = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
)  # fmt: skip


KSM = Path("/sys/kernel/mm/ksm")
# Pages ksmd scans per wake-up (every 20 ms by default). The kernel's 100 take minutes to go
# once through 20 idle VMs; this goes through them in about half a minute, for some of
# one core while it does.
KSM_PAGES_TO_SCAN = 1000
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class HostError(RuntimeError):
    pass


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise HostError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def probe_kvm(kernel: vm_image.Kernel) -> bool:
    """Boot the guest kernel under KVM into an initramfs that only says it arrived."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "probe.img"
        initrd.write_bytes(vm_image.probe_initramfs())
        try:
            result = subprocess.run(
                [
                    "qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-nographic",
                    "-no-reboot", "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
                    "-append", "console=ttyS0 panic=-1 quiet",
                ],
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return False
    return vm_image.PROBE_MARKER.encode() in result.stdout


def accel(kernel: vm_image.Kernel) -> Accel:
    """KVM if a guest boots with it, else TCG; decided once per host boot and logged."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    decided = STATE_DIR / "accel"
    cached = decided.read_text().strip() if decided.exists() else ""
    if cached in ("kvm", "tcg"):
        log.info("VM acceleration: %s (decided earlier, %s)", cached, decided)
        return "kvm" if cached == "kvm" else "tcg"
    choice: Accel = "kvm" if probe_kvm(kernel) else "tcg"
    log.info(
        "VM acceleration: %s (%s)",
        choice,
        "a guest booted under KVM" if choice == "kvm" else "KVM unusable here: QEMU TCG",
    )
    decided.write_text(choice)
    return choice


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _set_qemu_namespaces_off() -> None:
    """``namespaces = [ ]`` in qemu.conf: QEMU then sees libvirtd's /dev, KVM masked."""
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    line = "namespaces = [ ]"
    if any(row.strip() == line for row in text.splitlines()):
        return
    QEMU_CONF.write_text(text.rstrip("\n") + f"\n# Berth: KVM is unusable on this host\n{line}\n")


def ensure_daemons(choice: Accel) -> None:
    """virtlogd, then libvirtd (KVM hidden from it under TCG), unless they already run."""
    for tool in ("virtlogd", "libvirtd"):
        if shutil.which(tool) is None:
            raise HostError(f"{tool} is not installed: run `make setup`")
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    if not _pid_alive(Path("/run/virtlogd.pid")):
        _run("virtlogd", "--daemon")
    if _pid_alive(Path("/run/libvirtd.pid")):
        return
    if choice == "kvm":
        _run("libvirtd", "--daemon")
    else:
        _set_qemu_namespaces_off()
        KVM_MASK.touch()
        KVM_MASK.chmod(0)
        masked = f"mount --bind {KVM_MASK} /dev/kvm; exec libvirtd --daemon"
        _run("unshare", "--mount", "--propagation", "private", "sh", "-c", masked)
        log.info("libvirtd started with /dev/kvm masked (TCG host)")
    deadline = time.monotonic() + DAEMON_TIMEOUT_S
    while _run("virsh", "-c", "qemu:///system", "version", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise HostError("libvirtd did not answer; see /var/log/libvirt")
        time.sleep(0.3)


def ensure_network(bridge: str, subnet: str, gateway_port: int, nameserver: str | None) -> str:
    """The guests' bridge, its address (returned: the guests' router and the gateway's
    address for them), NAT to the outside, and the host-side egress policy.

    Guests may reach the host only on the gateway's port, over IPv4 (the host has no IPv6
    on the bridge); beyond the host, public addresses and the host's nameserver (DNS only).
    Guests never reach each other: their bridge ports are isolated, and each is bound to its
    MAC and address (domain XML). Templates narrow this per VM (restrict_egress).
    """
    network = ipaddress.ip_network(subnet)
    host_ip = str(next(network.hosts()))
    if _run("ip", "link", "show", bridge, check=False).returncode != 0:
        _run("ip", "link", "add", bridge, "type", "bridge")
    cidr = f"{host_ip}/{network.prefixlen}"
    if cidr not in _run("ip", "-o", "addr", "show", "dev", bridge).stdout:
        _run("ip", "addr", "add", cidr, "dev", bridge)
    firewall.no_ipv6(bridge)
    _run("ip", "link", "set", bridge, "up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    for chain in (FIREWALL_IN, FIREWALL_OUT):
        firewall.ensure_chain(chain)
    # Installs on one host (tests) each add their gateway's port, and remove it (close_host).
    tag = firewall.owner_tag(gateway_port)
    firewall.remove_tagged(FIREWALL_IN, tag)  # left by a worker that crashed
    firewall.accept_port(FIREWALL_IN, gateway_port, tag)
    firewall.ensure_rule(FIREWALL_IN, *REPLIES, "-j", "ACCEPT")
    firewall.ensure_rule(FIREWALL_IN, "-j", "DROP")
    firewall.ensure_rule(FIREWALL_OUT, *REPLIES, "-j", "ACCEPT")
    if nameserver:
        for protocol in ("udp", "tcp"):
            rule = ("-d", nameserver, "-p", protocol, "--dport", "53", "-j", "ACCEPT")
            firewall.ensure_rule(FIREWALL_OUT, *rule)
    for blocked in NON_PUBLIC:
        firewall.ensure_rule(FIREWALL_OUT, "-d", blocked, "-j", "DROP")
    firewall.ensure_rule(FIREWALL_OUT, "-j", "ACCEPT")
    firewall.ensure_rule("INPUT", "-i", bridge, "-j", FIREWALL_IN, first=True)
    # Before Docker's FORWARD rules (its policy is DROP): out through ours, replies back in.
    firewall.ensure_rule("FORWARD", "-i", bridge, "-j", FIREWALL_OUT, first=True)
    firewall.ensure_rule("FORWARD", "-o", bridge, *REPLIES, "-j", "ACCEPT", first=True)
    firewall.ensure_rule(
        "POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE", table="nat"
    )
    return host_ip


def bandwidth_limits_work() -> bool:
    """Whether libvirt's <bandwidth> can be applied: it shapes with the kernel's htb and sfq
    qdiscs and polices with a tc action, which some hosts' kernels lack (this one did).
    Tried once on a scratch TAP device."""
    tap = "berth-tcprobe"
    _run("ip", "tuntap", "add", "dev", tap, "mode", "tap", check=False)
    try:
        steps = (
            ("qdisc", "add", "dev", tap, "root", "handle", "1:", "htb", "default", "1"),
            ("class", "add", "dev", tap, "parent", "1:", "classid", "1:1", "htb", "rate", "1mbit"),
            ("qdisc", "add", "dev", tap, "parent", "1:1", "handle", "2:", "sfq", "perturb", "10"),
            ("qdisc", "add", "dev", tap, "ingress"),
            ("filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "u32", "match",
             "u32", "0", "0", "police", "rate", "1mbit", "burst", "64k", "drop"),
        )  # fmt: skip
        return all(_run("tc", *step, check=False).returncode == 0 for step in steps)
    finally:
        _run("ip", "link", "del", tap, check=False)


def restrict_egress(address: str, allowed: list[str]) -> None:
    """The guest at ``address`` reaches, beyond the host, only the ``allowed`` networks
    (none: the gateway alone), whatever they are, private ones included."""
    firewall.ensure_rule(FIREWALL_OUT, "-s", f"{address}/32", "-j", "DROP", first=True)
    for network in allowed:
        firewall.ensure_rule(
            FIREWALL_OUT, "-s", f"{address}/32", "-d", network, "-j", "ACCEPT", first=True
        )


def lift_restrictions(address: str) -> None:
    """Undo restrict_egress, for the next guest that gets the address."""
    source = f"-s {address}/32 "
    for rule in firewall.run("-S", FIREWALL_OUT).splitlines():
        if source in rule:
            firewall.run("-D", *rule.split()[1:])


def close_host(gateway_port: int) -> None:
    """Remove what prepare_host let in for this worker (its gateway's port)."""
    firewall.remove_tagged(FIREWALL_IN, firewall.owner_tag(gateway_port))


def ensure_ksm() -> bool:
    """Turn on the kernel's same-page merging: QEMU marks guests' memory mergeable, so
    idle VMs of one template (same kernel, same files read) share their identical pages.
    False, said, where the kernel has none or it cannot be turned on (a container)."""
    try:
        if (KSM / "run").read_text().strip() != "1":
            (KSM / "run").write_text("1")
        if int((KSM / "pages_to_scan").read_text()) < KSM_PAGES_TO_SCAN:
            (KSM / "pages_to_scan").write_text(str(KSM_PAGES_TO_SCAN))
    except OSError as exc:
        log.warning("same-page merging (KSM) stays off: %s", exc)
        return False
    return True


def ksm_shared_bytes() -> int:
    """Memory KSM saves now: the pages that point at a shared page instead of their own."""
    return int((KSM / "pages_sharing").read_text()) * PAGE_BYTES


@dataclass(frozen=True)
class Host:
    accel: Accel
    router: str  # the host's address on the guests' bridge
    bandwidth_limits: bool


def prepare_host(
    bridge: str, subnet: str, gateway_port: int, nameserver: str | None, ksm: bool = True
) -> Host:
    """Everything the host needs before a VM starts, and what it can do."""
    choice = accel(vm_image.host_kernel())
    ensure_daemons(choice)
    if ksm:
        ensure_ksm()
    router = ensure_network(bridge, subnet, gateway_port, nameserver)
    shaping = bandwidth_limits_work()
    if not shaping:
        log.warning(
            "this host's kernel cannot shape traffic (tc sfq/police): VMs run without "
            "bandwidth limits"
        )
    return Host(choice, router, shaping)

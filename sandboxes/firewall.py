"""The host firewall, through iptables: every call's outcome is checked, so rules that could
not be made (no root, no CAP_NET_ADMIN, no iptables) stop the worker instead of leaving the
host open.

Workers of several installs share the sandboxes' chains (tests run many at once). What one
adds for itself (its gateway's port, the host ports it allows) carries a comment naming its
gateway port, which no other running worker holds: it removes exactly those rules when it
stops, and a worker started after a crash on the same port first removes what was left.
The chains' final DROP stays: sandboxes that outlive the worker (live-restore) stay shut in.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


class FirewallError(RuntimeError):
    pass


def _iptables(*args: str, table: str = "filter") -> subprocess.CompletedProcess[str]:
    if shutil.which("iptables") is None:
        raise FirewallError("iptables is not installed: run `make setup`")
    # -w: wait for the xtables lock that other workers' calls hold, rather than fail.
    return subprocess.run(
        ["iptables", "-w", "-t", table, *args], capture_output=True, text=True, check=False
    )


def run(*args: str, table: str = "filter") -> str:
    """An iptables command that must succeed; its output."""
    done = _iptables(*args, table=table)
    if done.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def has_rule(chain: str, *rule: str, table: str = "filter") -> bool:
    done = _iptables("-C", chain, *rule, table=table)
    if done.returncode not in (0, 1):  # 1: no such rule; anything else went wrong
        raise FirewallError(f"iptables -C {chain} failed: {done.stderr.strip()}")
    return done.returncode == 0


def ensure_chain(chain: str, table: str = "filter") -> None:
    if _iptables("-S", chain, table=table).returncode != 0:
        run("-N", chain, table=table)


def ensure_rule(chain: str, *rule: str, table: str = "filter", first: bool = False) -> None:
    if not has_rule(chain, *rule, table=table):
        run(*(["-I", chain, "1"] if first else ["-A", chain]), *rule, table=table)


def owner_tag(gateway_port: int) -> str:
    """The comment on the rules of the worker whose gateway listens on ``gateway_port``."""
    return f"berth-gateway-{gateway_port}"


def accept_port(chain: str, port: int, tag: str) -> None:
    """Let the chain's traffic reach a TCP port of the host, as the rule of ``tag``'s worker."""
    run("-I", chain, "1", "-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", tag,
        "-j", "ACCEPT")  # fmt: skip


def remove_tagged(chain: str, tag: str) -> None:
    """Remove every rule of ``chain`` made by ``tag``'s worker."""
    if _iptables("-S", chain).returncode != 0:
        return  # no chain, no rules
    for rule in run("-S", chain).splitlines():
        words = rule.split()
        tagged = any(a == "--comment" and b == tag for a, b in itertools.pairwise(words))
        if words[:2] == ["-A", chain] and tagged:
            run("-D", *words[1:])


def no_ipv6(device: str) -> None:
    """The host speaks no IPv6 on ``device`` (a sandboxes' bridge): it has no link-local
    address there, so nothing listening on ``::`` is reachable from a sandbox past the IPv4
    rules above. Nothing to do on a kernel without IPv6."""
    knob = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    if knob.parent.is_dir():
        knob.write_text("1")


@contextlib.contextmanager
def cut_off(address: str, tag: str) -> Iterator[None]:
    """Drop whatever ``address`` sends to this host, while in the block (a guest cut off, as
    the benchmarks and tests need one); the rule carries ``tag``, by which every copy goes."""
    try:
        run("-I", "INPUT", "1", "-s", f"{address}/32", "-m", "comment", "--comment", tag,
            "-j", "DROP")  # fmt: skip
        yield
    finally:
        remove_tagged("INPUT", tag)

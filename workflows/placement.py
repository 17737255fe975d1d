"""Which host a new session goes to, from the host registry's rows: pure (the rows, the
template, a random source in; a host and why out), so a workflow can decide it with
``workflow.random()`` and replay the same decision, and a test can check every rule.

The rules, in order: only an active host that has the template and room (below its machine
cap, enough memory available for one more sandbox); among those, one with a warm VM of the
template ready (a claim takes a second, a cold boot ten under TCG), the one with most;
otherwise the less loaded of two sampled at random (best-of-2: nearly as good as scanning
every host, and it does not send a burst of sessions all to the one host that looked
emptiest at the last heartbeat). Load is machines per vCPU, plus half the host's load
average per vCPU, so a host busy with other work counts too (as E2B's best-of-K does).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from activities.models import Candidate
from store.models import HostState

__all__ = ["Candidate", "Placement", "has_room", "place"]

SAMPLED = 2


@dataclass(frozen=True)
class Placement:
    host: str | None  # None: no host has room
    why: str
    task_queue: str = ""  # the host's, where its sessions' sandbox activities go


def has_room(host: Candidate, memory_mb: int) -> bool:
    below_cap = host.max_machines is None or host.machines < host.max_machines
    return below_cap and host.memory_available_mb >= memory_mb


def place(
    hosts: Sequence[Candidate], template: str, memory_mb: int, rng: random.Random
) -> Placement:
    """The host for a new session of ``template`` whose sandbox needs ``memory_mb``."""
    able = [h for h in hosts if h.state == HostState.active and template in h.templates]
    fit = [h for h in able if has_room(h, memory_mb)]
    if not fit:
        return Placement(
            None,
            f"no active host with template {template!r} has room "
            f"({len(able)} active with it, all full)",
        )
    warm = [h for h in fit if h.warm.get(template, 0) > 0]
    if warm:
        best = min(warm, key=lambda h: (-h.warm[template], h.load, h.id))
        why = f"a warm {template} VM ready there ({best.warm[template]})"
        return Placement(best.id, why, best.task_queue)
    sampled = rng.sample(sorted(fit, key=lambda h: h.id), min(SAMPLED, len(fit)))
    best = min(sampled, key=lambda h: (h.load, h.id))
    others = ", ".join(f"{h.id} {h.load:.2f}" for h in sampled if h is not best)
    return Placement(
        best.id,
        f"least loaded of {len(sampled)} sampled: {best.load:.2f} per vCPU"
        + (f" (against {others})" if others else ""),
        best.task_queue,
    )

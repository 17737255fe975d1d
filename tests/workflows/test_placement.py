"""Placement picks only an active host with the template and room; a warm VM first (the host
with most); else the less loaded of two sampled; no host with room: none, saying why. The
same random source gives the same pick (a workflow replays it)."""

from __future__ import annotations

import random
from collections import Counter

from store.models import HostState
from workflows.placement import Candidate, place

MEMORY = 1024


def host(name: str, **more: object) -> Candidate:
    values: dict[str, object] = {
        "id": name,
        "state": HostState.active,
        "templates": ("default", "browser"),
        "vcpus": 4,
        "memory_available_mb": 8192,
        "load1": 0.0,
        "machines": 0,
        "max_machines": 10,
    }
    values.update(more)
    return Candidate.model_validate(values)


def test_only_an_active_host_with_the_template_and_room_is_picked() -> None:
    hosts = [
        host("drained", state=HostState.draining),
        host("lost", state=HostState.lost),
        host("other", templates=("browser",)),
        host("full", machines=10),
        host("short", memory_available_mb=MEMORY - 1),
        host("ok", machines=9, load1=3.0),
    ]
    for seed in range(20):
        assert place(hosts, "default", MEMORY, random.Random(seed)).host == "ok"


def test_none_has_room_says_why() -> None:
    hosts = [host("full", machines=10), host("drained", state=HostState.draining)]
    placed = place(hosts, "default", MEMORY, random.Random(0))
    assert placed.host is None
    assert "no active host with template 'default' has room (1 active with it" in placed.why
    assert place([], "default", MEMORY, random.Random(0)).host is None


def test_a_warm_vm_comes_first_the_host_with_most() -> None:
    hosts = [
        host("idle"),
        host("warm1", machines=5, warm={"default": 1}),
        host("warm2", machines=8, warm={"default": 2, "browser": 0}),
    ]
    placed = place(hosts, "default", MEMORY, random.Random(0))
    assert placed.host == "warm2" and "warm default VM" in placed.why
    # Warm VMs of another template do not count.
    assert "sampled" in place(hosts, "browser", MEMORY, random.Random(0)).why


def test_the_less_loaded_of_two_sampled_wins() -> None:
    hosts = [host("a", machines=1), host("b", machines=4), host("c", machines=8)]
    picks = Counter(place(hosts, "default", MEMORY, random.Random(s)).host for s in range(300))
    # c is the most loaded: it loses every sample it is in, so it is never picked; a wins
    # every sample it is in (2 of 3), b the one without a.
    assert set(picks) == {"a", "b"} and picks["a"] > picks["b"] > 0
    placed = place(hosts, "default", MEMORY, random.Random(1))
    assert "least loaded of 2 sampled" in placed.why and "against" in placed.why


def test_the_measured_load_counts_too() -> None:
    hosts = [host("busy", machines=1, load1=8.0), host("calm", machines=2, load1=0.0)]
    assert place(hosts, "default", MEMORY, random.Random(0)).host == "calm"


def test_the_same_random_source_gives_the_same_pick() -> None:
    hosts = [host(f"h{i}", machines=i % 3) for i in range(6)]
    first = [place(hosts, "default", MEMORY, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]

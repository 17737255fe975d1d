"""Berth's one command line: ``python -m berth run | worker | api | prepare | create-admin |
host | temporal-setup | backup | restore | machines | replay | bench | eval``, an argparse
parser with a subcommand each.

Parsing comes first and imports nothing heavy: each command imports what it runs only once it
is chosen, so ``--help`` on any command (or a mistyped option, which argparse refuses with
exit status 2) answers at once and starts nothing. The commands take typed arguments; reading
them from the command line happens here only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

PROG = "python -m berth"
APP_FACTORY = "berth.web:create_app"
BENCH_OUT = Path(".berth/bench")
PRIVATE_UMASK = 0o077

Handler = Callable[[argparse.Namespace], int]


def run_system(args: argparse.Namespace) -> int:
    from berth.run import run

    return run(args.hosts, args.api_replicas)


def run_worker(_: argparse.Namespace) -> int:
    from berth.worker import run

    run()
    return 0


def serve_api(_: argparse.Namespace) -> int:
    import uvicorn

    from config.settings import get_settings
    from telemetry import logs, tracing

    settings = get_settings()
    logs.configure("api", settings.log_format)
    tracing.configure("api", os.environ)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,  # its loggers go through ours (telemetry/logs.py)
        # With a certificate, HTTPS only: the dashboard's cookies are then Secure, and HSTS
        # is sent (api/headers.py).
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        # Behind a TLS proxy, its X-Forwarded-Proto and -For are believed (from the trusted
        # proxies only): the cookie stays Secure, the Origin check sees https, logs and login
        # counters see the client's address.
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
    )
    tracing.shutdown()
    return 0


def prepare_host(args: argparse.Namespace) -> int:
    from berth.prepare import prepare

    return prepare(args.provider)


def create_admin(args: argparse.Namespace) -> int:
    from berth.admin import create_admin

    return create_admin(args.email, args.promote_existing)


def drain_host(args: argparse.Namespace) -> int:
    from berth.drain import set_host_state
    from store.models import HostState

    return set_host_state(args.host, HostState.draining, move=args.move)


def undrain_host(args: argparse.Namespace) -> int:
    from berth.drain import set_host_state
    from store.models import HostState

    return set_host_state(args.host, HostState.active)


def temporal_setup(_: argparse.Namespace) -> int:
    from berth.temporal_setup import temporal_setup

    return temporal_setup()


def list_machines(args: argparse.Namespace) -> int:
    import asyncio

    from berth.machines import machines, parse_age
    from config.settings import get_settings

    older_than = parse_age(args.older_than) if args.older_than else None
    return asyncio.run(machines(get_settings(), args.prune, older_than))


def age(text: str) -> str:
    """An age as --older-than takes it (checked here: argparse says what is wrong)."""
    from berth.machines import parse_age

    try:
        parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def replay_running(args: argparse.Namespace) -> int:
    import asyncio

    from config.settings import get_settings
    from workflows.client import connect
    from workflows.replay import replay

    async def check() -> int:
        client = await connect(get_settings())
        results = await replay(
            client, query=args.query, workflow_ids=args.workflow_id or (), save=args.save
        )
        for result in results:
            print(result.line(), flush=True)
        failed = sum(r.failure is not None for r in results)
        print(f"{len(results)} replayed, {failed} failed")
        return 1 if failed else 0

    return asyncio.run(check())


def bench_spine(args: argparse.Namespace) -> int:
    from bench.spine import bench

    return bench(args.out or BENCH_OUT / "spine.json")


def bench_llm(args: argparse.Namespace) -> int:
    from bench.llm import bench

    return bench(args.out or BENCH_OUT / "llm.json")


def eval_agent(args: argparse.Namespace) -> int:
    from bench.agent_eval import main

    return main(args.out or BENCH_OUT / "eval-agent.json", args.task or [])


def bench_vm(args: argparse.Namespace) -> int:
    from bench.vm import bench

    return bench(
        args.out or BENCH_OUT / "vm.json", args.runs, args.warm_runs, args.only, args.idle_vms
    )


def bench_fork(args: argparse.Namespace) -> int:
    from bench.fork import bench

    return bench(args.out or BENCH_OUT / "fork.json", args.runs, args.providers)


def bench_load(args: argparse.Namespace) -> int:
    from bench.load import Counts, bench

    counts = Counts(
        sequential=args.sequential,
        staggered=args.staggered,
        rate=args.rate,
        burst=args.burst,
        sessions=args.sessions,
        steps=args.steps,
    )
    return bench(args.out or BENCH_OUT / "load.json", counts)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def backup_install(args: argparse.Namespace) -> int:
    from berth.backup import BackupError, backup
    from config.settings import get_settings

    try:
        report = backup(get_settings(), args.dest)
    except BackupError as exc:
        print(f"backup: {exc}")
        return 1
    kept = report.manifest.get("kept_disks")
    print(
        f"backed up to {report.folder}: database {report.manifest['database']}, "
        f"Temporal {report.manifest.get('temporal', 'not embedded')}, "
        f"{report.manifest.get('artifacts', 0)} artifact files, "
        f"{len(kept) if isinstance(kept, list) else 0} kept disks indexed"
    )
    return 0


def restore_install(args: argparse.Namespace) -> int:
    from berth.backup import BackupError, restore
    from config.settings import get_settings

    settings = get_settings()
    try:
        report = restore(settings, args.src)
    except BackupError as exc:
        print(f"restore: {exc}")
        return 1
    print(
        f"restored {report.folder} (taken {report.manifest['started_at']}) into "
        f"{settings.data_dir}; {len(report.ended)} sessions live in the backup ended"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Berth: autonomous agents, each in its own sandbox."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, handler: Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    system = command("run", "the whole system in the foreground, until Ctrl-C", run_system)
    system.add_argument(
        "--hosts",
        type=positive,
        default=1,
        metavar="N",
        help="worker hosts to start on this machine, each with its own host id, gateway port, "
        "sandbox bridge and subnet (default: 1)",
    )
    system.add_argument(
        "--api-replicas",
        type=positive,
        default=1,
        metavar="N",
        help="API processes to start, on the ports after BERTH_PORT, behind nginx on "
        "BERTH_PORT when more than one (default: 1)",
    )
    command("worker", "this host's worker alone: Temporal worker, guest gateway", run_worker)
    command("api", "the JSON API and the dashboard alone (uvicorn)", serve_api)
    prepare = command("prepare", "ready this host for sandboxes, build their images", prepare_host)
    prepare.add_argument(
        "--provider",
        choices=["docker", "libvirt"],
        help="the sandbox provider to prepare (default: BERTH_SANDBOX_PROVIDER's)",
    )
    admin = command(
        "create-admin", "make EMAIL an admin (password asked, or on stdin)", create_admin
    )
    admin.add_argument("email", metavar="EMAIL", help="the admin's email address")
    admin.add_argument(
        "--promote-existing",
        action="store_true",
        help="EMAIL may be registered already: make that account an admin, set its password "
        "and revoke every token and dashboard session it had",
    )
    command(
        "temporal-setup",
        "ready a Temporal namespace of one's own for Berth: add its search attributes",
        temporal_setup,
    )
    saving = command(
        "backup",
        "a consistent copy of this install (databases, artifacts, kept disks' index, secrets)",
        backup_install,
    )
    saving.add_argument("dest", type=Path, metavar="DEST", help="a new or empty folder")
    loading = command(
        "restore", "a backup into a fresh data dir (BERTH_DATA_DIR, empty)", restore_install
    )
    loading.add_argument("src", type=Path, metavar="SRC", help="a folder `backup` wrote")
    listing = command(
        "machines",
        "every Berth machine on this host (containers, VMs) by install, session and age",
        list_machines,
    )
    listing.add_argument(
        "--prune",
        action="store_true",
        help="remove the machines of installs whose data dir is gone (and, with --older-than, "
        "every machine older than that), saying what was removed",
    )
    listing.add_argument(
        "--older-than",
        type=age,
        metavar="AGE",
        help="with --prune: also machines this old (2d, 12h)",
    )

    summary = "an operator's state for a sandbox host in the registry"
    host = commands.add_parser("host", help=summary, description=summary)
    states = host.add_subparsers(dest="state", metavar="ACTION", required=True)
    for name, handler, what in (
        ("drain", drain_host, "no new sessions on HOST, its warm pools ended"),
        ("undrain", undrain_host, "HOST takes new sessions again, its warm pools restart"),
    ):
        sub = states.add_parser(name, help=what, description=what)
        sub.set_defaults(handler=handler)
        sub.add_argument("host", metavar="HOST", help="the host's id (BERTH_HOST_ID)")
        if name == "drain":
            sub.add_argument(
                "--move",
                action="store_true",
                help="also move each live session off HOST between its tasks, its disk kept "
                "(BERTH_KEPT_DISKS_DIR, a folder every host reaches) and restored elsewhere",
            )

    check = command(
        "replay",
        "replay the running sessions' and pools' histories against this code (before a deploy)",
        replay_running,
    )
    which = check.add_mutually_exclusive_group()
    which.add_argument(
        "--workflow-id",
        action="append",
        metavar="ID",
        help="replay this workflow's latest run (repeatable) instead of every running one",
    )
    which.add_argument(
        "--query",
        metavar="QUERY",
        help="a visibility query choosing the workflows (default: the running sessions and pools)",
    )
    check.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="also write each history as JSON, its payloads decrypted, into DIR",
    )

    # No handler of its own: a benchmark must be named, and each sets its handler.
    summary = "measure the whole system on this host"
    bench = commands.add_parser("bench", help=summary, description=summary)
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    def benchmark(name: str, summary: str, handler: Handler) -> argparse.ArgumentParser:
        sub = benches.add_parser(name, help=summary, description=summary)
        sub.set_defaults(handler=handler)
        sub.add_argument(
            "--out",
            type=Path,
            metavar="PATH",
            help=f"where to write the results as JSON (default: {BENCH_OUT}/{name}.json)",
        )
        return sub

    benchmark("spine", "latency from the API to a sandbox and back over SSE", bench_spine)
    benchmark("llm", "latency of the LLM proxy against a scripted server", bench_llm)
    fork = benchmark("fork", "checkpoint, rollback and fork, per provider", bench_fork)
    fork.add_argument("--runs", type=positive, default=3, metavar="N", help="repetitions")
    fork.add_argument(
        "--providers",
        nargs="+",
        choices=("docker", "libvirt"),
        default=["docker", "libvirt"],
        help="which providers to measure (default: both)",
    )
    vm = benchmark("vm", "cost of a sandbox VM, cold and from a warm pool", bench_vm)
    vm.add_argument(
        "--runs",
        type=positive,
        default=3,
        metavar="N",
        help="repetitions of each VM measurement (default: 3)",
    )
    vm.add_argument(
        "--warm-runs",
        type=positive,
        default=8,
        metavar="N",
        help="sessions started on a warm-pool hit (default: 8)",
    )
    vm.add_argument(
        "--only",
        action="append",
        metavar="PART",
        help="measure only this part (repeatable): image, cold, floor, hibernation, "
        "detection, system (default: all)",
    )
    vm.add_argument(
        "--idle-vms",
        type=positive,
        default=20,
        metavar="K",
        help="idle VMs run at once for the density figures (default: 20)",
    )
    load = benchmark(
        "load", "the local fleet (2 hosts, 2 API replicas, PostgreSQL) under load", bench_load
    )
    for option, default, what in (
        ("--sequential", 20, "sessions created one after another"),
        ("--staggered", 100, "sessions created at --rate a second"),
        ("--burst", 100, "sessions created at once (kept live for the load)"),
        ("--sessions", 100, "live sessions running steps at once, their streams open"),
        ("--steps", 20, "`$` steps each live session runs, each printing a line"),
    ):
        load.add_argument(
            option, type=positive, default=default, metavar="N", help=f"{what} (default: {default})"
        )
    load.add_argument(
        "--rate",
        type=float,
        default=10.0,
        metavar="PER_S",
        help="staggered sessions a second (default: 10)",
    )

    # Evaluations: how well the agent does real tasks with the configured models.
    summary = "evaluate the agent with the configured LLM providers"
    evaluation = commands.add_parser("eval", help=summary, description=summary)
    evals = evaluation.add_subparsers(dest="eval", metavar="SUITE", required=True)
    summary = "the agent's task suite, graded in its sandboxes (calls real models)"
    agent = evals.add_parser("agent", help=summary, description=summary)
    agent.set_defaults(handler=eval_agent)
    agent.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help=f"where to write the results as JSON (default: {BENCH_OUT}/eval-agent.json)",
    )
    agent.add_argument(
        "--task", action="append", metavar="NAME", help="run only this task (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Every process of Berth starts here (the supervisor starts the others through this
    # command line, and Temporal beside them): what they make, databases, disks, artifacts,
    # logs, is their user's alone, and their children inherit the mask.
    os.umask(PRIVATE_UMASK)
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)

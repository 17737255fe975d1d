"""The worker process: Temporal workers for sessions and for this sandbox host, and the
guest gateway that this host's sandboxes dial into.

Two task queues: ``berth-sessions`` (workflows, planning, progress) can be served by any
worker; ``berth-host-<id>`` only by the host whose gateway holds the sandboxes' links.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from temporalio.worker import Worker

from activities.planning import PlanningActivities, chat_model
from activities.progress import ProgressActivities
from activities.sandbox import SandboxActivities
from berth.settings import Settings, get_settings
from berth.temporal import connect
from sandboxes.factory import make_provider
from sandboxes.gateway import GuestGateway
from store.db import get_engine, migrate
from workflows.session import SessionWorkflow

log = logging.getLogger("berth.worker")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    migrate(settings.db_url)
    engine = get_engine(settings.db_url)
    client = await connect(settings)
    gateway = GuestGateway(settings.signing_key())
    provider = make_provider(settings, gateway)
    await provider.prepare()
    await gateway.start(settings.gateway_host, settings.gateway_port)
    progress = ProgressActivities(engine)
    planning = PlanningActivities(chat_model(settings))
    sandbox = SandboxActivities(provider, engine, settings.sandbox_connect_timeout_s)
    with ThreadPoolExecutor(max_workers=16) as executor:
        sessions = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[SessionWorkflow],
            activities=[progress.record, planning.plan],
            activity_executor=executor,
        )
        host = Worker(
            client,
            task_queue=settings.host_task_queue,
            activities=[sandbox.provision, sandbox.run_step, sandbox.destroy],
        )
        async with sessions, host:
            log.info(
                "worker up: queues %s and %s, guest gateway on %s:%d",
                settings.task_queue, settings.host_task_queue,
                settings.gateway_host, settings.gateway_port,
            )  # fmt: skip
            await stop.wait()
            log.info("worker stopping")
    await gateway.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(get_settings(), stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()

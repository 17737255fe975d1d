"""The host registry as placement reads it (workflows/placement.py): each host's row with
``lost`` applied, and the memory a template's sandbox needs. The API reads it once per new
session; a session whose host is lost reads it through the ``ReadFleet`` activity, on the
queue every worker polls (FLEET_TASK_QUEUE), so no one host has to be up to answer."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine
from sqlmodel import Session
from temporalio import activity

import vm_templates
from activities.models import Candidate, Fleet
from store import hosts
from store.models import utcnow


def fleet(db: Session, template: str, lost_after_s: float) -> Fleet:
    now = utcnow()
    return Fleet(
        hosts=[
            Candidate(
                id=row.id,
                state=hosts.seen_state(row, lost_after_s, now),
                templates=tuple(row.templates),
                vcpus=row.vcpus,
                memory_available_mb=row.memory_available_mb,
                load1=row.load1,
                machines=row.machines,
                max_machines=row.max_machines,
                warm=row.warm,
                task_queue=row.task_queue,
            )
            for row in hosts.listing(db)
        ],
        memory_mb=vm_templates.spec(template).machine.memory_mb,
    )


class FleetActivities:
    def __init__(self, engine: Engine, lost_after_s: float) -> None:
        self.engine = engine
        self.lost_after_s = lost_after_s

    def _read(self, template: str) -> Fleet:
        with Session(self.engine) as db:
            return fleet(db, template, self.lost_after_s)

    @activity.defn(name="ReadFleet")
    async def read(self, template: str) -> Fleet:
        return await asyncio.to_thread(self._read, template)

"""A SessionWorkflow changed without ``workflow.patched``, registered under the same name:
what a careless edit deploys. Its sessions start a timer before provisioning, which no
running session's history has; replaying those histories against it must fail."""

from __future__ import annotations

from typing import Any

from temporalio import workflow

from workflows.models import SessionInput
from workflows.session import SessionWorkflow


@workflow.defn(name="SessionWorkflow")
class UnpatchedSession(SessionWorkflow):
    async def provision(self) -> None:
        await workflow.sleep(1)
        await super().provision()

    @workflow.run
    async def run(self, params: SessionInput) -> Any:
        return await super().run(params)

"""The dashboard's checkpoint actions on the session page: checkpoint now, roll back to a
checkpoint, fork from one (each answered with a note in the page; the timeline shows the
rest as the session's events come)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form
from fastapi.responses import HTMLResponse, Response
from markupsafe import escape

from api import checkpoints, service
from api.deps import DbDep, IpDep, SettingsDep, TemporalDep
from ui.render import PageUser, dashboard_router
from workflows.models import CheckpointAsk

router = dashboard_router()


@router.post("/ui/sessions/{sid}/checkpoints", response_class=HTMLResponse)
async def checkpoint_now(
    sid: str,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: PageUser,
    label: Annotated[str, Form(max_length=200)] = "",
    memory: Annotated[bool, Form()] = False,
) -> Response:
    row = service.own_session(db, user, sid)
    ask = CheckpointAsk(memory=memory, label=label.strip() or None)
    taken = await checkpoints.create(db, temporal, settings, user, row, ask)
    note = f" ({escape(taken.note)})" if taken.note else ""
    return HTMLResponse(f'<span class="ok">Checkpoint {taken.id[:8]} taken{note}.</span>')


@router.post("/ui/sessions/{sid}/checkpoints/{cid}/rollback", response_class=HTMLResponse)
async def roll_back(
    sid: str, cid: str, db: DbDep, temporal: TemporalDep, user: PageUser
) -> Response:
    row = service.own_session(db, user, sid)
    ref = await checkpoints.rollback(db, temporal, row, cid)
    return HTMLResponse(
        f'<span class="ok">Rolled back to checkpoint {cid[:8]}: '
        f"{len(ref.rolled_back)} task(s) undone.</span>"
    )


@router.post("/ui/sessions/{sid}/checkpoints/{cid}/fork", response_class=HTMLResponse)
async def fork(
    sid: str,
    cid: str,
    db: DbDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    user: PageUser,
    ip: IpDep,
    count: Annotated[int, Form(ge=1)] = 1,
) -> Response:
    row = service.own_session(db, user, sid)
    forks = await checkpoints.fork(db, temporal, settings, user, row, cid, count, ip)
    links = ", ".join(f'<a href="/sessions/{f.id}">{f.id[:8]}</a>' for f in forks)
    return HTMLResponse(f'<span class="ok">Forked: {links}.</span>')

"""The session page with checkpoints (issue 19): a checkpoint's line offers "roll back to here"
and "fork from here", a live session "checkpoint now", the tasks a rollback undid are struck
through, a fork links its parent and shows the parent's history up to the checkpoint as
inherited; and the log's projection of those events (the checkpoint's row, rolled-back tasks)."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, select

from store import events
from store.events import EventType
from store.models import CheckpointRow, SessionRow, SessionStatus, TaskRow, User
from tests.ui.test_dashboard import EMAIL, app_for, log_in

SANDBOX = {"id": "s1", "session_id": "x", "provider": "docker", "host_id": "h",
           "task_queue": "berth-host-h", "template": "default", "handle": "c1"}  # fmt: skip


def test_checkpoints_rollback_and_forks_on_the_session_page(tmp_path: Path) -> None:
    with app_for(tmp_path) as client:
        log_in(client)
        with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
            user = db.exec(select(User).where(User.email == EMAIL)).one()
            parent = SessionRow(user_id=user.id, status=SessionStatus.ready)
            db.add(parent)
            db.commit()
            sid = parent.id
            for tid, prompt in (("t1", "$ echo kept"), ("t2", "$ rm -rf everything")):
                events.record(db, sid, EventType.task_queued, {"task_id": tid, "prompt": prompt})
                done = {"task_id": tid, "status": "succeeded"}
                events.record(db, sid, EventType.task_status, done)
                if tid == "t1":
                    created = events.record(
                        db, sid, EventType.checkpoint_created,
                        {"checkpoint_id": "c" * 32, "label": "clean", "memory": False,
                         "size_bytes": 4096, "sandbox": SANDBOX, "state": {"running": None}},
                    )  # fmt: skip
            undone = {"checkpoint_id": "c" * 32, "tasks": ["t2"]}
            events.record(db, sid, EventType.session_rolled_back, undone)
            assert created is not None
            fork = SessionRow(
                user_id=user.id,
                status=SessionStatus.ready,
                parent_id=sid,
                parent_checkpoint_id="c" * 32,
            )
            db.add(fork)
            db.commit()
            fid = fork.id
            forked = {"parent_id": sid, "checkpoint_id": "c" * 32, "seq": created.seq}
            events.record(db, fid, EventType.session_forked_from, forked)
            # The projection: the checkpoint's row (counted in the user's kept bytes), and
            # the task undone marked so.
            row = db.get(CheckpointRow, "c" * 32)
            assert row is not None and row.size_bytes == 4096 and row.seq == created.seq
            assert row.user_id == user.id and row.label == "clean"
            rolled = {t.id: t.rolled_back for t in db.exec(select(TaskRow))}
            assert rolled == {"t1": False, "t2": True}

        page = client.get(f"/sessions/{sid}").text
        assert "Checkpoint now" in page
        assert f"/ui/sessions/{sid}/checkpoints/{'c' * 32}/rollback" in page
        assert "fork from here" in page and "roll back to here" in page
        assert 'class="task rolled-back" id="task-t2"' in page
        assert 'class="task" id="task-t1"' in page
        assert f'<a href="/sessions/{fid}">{fid[:8]}</a>' in page  # its fork

        child = client.get(f"/sessions/{fid}").text
        assert f'Forked from <a href="/sessions/{sid}">' in child
        inherited = child.split('class="log inherited"')[1].split("</ol>")[0]
        # The parent's history up to the checkpoint, without its actions; not what came after.
        assert "“clean” taken" in inherited and "roll back to here" not in inherited
        assert "rolled back" not in inherited and "task t2" not in inherited

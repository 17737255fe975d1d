"""The root worker and supervisor never follow a link they did not make in the folder the
API's user owns (shared/): links and hard links planted there, where that user can write,
never make root write, create or chown a file elsewhere."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlmodel import Session

from berth.privileges import Account, hand_over
from config.settings import Settings
from store.artifacts import ArtifactStore
from store.db import get_engine, migrate
from store.nofollow import Planted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root's file handling needs root")


@dataclass
class Victim:
    """What the API's user must not reach through root: a file and a folder of root's."""

    file: Path
    folder: Path

    def untouched(self) -> None:
        assert self.file.read_text() == "root's own\n"
        for path in (self.file, self.folder):
            found = path.stat()
            assert (found.st_uid, found.st_gid) == (0, 0), path
        assert [p.name for p in self.folder.iterdir()] == ["keep"]


@pytest.fixture
def account(monkeypatch: pytest.MonkeyPatch) -> Account:
    # This host's Python may be in root's home, where nobody cannot reach: what is checked
    # here is the data dir, not whether the API could start.
    monkeypatch.setattr("berth.privileges.interpreter", lambda: ())
    entry = pwd.getpwnam("nobody")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder the account can pass through (pytest's own are root's, mode 0700)."""
    made = Path(tempfile.mkdtemp(prefix="berth-nofollow-"))
    made.chmod(0o711)
    yield made
    shutil.rmtree(made)


@pytest.fixture
def victim(base: Path) -> Iterator[Victim]:
    root_only = base / "root-only"
    root_only.mkdir(mode=0o700)
    (root_only / "folder").mkdir()
    (root_only / "folder" / "keep").write_text("")
    (root_only / "file").write_text("root's own\n")
    yield Victim(root_only / "file", root_only / "folder")


def settings_for(data: Path) -> Settings:
    return Settings(data_dir=data, user_token_secret="u" * 32, payload_secret="p" * 32)


def test_hand_over_chowns_no_link_and_no_hard_link(
    base: Path, account: Account, victim: Victim
) -> None:
    data = base / "data"
    shared = data / "shared"
    (shared / "artifacts" / "s1").mkdir(parents=True)
    (shared / "artifacts" / "s1" / "a1").write_text("an artifact")
    # Planted by the API's user: links to root's file and folder, a hard link to the file,
    # and a link where root writes the private copy of the TLS key.
    (shared / "to-file").symlink_to(victim.file)
    (shared / "to-folder").symlink_to(victim.folder)
    (shared / "artifacts" / "s2").symlink_to(victim.folder)
    os.link(victim.file, shared / "hard")
    (shared / "api-tls.key").symlink_to(victim.file)
    secrets = base / "tls"
    secrets.mkdir(mode=0o700)  # the account cannot read the key: it gets a copy
    (secrets / "api.key").write_text("the key\n")
    (secrets / "api.crt").write_text("the certificate\n")
    settings = settings_for(data).model_copy(
        update={"tls_cert_file": secrets / "api.crt", "tls_key_file": secrets / "api.key"}
    )
    env = hand_over(settings, account)
    victim.untouched()
    copy = Path(env["BERTH_TLS_KEY_FILE"])
    assert copy == shared / "api-tls.key"
    assert not copy.is_symlink() and copy.read_text() == "the key\n"
    assert copy.stat().st_uid == account.uid
    for given in (shared, shared / "artifacts" / "s1", shared / "artifacts" / "s1" / "a1"):
        assert given.stat().st_uid == account.uid, given


def test_hand_over_refuses_a_linked_artifacts_folder(
    base: Path, account: Account, victim: Victim
) -> None:
    shared = base / "data" / "shared"
    shared.mkdir(parents=True)
    (shared / "artifacts").symlink_to(victim.folder)
    with pytest.raises(Planted, match="artifacts"):
        hand_over(settings_for(base / "data"), account)
    victim.untouched()


def artifact(store: ArtifactStore, db: Session, session_id: str) -> str:
    return store.save(
        db, session_id=session_id, task_id="t", step_index=0, exec_id="e",
        name="shot.jpg", media_type="image/jpeg", data=b"jpeg",
    )  # fmt: skip


def test_the_worker_stores_artifacts_through_no_link(
    tmp_path: Path, account: Account, victim: Victim
) -> None:
    shared = tmp_path / "shared"
    (shared / "artifacts").mkdir(parents=True)
    os.chown(shared / "artifacts", account.uid, account.gid)  # the API's, as handed over
    url = f"sqlite:///{tmp_path / 'berth.db'}"
    migrate(url)
    engine = get_engine(url)
    store = ArtifactStore(shared / "artifacts", max_bytes=1024)
    with Session(engine) as db:
        # A session folder swapped for a link to root's folder: nothing written or chowned
        # there.
        (shared / "artifacts" / "s-linked").symlink_to(victim.folder)
        with pytest.raises(Planted):
            artifact(store, db, "s-linked")
        # The artifact's own name a link to root's file: replaced, not written through.
        found = artifact(store, db, "s1")
        target = shared / "artifacts" / "s1" / found
        target.unlink()
        target.symlink_to(victim.file)
        artifact(store, db, "s1")
        assert not target.is_symlink() and target.read_bytes() == b"jpeg"
        assert target.stat().st_uid == account.uid
        assert (shared / "artifacts" / "s1").stat().st_uid == account.uid
    victim.untouched()
    # The store itself a link: refused.
    (shared / "artifacts").rename(shared / "was-artifacts")
    (shared / "artifacts").symlink_to(victim.folder)
    with Session(engine) as db, pytest.raises(Planted):
        artifact(store, db, "s3")
    victim.untouched()


def test_root_opens_no_database_or_journal_through_a_link(tmp_path: Path, victim: Victim) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "berth.db").symlink_to(victim.folder / "created-by-root.db")
    with pytest.raises(Planted):
        get_engine(f"sqlite:///{shared / 'berth.db'}")
    (shared / "berth.db").unlink()
    (shared / "berth.db-wal").symlink_to(victim.file)
    with pytest.raises(Planted):
        get_engine(f"sqlite:///{shared / 'berth.db'}")
    (shared / "berth.db-wal").unlink()
    os.link(victim.file, shared / "other.db")
    with pytest.raises(Planted):
        get_engine(f"sqlite:///{shared / 'other.db'}")
    victim.untouched()

"""Hands on the machine against the whole system (Docker sandboxes), as `make run` starts it:
the workspace's files through the API, as the step user, confined to the workspace; and
every new route closed to another user."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import pytest
import websockets
from berth_client import Berth
from websockets.typing import Origin

from tests.support.local import LocalSystem, python_script

PASSWORD = "correct horse battery"
CAP = 100_000  # BERTH_FILES_MAX_UPLOAD_BYTES here
FETCH = python_script(
    "fetch.py",
    "import urllib.request",
    "print(urllib.request.urlopen('http://127.0.0.1:8123/').read().decode())",
)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"BERTH_FILES_MAX_UPLOAD_BYTES": str(CAP)}
    running = LocalSystem.start(tmp_path_factory.mktemp("berth-hands"), "hands", env)
    for who in ("owner", "other"):
        answer = httpx.post(
            f"{running.base}/api/auth/signup",
            json={"email": f"{who}@example.com", "password": PASSWORD},
        )
        assert answer.status_code == 201
    yield running.base
    assert running.stop() == 0


def client(system: str, who: str) -> Berth:
    berth = Berth(system)
    berth.log_in(f"{who}@example.com", PASSWORD, "tests")
    return berth


@pytest.fixture(scope="module")
def session(system: str) -> Iterator[tuple[Berth, str]]:
    with client(system, "owner") as berth:
        made = berth.sessions.create()
        made.run("$ true").wait(timeout=180, check=True)  # its machine is up
        yield berth, made.id
        made.end()


def test_upload_transform_download(session: tuple[Berth, str]) -> None:
    berth, sid = session
    table = "name,count\nalpha,1\nbeta,2\n"
    entry = berth.upload(sid, "data/in.csv", table.encode())
    assert entry.size == len(table)
    task = berth.sessions.get(sid).run(
        "$ tr a-z A-Z < data/in.csv > data/out.csv\n$ stat -c %U data/in.csv"
    )
    done = task.wait(timeout=120, check=True)
    assert done.result == "berth\n"  # the upload is the step user's
    assert berth.download(sid, "data/out.csv").decode() == table.upper()
    listing = berth.list_files(sid, "data")
    assert [(e.name, e.kind) for e in listing.entries] == [("in.csv", "file"), ("out.csv", "file")]
    with zipfile.ZipFile(io.BytesIO(berth.download(sid, "data"))) as zipped:
        assert sorted(zipped.namelist()) == ["in.csv", "out.csv"]
        assert zipped.read("out.csv").decode() == table.upper()
    berth.delete_file(sid, "data/in.csv")
    assert [e.name for e in berth.list_files(sid, "data").entries] == ["out.csv"]


def test_refusals_say_why(system: str, session: tuple[Berth, str]) -> None:
    berth, sid = session
    headers = {"Authorization": berth.inner.http.headers["Authorization"]}
    base = f"{system}/api/sessions/{sid}/files"
    outside = httpx.get(f"{base}/content", params={"path": "/etc/passwd"}, headers=headers)
    assert outside.status_code == 403
    assert outside.headers["content-type"] == "application/problem+json"
    assert "outside the workspace" in outside.json()["detail"]
    # A symlink in the workspace: followed, it leads outside.
    link = python_script("link.py", "import os", "os.symlink('/etc/hostname', 'out-link')")
    berth.sessions.get(sid).run(f"$ {link}").wait(timeout=120, check=True)
    linked = httpx.get(f"{base}/content", params={"path": "out-link"}, headers=headers)
    assert linked.status_code == 403
    big = httpx.put(f"{base}/content", params={"path": "big.bin"}, content=b"x" * (CAP + 1),
                    headers=headers)  # fmt: skip
    assert big.status_code == 413 and "BERTH_FILES_MAX_UPLOAD_BYTES" in big.json()["detail"]
    missing = httpx.get(base, params={"path": "no/such/folder"}, headers=headers)
    assert missing.status_code == 404
    assert "big.bin" not in [e.name for e in berth.list_files(sid).entries]


def test_services_outlive_their_steps_until_stopped(
    system: str, session: tuple[Berth, str]
) -> None:
    berth, sid = session
    headers = {"Authorization": berth.inner.http.headers["Authorization"]}
    base = f"{system}/api/sessions/{sid}/services"
    task = berth.sessions.get(sid).run(
        "$ service: python3 -u -m http.server --bind 127.0.0.1 8123\n$ service: sleep 600"
    )
    done = task.wait(timeout=120, check=True)
    assert [(step.result or {}).get("content") for step in done.steps] == ["s1", "s2"]
    listed = httpx.get(base, headers=headers).json()
    assert [(v["name"], v["running"]) for v in listed] == [("s1", True), ("s2", True)]
    # Reached from a later step: the server outlived the step that started it.
    fetched = berth.sessions.get(sid).run(f"$ {FETCH}").wait(timeout=120, check=True)
    assert "Directory listing" in (fetched.result or "")
    output = httpx.get(f"{base}/s1/output", headers=headers)
    assert "GET / HTTP" in output.text
    stopped = httpx.post(f"{base}/s1/stop", headers=headers).json()
    assert stopped["running"] is False and stopped["stopped"] is True
    # The agent stops one with a step; a policy-refused command starts nothing.
    berth.sessions.get(sid).run("$ service-stop: s2").wait(timeout=120, check=True)
    refused = berth.sessions.get(sid).run("$ service: sudo sleep 1").wait(timeout=120)
    assert refused.status == "failed"
    listed = httpx.get(base, headers=headers).json()
    assert [(v["name"], v["running"]) for v in listed] == [("s1", False), ("s2", False)]


def test_a_preview_of_a_service_shared_then_revoked(
    system: str, session: tuple[Berth, str]
) -> None:
    berth, sid = session
    secret = berth.inner.http.headers["Authorization"].removeprefix("Bearer ")
    api = {"Authorization": f"Bearer {secret}"}
    berth.sessions.get(sid).run("$ service: python3 -m http.server 8124").wait(
        timeout=120, check=True
    )
    listed = httpx.get(f"{system}/api/sessions/{sid}/previews", headers=api).json()
    assert 8124 in listed["ports"]
    # Nobody gets in without the owner's login or a share link.
    assert httpx.get(f"{system}/preview/{sid}/8124/").status_code == 303  # to the login page
    with httpx.Client(base_url=system, cookies={"berth_token": secret}) as owner:
        entered = owner.get(f"/preview/{sid}/8124/")
        assert entered.status_code == 303
        page = owner.get(entered.headers["location"])
    assert page.status_code == 200 and "Directory listing" in page.text
    assert page.headers["content-security-policy"].startswith("sandbox")
    assert "set-cookie" not in page.headers
    made = httpx.post(f"{system}/api/sessions/{sid}/previews/8124/shares", headers=api)
    assert made.status_code == 201
    url = system + made.json()["url"]
    shared = httpx.get(url)  # no credentials at all: the link is the key
    assert shared.status_code == 200 and "Directory listing" in shared.text
    revoked = httpx.delete(
        f"{system}/api/sessions/{sid}/previews/shares/{made.json()['id']}", headers=api
    )
    assert revoked.status_code == 204
    after = httpx.get(url)
    assert after.status_code == 403 and "revoked" in after.json()["detail"]
    with client(system, "other") as other:
        theirs = other.inner.http.headers["Authorization"].removeprefix("Bearer ")
    with httpx.Client(base_url=system, cookies={"berth_token": theirs}) as stranger:
        assert stranger.get(f"/preview/{sid}/8124/").status_code == 404


async def shell(system: str, sid: str, secret: str, typed: str, until: str, origin: str) -> str:
    """What tab t1 of the session's shell shows, once ``until`` is in it."""
    url = system.replace("http", "ws", 1) + f"/ui/sessions/{sid}/terminal/t1?cols=100&rows=30"
    async with websockets.connect(
        url, additional_headers={"Cookie": f"berth_token={secret}"}, origin=Origin(origin)
    ) as ws:
        if typed:
            await ws.send(json.dumps({"input": typed}))
        seen = ""
        while until not in seen:
            message = await asyncio.wait_for(ws.recv(), 30)
            seen += message if isinstance(message, str) else message.decode(errors="replace")
        return seen


def test_the_shell_keeps_its_output_across_visits(system: str, session: tuple[Berth, str]) -> None:
    berth, sid = session
    secret = berth.inner.http.headers["Authorization"].removeprefix("Bearer ")
    first = asyncio.run(shell(system, sid, secret, "echo hello-$((6*7))\r", "hello-42", system))
    assert "hello-42" in first
    # A new visit (a reload) sees what the shell printed before, and it is the same shell.
    again = asyncio.run(shell(system, sid, secret, "whoami; echo $PPID\r", "berth\r\n", system))
    assert "hello-42" in again
    # Another site's page cannot open it with the user's cookie.
    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(shell(system, sid, secret, "", "x", "http://evil.example"))


def test_another_user_gets_404_on_every_route(system: str, session: tuple[Berth, str]) -> None:
    _owner, sid = session
    with client(system, "other") as other:
        token = other.inner.http.headers["Authorization"]
    base = f"{system}/api/sessions/{sid}"
    headers = {"Authorization": token}
    for method, path in (
        ("GET", "/files"),
        ("GET", "/files/content"),
        ("PUT", "/files/content"),
        ("DELETE", "/files"),
        ("GET", "/services"),
        ("GET", "/services/s1/output"),
        ("POST", "/services/s1/stop"),
        ("GET", "/previews"),
        ("POST", "/previews/8124/shares"),
        ("DELETE", "/previews/shares/x"),
    ):
        answer = httpx.request(method, f"{base}{path}", params={"path": "x"}, headers=headers,
                               content=b"x" if method == "PUT" else None)  # fmt: skip
        assert answer.status_code == 404, (method, path, answer.text)

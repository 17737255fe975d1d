"""Request body limits on every route: a small cap before login, a larger one with a token,
refused as 413 problem documents that say the limit, whether the body declares its length
or streams in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from berth.web import create_app
from config.settings import Settings
from tests.support.local import free_port
from tests.support.world import FAST_PASSWORDS, PASSWORD

ANONYMOUS, AUTHENTICATED = 4096, 65536


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address=f"127.0.0.1:{free_port()}",
        max_body_bytes=AUTHENTICATED,
        max_body_bytes_anonymous=ANONYMOUS,
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


def padded(size: int) -> bytes:
    """A sign-up body of about ``size`` bytes."""
    body = {"email": "ann@example.com", "password": PASSWORD, "pad": "x" * size}
    return json.dumps(body).encode()


def chunks(data: bytes, size: int = 1024) -> Iterator[bytes]:
    """Sent chunked: no Content-Length tells the size."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def assert_refused(answer: object, limit: int) -> None:
    status = getattr(answer, "status_code", None)
    assert status == 413, getattr(answer, "text", "")
    document = answer.json()  # type: ignore[attr-defined]
    assert answer.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    assert f"limit of {limit} bytes" in document["detail"]


def test_a_body_before_login_is_capped_declared_or_streamed(client: TestClient) -> None:
    json_headers = {"Content-Type": "application/json"}
    assert (
        client.post("/api/auth/signup", content=padded(100), headers=json_headers).status_code
        == 201
    )
    declared = client.post("/api/auth/signup", content=padded(ANONYMOUS), headers=json_headers)
    assert_refused(declared, ANONYMOUS)
    streamed = client.post(
        "/api/auth/token", content=chunks(padded(ANONYMOUS)), headers=json_headers
    )
    assert "content-length" not in streamed.request.headers
    assert_refused(streamed, ANONYMOUS)
    form = client.post("/login", content=chunks(b"email=" + b"a" * ANONYMOUS),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert form.status_code == 413
    # A token on an auth route does not raise its cap.
    faked = client.post(
        "/api/auth/signup",
        content=padded(ANONYMOUS),
        headers={**json_headers, "Authorization": "Bearer x"},
    )
    assert_refused(faked, ANONYMOUS)


def test_a_body_with_a_token_has_the_larger_cap(client: TestClient) -> None:
    client.post("/api/auth/signup", json={"email": "ann@example.com", "password": PASSWORD})
    token = client.post(
        "/api/auth/token", json={"email": "ann@example.com", "password": PASSWORD}
    ).json()["token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    over_small = json.dumps({"messages": [{"role": "user", "content": "x" * ANONYMOUS}]})
    # Past the cap before login, not this one: no provider is configured, so 503.
    answer = client.post("/v1/chat/completions", content=over_small, headers=headers)
    assert answer.status_code == 503, answer.text
    over = json.dumps({"messages": [{"role": "user", "content": "x" * AUTHENTICATED}]}).encode()
    assert_refused(
        client.post("/v1/chat/completions", content=over, headers=headers), AUTHENTICATED
    )
    streamed = client.post("/v1/chat/completions", content=chunks(over), headers=headers)
    assert_refused(streamed, AUTHENTICATED)
    # Without a token, every route has the small cap.
    anonymous = client.post(
        "/v1/chat/completions", content=over_small, headers={"Content-Type": "application/json"}
    )
    assert_refused(anonymous, ANONYMOUS)

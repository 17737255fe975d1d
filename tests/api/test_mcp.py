"""The API's /mcp: refused without a live bearer token (the API's 401 problem), and with
one it speaks MCP (stateless streamable HTTP) and lists Berth's tools. Calling them needs
the whole system: tests/client/test_system.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from berth_client import calls
from fastapi.testclient import TestClient
from starlette.requests import Request

from api.mcp import own_address
from berth.web import create_app
from tests.api.test_accounts import bearer, log_in, settings_for, sign_up

MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path))) as client:
        yield client


def rpc(method: str, params: dict[str, Any], n: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": n, "method": method, "params": params}


def answer(text: str) -> dict[str, Any]:
    """The JSON-RPC answer in a response (JSON, or the data of an SSE message)."""
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    found: dict[str, Any] = json.loads(data[-1] if data else text)
    return found


def test_mcp_needs_a_live_bearer_token(client: TestClient) -> None:
    hello = rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                               "clientInfo": {"name": "t", "version": "1"}})  # fmt: skip
    for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic eDp5"}):
        refused = client.post("/mcp", json=hello, headers={**MCP_HEADERS, **headers})
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    sign_up(client, "mcp@example.com")
    token = log_in(client, "mcp@example.com").json()["token"]
    headers = {**MCP_HEADERS, **bearer(token)}
    opened = client.post("/mcp", json=hello, headers=headers)
    assert opened.status_code == 200, opened.text
    assert answer(opened.text)["result"]["serverInfo"]["name"] == "berth"
    listed = client.post("/mcp", json=rpc("tools/list", {}, 2), headers=headers)
    tools = {tool["name"] for tool in answer(listed.text)["result"]["tools"]}
    assert {"create_session", "run_command", "screenshot", "end_session"} <= tools
    # Not in the API's OpenAPI document: it is not a JSON API route.
    assert "/mcp" not in client.get("/openapi.json").json()["paths"]


def test_the_tools_call_back_this_process_whatever_the_host_header_says(tmp_path: Path) -> None:
    # Security review: the callback went to the caller's Host header with the caller's
    # token, so /mcp could send requests to any host and port.
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "headers": [(b"host", b"127.0.0.1:9")],
        "server": ("127.0.0.1", 8123),
        "scheme": "http",
    }
    settings = settings_for(tmp_path)
    assert own_address(Request(scope), settings) == "http://127.0.0.1:8123"
    tls = settings.model_copy(update={"tls_cert_file": tmp_path / "c.pem"})
    assert own_address(Request({**scope, "server": ("::1", 443)}), tls) == "https://[::1]:443"


def test_ids_from_an_agent_stay_one_path_segment() -> None:
    assert calls.end_session("../../internal/x?a=1", False).path == (
        "/api/sessions/..%2F..%2Finternal%2Fx%3Fa%3D1"
    )
    assert calls.control_task("s", "../t", "cancel").path == "/api/sessions/s/tasks/..%2Ft/cancel"

"""Who may scrape /metrics: the bearer of BERTH_METRICS_TOKEN when it is set, else only a
caller on the loopback address."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from api.metrics import may_scrape
from config.settings import Settings


def request(client: str, authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "client": (client, 40000), "headers": headers})


@pytest.mark.parametrize(
    ("client", "allowed"), [("127.0.0.1", True), ("::1", True), ("10.0.0.5", False), ("x", False)]
)
def test_without_a_token_only_loopback_may_scrape(client: str, allowed: bool) -> None:
    assert may_scrape(request(client), Settings()) is allowed


def test_with_a_token_only_its_bearer_may_scrape_even_from_loopback() -> None:
    settings = Settings(metrics_token="s3cret")
    assert may_scrape(request("10.0.0.5", "Bearer s3cret"), settings)
    assert not may_scrape(request("127.0.0.1"), settings)
    assert not may_scrape(request("127.0.0.1", "Bearer wrong"), settings)
    assert not may_scrape(request("127.0.0.1", "Basic s3cret"), settings)

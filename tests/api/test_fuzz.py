"""Fuzzing the JSON API from its own OpenAPI schema (schemathesis): valid and invalid
requests to every operation, in process against the real app, a real SQLite database and a
real Temporal dev server. No answer may be a 5xx, and every 4xx must be a problem document
(RFC 9457). At least MIN_CASES requests are made."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python import asgi

from berth.web import create_app
from config.settings import LLMProvider, Settings
from store.db import migrate
from tests.support.scripted_llm import ScriptedLLM
from tests.support.world import FAST_PASSWORDS, World, bearer, build

MIN_CASES = 1000
EXAMPLES_PER_OPERATION = 40  # per mode; simple operations run out of distinct cases sooner


@dataclass
class Target:
    app: FastAPI
    settings: Settings
    world: World
    calls: int = 0

    def headers(self) -> dict[str, str]:
        """A fresh admin token per case: a fuzzed logout revokes only its own."""
        engine = self.app.state.engine
        return {"Authorization": f"Bearer {bearer(engine, self.settings, self.world.admin)}"}


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedLLM]:
    """The one LLM provider: /v1/chat/completions answers from it, not with a 503."""
    with ScriptedLLM(default="fuzzed") as server:
        yield server


@pytest.fixture(scope="module")
def target(
    temporal_address: str, tmp_path_factory: pytest.TempPathFactory, model: ScriptedLLM
) -> Iterator[Target]:
    config = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        temporal_address=temporal_address,
        llm_providers=[LLMProvider(name="scripted", model="m", base_url=f"{model.url}/v1")],
        **FAST_PASSWORDS,
    )
    app = create_app(config)
    migrate(config.db_url)  # schemathesis starts the app (its lifespan) on its first call
    yield Target(app, config, build(app.state.engine))
    asgi.shutdown_lifespans()


def operations(app: FastAPI) -> dict[str, Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    found: dict[str, Any] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the schema is invalid: {result.err()}"
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def cases() -> list[tuple[str, GenerationMode]]:
    """Valid requests to every operation, invalid ones to those that take input. Collected
    from an app of its own; each test fuzzes the module's live app."""
    found = operations(create_app(Settings(data_dir=Path(tempfile.mkdtemp()))))
    return [
        (label, mode)
        for label, operation in sorted(found.items())
        for mode in GenerationMode
        if mode == GenerationMode.POSITIVE
        or any(operation.iter_parameters())
        or operation.get_request_payload_content_types()
    ]


@pytest.fixture(scope="module")
def live(target: Target) -> dict[str, Any]:
    return operations(target.app)


@schemathesis.check
def problem_documents(ctx: Any, response: Any, case: Any) -> None:
    """Every 4xx is an RFC 9457 problem document with the answer's own status."""
    if not 400 <= response.status_code < 500:
        return
    content_type = response.headers.get("content-type", [""])
    assert "application/problem+json" in content_type, (response.status_code, content_type)
    body = response.json()
    assert body["status"] == response.status_code and body["type"] == "about:blank", body
    assert isinstance(body["title"], str) and isinstance(body["detail"], str), body


@pytest.mark.parametrize(("label", "mode"), cases(), ids=lambda x: getattr(x, "value", x))
def test_no_server_error_and_problem_documents(
    label: str, mode: GenerationMode, live: dict[str, Any], target: Target
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=live[label].as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        response = case.call(headers=target.headers())
        target.calls += 1
        case.validate_response(response, checks=[not_a_server_error, problem_documents])

    fuzz()


def test_enough_cases_were_tried(target: Target) -> None:
    assert target.calls >= MIN_CASES, f"only {target.calls} cases"

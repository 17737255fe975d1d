"""Each chaos module has a whole system of its own (``spine``), started with the module's
``SYSTEM_ENV`` (a module whose system needs more, a database or a model server of the
test's own, overrides ``spine``), and each test a user of its own whose sessions are ended
after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.chaos.harness import system
from tests.e2e.test_spine import Spine, User, user_of


@pytest.fixture(scope="module")
def spine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Spine]:
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    env: dict[str, str] = getattr(request.module, "SYSTEM_ENV", {})
    yield from system(tmp_path_factory.mktemp(f"berth-chaos-{name}"), f"chaos{name}", env)


@pytest.fixture
def user(spine: Spine, request: pytest.FixtureRequest) -> Iterator[User]:
    yield from user_of(spine, request.node.name)

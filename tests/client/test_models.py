"""The client's models against the server's OpenAPI schema: a field added, removed, retyped
or made optional on one side and not the other fails here (constraints and descriptions are
the server's to check, so they are left out of the comparison)."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from berth_client import models
from pydantic import BaseModel

from berth.web import create_app
from config.settings import Settings

# The API's components the client reads or sends, by the client's model of each.
SHARED: list[type[BaseModel]] = [
    models.SessionCreate,
    models.SessionOut,
    models.TaskCreate,
    models.Modification,
    models.TaskRefOut,
    models.StepOut,
    models.FileEntry,
    models.FileListing,
    models.TaskOut,
    models.UsageTotals,
    models.SessionUsage,
    models.TaskUsage,
    models.UserUsage,
    models.TokenRequest,
    models.TokenOut,
    models.FieldError,
    models.LimitOut,
    models.Problem,
]
# What the comparison keeps of a schema: its shape, not its limits or its words.
KEPT = {"type", "properties", "required", "items", "anyOf", "enum", "format", "$ref",
        "additionalProperties"}  # fmt: skip


def shape(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with references resolved to their (shaped) targets' names or enums."""
    if isinstance(schema, list):
        return [shape(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        return {"enum": sorted(target["enum"])} if "enum" in target else {"model": name}
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return shape(schema["allOf"][0], defs)
    kept = {key: shape(value, defs) for key, value in schema.items() if key in KEPT}
    if "properties" in schema:
        kept["properties"] = {
            name: shape(value, defs) for name, value in schema["properties"].items()
        }
    if "required" in kept:
        kept["required"] = sorted(kept["required"])
    if "enum" in kept:
        kept["enum"] = sorted(kept["enum"])
    return kept


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("openapi")
    app = create_app(Settings(data_dir=data))
    components: dict[str, Any] = app.openapi()["components"]["schemas"]
    return components


@pytest.mark.parametrize("model", SHARED, ids=lambda model: model.__name__)
def test_a_client_model_matches_the_servers_schema(
    model: type[BaseModel], server: dict[str, Any]
) -> None:
    sent = model in (models.SessionCreate, models.TaskCreate, models.Modification,
                     models.TokenRequest)  # fmt: skip
    mode: Literal["validation", "serialization"] = "validation" if sent else "serialization"
    ours = model.model_json_schema(mode=mode, ref_template="#/components/schemas/{model}")
    defs = ours.pop("$defs", {})
    name = "Problem" if model is models.Problem else model.__name__
    assert name in server, f"the server has no component {name} any more"
    theirs = server[name]
    assert shape(ours, defs) == shape(theirs, server), f"{name} drifted from the server's"


def test_the_comparison_sees_a_drift(server: dict[str, Any]) -> None:
    """The check itself: a model that lacks one of the server's fields is caught."""

    class SessionOut(BaseModel):
        id: str

    ours = SessionOut.model_json_schema(mode="serialization")
    assert shape(ours, {}) != shape(server["SessionOut"], server)

"""The preferences page: what the user's new sessions start with."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

import vm_templates
from api import preferences
from api.deps import DbDep, IpDep, Problem, SettingsDep
from api.schemas import Preferences
from config.settings import Settings
from llm.providers import provider_configs
from ui.fragments import field_errors, render_block
from ui.render import PageCaller, dashboard_router, render_page
from ui.webhooks import listing

router = dashboard_router()
PAGE = "preferences.html"
FIELDS = ("template", "model", "hibernate_after_s", "idle_timeout_s")


def _context(settings: Settings) -> dict[str, Any]:
    """What the form offers, and the defaults an empty field stands for."""
    return {
        "templates": vm_templates.names(),
        "providers": provider_configs(settings),
        "default_template": vm_templates.DEFAULT,
        "default_hibernate": settings.session_hibernate_after_s,
        "default_idle": settings.session_idle_timeout_s,
    }


def _saved_values(row: Preferences) -> dict[str, str]:
    return {name: "" if value is None else str(value) for name, value in row.model_dump().items()}


@router.get("/preferences", response_class=HTMLResponse)
def preferences_page(
    request: Request, db: DbDep, settings: SettingsDep, caller: PageCaller
) -> Response:
    row = Preferences.model_validate(preferences.load(db, caller[0]), from_attributes=True)
    values = _saved_values(row)
    return render_page(
        request, PAGE, settings, caller, values=values, **_context(settings),
        **listing(db, caller),
    )  # fmt: skip


@router.post("/ui/preferences", response_class=HTMLResponse)
def save_preferences(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    caller: PageCaller,
    ip: IpDep,
    template: Annotated[str, Form(max_length=64)] = "",
    model: Annotated[str, Form(max_length=200)] = "",
    hibernate_after_s: Annotated[str, Form(max_length=20)] = "",
    idle_timeout_s: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Saves the form; a refused one comes back as typed, each error by its field."""
    typed = dict(zip(FIELDS, (template, model, hibernate_after_s, idle_timeout_s), strict=True))
    errors: dict[str, str] = {}
    try:
        wanted = Preferences.model_validate({k: v.strip() or None for k, v in typed.items()})
        preferences.save(db, settings, caller[0], wanted, ip)
        typed = _saved_values(wanted)
    except ValidationError as exc:
        errors = field_errors(exc)
    except Problem as exc:
        if exc.status != 422:
            raise
        errors = {str(e["loc"][-1]): e["msg"] for e in exc.errors or []}
    status = 422 if errors else 200
    return render_block(
        request, PAGE, "form", settings, caller, status,
        values=typed, errors=errors, saved=not errors, **_context(settings),
    )  # fmt: skip

"""One template for a page and its htmx fragments: an action answers with one block of the
page's template, rendered with the same context the whole page gets."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from config.settings import Settings
from store.models import ApiToken, User
from ui import guard
from ui.render import templates


def render_block(
    request: Request,
    name: str,
    block: str,
    settings: Settings,
    caller: tuple[User, ApiToken],
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    template = templates.get_template(name)
    context.update(request=request, user=caller[0], csrf=guard.token_for(settings, caller[1].id))
    html = "".join(template.blocks[block](template.new_context(context)))
    return HTMLResponse(html, status)


def field_errors(exc: ValidationError) -> dict[str, str]:
    """A form's errors by field, in words a person reads next to the field."""
    found: dict[str, str] = {}
    for error in exc.errors():
        context = error.get("ctx", {})
        if error["type"] == "greater_than_equal":
            message = f"at least {context['ge']}"
        elif error["type"] == "less_than_equal":
            message = f"at most {context['le']}"
        elif error["type"] == "string_too_short":
            message = "needed" if context["min_length"] == 1 else error["msg"]
        elif error["type"] == "string_too_long":
            message = f"at most {context['max_length']} characters"
        elif error["type"] == "int_parsing":
            message = "a whole number"
        else:
            message = error["msg"]
        found.setdefault(str(error["loc"][-1]), message)
    return found

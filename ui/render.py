"""How the dashboard renders: the template environment and its filters, the signed-in
caller of a page (cookie and CSRF token), pages and error pages, and the route class that
marks a route as the dashboard's.

Every dashboard router is made by ``dashboard_router``: its routes are ``DashboardRoute``s,
so whether an error is answered as a page or as a problem document follows from the route
that was matched, and a new page cannot be forgotten in a list of paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import TypeAdapter, ValidationError

from api.deps import DbDep, Problem, SettingsDep, cookie_caller
from config.settings import Settings
from sandboxes.models import Step
from store.models import ApiToken, User
from ui import ansi, guard, state

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"

templates = Jinja2Templates(directory=HERE / "templates")
STEP = TypeAdapter(Step)


def step_text(spec: dict[str, Any]) -> str:
    """A step as a line of the plan (steps in events and rows are plain JSON)."""
    try:
        return STEP.validate_python(spec).describe()
    except ValidationError:
        return str(spec.get("kind", "step"))


def step_check(spec: dict[str, Any]) -> str:
    """A step's success criterion, in words."""
    try:
        check = STEP.validate_python(spec).check
    except ValidationError:
        return ""
    return check.describe() if check else ""


templates.env.filters.update(
    step_text=step_text,
    step_check=step_check,
    ansi=ansi.to_html,
    age=state.age,
    duration=state.duration,
)


class DashboardRoute(APIRoute):
    """A route of the dashboard: its errors are answered as HTML, not as problem documents."""


def dashboard_router() -> APIRouter:
    """A router of dashboard pages. Every unsafe request to the dashboard must come from its
    own pages."""
    return APIRouter(
        include_in_schema=False,
        route_class=DashboardRoute,
        dependencies=[Depends(guard.check_origin)],
    )


def is_dashboard(request: Request) -> bool:
    """Whether the request went to the dashboard (HTML) rather than to an API. A path that
    matched no route is the dashboard's when its first segment is one of a dashboard route's
    (``/sessions/...``, ``/ui/...``): a mistyped page link gets an error page."""
    route = request.scope.get("route")
    if route is not None:
        return isinstance(route, DashboardRoute)
    return _first_segment(request.url.path) in dashboard_segments(request.app.routes)


def dashboard_segments(routes: list[Any]) -> set[str]:
    """The first path segments of the dashboard's routes among ``routes`` (the root's
    excepted: every path is under it)."""
    found = set()
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, DashboardRoute) and context.path:
            found.add(_first_segment(context.path))
    return found - {""}


def _first_segment(path: str) -> str:
    return path.lstrip("/").split("/", 1)[0]


async def page_caller(request: Request, db: DbDep, settings: SettingsDep) -> tuple[User, ApiToken]:
    """The signed-in user; for an unsafe method, also a CSRF token bound to their login."""
    found = cookie_caller(request, db, settings)
    if found is None:
        raise Problem(401, "log in first")
    await guard.check_token(request, settings, found[1].id)
    return found


def page_user(caller: Annotated[tuple[User, ApiToken], Depends(page_caller)]) -> User:
    return caller[0]


PageCaller = Annotated[tuple[User, ApiToken], Depends(page_caller)]
PageUser = Annotated[User, Depends(page_user)]


def render_page(
    request: Request,
    name: str,
    settings: Settings,
    caller: tuple[User, ApiToken] | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page; a signed-in one carries the CSRF token that htmx sends with each action."""
    if caller is not None:
        context.update(user=caller[0], csrf=guard.token_for(settings, caller[1].id))
    return templates.TemplateResponse(request, name, context, status)


def problem_page(request: Request, problem: Problem) -> Response:
    """A dashboard error: htmx gets a fragment with the real status (its responseHandling
    config in base.html swaps it in), a page load an error page; a lost login goes to the
    login page (for htmx through HX-Redirect, which it follows instead of swapping a 303)."""
    htmx = request.headers.get("hx-request") == "true"
    if problem.status == 401:
        if htmx:
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)
    if htmx:
        fragment = f'<p class="error">{escape(problem.detail)}</p>'
        return HTMLResponse(fragment, problem.status, headers=problem.headers)
    context = {"request": request, "problem": problem}
    return templates.TemplateResponse(request, "error.html", context, problem.status)

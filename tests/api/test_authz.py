"""The authorization matrix, generated from the app's route table: every route (method and
path) must have a rule below saying what each kind of caller gets, and each rule is checked
against the running app with a real database and a real Temporal dev server. A new route
without a rule fails the suite: add one line to RULES.

Callers: ``owner`` owns the world's session (and the token a path names), ``other`` is a user
who does not, ``admin`` an admin who does not (admins may read every session, not change
it), ``anonymous`` has no token. JSON API calls carry a bearer token; dashboard calls the
login cookie, the page's CSRF token and the page's Origin, as a browser would.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api import accounts
from api.deps import COOKIE
from berth.web import create_app
from config.keys import payload_keys, seal
from config.settings import Settings
from store.artifacts import ArtifactStore
from store.models import WebhookEndpoint
from tests.support.world import FAST_PASSWORDS, PASSWORD, World, build
from ui import guard
from ui.render import DashboardRoute

CALLERS = ("owner", "other", "anonymous", "admin")
CREDENTIALS = {"email": "owner@example.com", "password": PASSWORD}
PROMPT = {"prompt": "$ true"}
CHANGE = {"instruction": "also say hello"}
HOOK_URL = "https://93.184.216.34/berth"
HOOK = {"url": HOOK_URL, "events": ["task.finished"]}


@dataclass(frozen=True)
class Rule:
    owner: int
    other: int
    anonymous: int
    admin: int
    json: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=dict)
    query: str = ""

    def status(self, caller: str) -> int:
        return int(getattr(self, caller))


R = Rule
# fmt: off
RULES: dict[tuple[str, str], Rule] = {
    # Public.
    ("GET", "/healthz"): R(200, 200, 200, 200),
    # The scraper's token (BERTH_METRICS_TOKEN) or a loopback caller, never a user's token.
    ("GET", "/metrics"): R(401, 401, 401, 401),
    ("GET", "/openapi.json"): R(200, 200, 200, 200),
    ("GET", "/docs"): R(200, 200, 200, 200),
    ("GET", "/docs/oauth2-redirect"): R(200, 200, 200, 200),
    ("GET", "/redoc"): R(200, 200, 200, 200),
    ("POST", "/api/auth/signup"): R(201, 201, 201, 201, json={"email": "new@example.com", "password": PASSWORD}),  # noqa: E501
    ("POST", "/api/auth/token"): R(200, 200, 200, 200, json=CREDENTIALS),
    # The caller's own tokens.
    ("GET", "/api/tokens"): R(200, 200, 401, 200),
    ("POST", "/api/tokens"): R(201, 201, 401, 201, json={"name": "script"}),
    ("DELETE", "/api/tokens/{token_id}"): R(204, 404, 401, 404),
    ("POST", "/api/auth/logout"): R(204, 204, 401, 204),
    # A wrong current password is refused (the world's users all share one password).
    ("POST", "/api/auth/password"): R(403, 403, 401, 403, json={"current": "not it", "new": PASSWORD}),  # noqa: E501
    # Sessions: the owner's; admins read them all.
    ("GET", "/api/sessions"): R(200, 200, 401, 200),
    ("POST", "/api/sessions"): R(201, 201, 401, 201, json={}),
    ("GET", "/api/sessions/{sid}"): R(200, 404, 401, 200),
    ("DELETE", "/api/sessions/{sid}"): R(202, 404, 401, 404),
    ("POST", "/api/sessions/{sid}/resume"): R(409, 404, 401, 404),  # ended, nothing kept
    ("GET", "/api/sessions/{sid}/events"): R(200, 404, 401, 200),
    ("GET", "/api/sessions/{sid}/tasks"): R(200, 404, 401, 200),
    ("POST", "/api/sessions/{sid}/tasks"): R(409, 404, 401, 404, json=PROMPT),  # it has ended
    ("GET", "/api/sessions/{sid}/tasks/{tid}"): R(200, 404, 401, 200),
    ("POST", "/api/sessions/{sid}/tasks/{tid}/{action}"): R(409, 404, 401, 404),
    ("GET", "/api/sessions/{sid}/artifacts/{artifact_id}"): R(200, 404, 401, 200),
    ("GET", "/api/sessions/{sid}/checkpoints"): R(200, 404, 401, 200),
    ("POST", "/api/sessions/{sid}/checkpoints"): R(409, 404, 401, 404, json={}),  # it has ended
    # The world's session has no checkpoints: the owner is told so too.
    ("DELETE", "/api/sessions/{sid}/checkpoints/{cid}"): R(404, 404, 401, 404),
    ("POST", "/api/sessions/{sid}/checkpoints/{cid}/rollback"): R(404, 404, 401, 404),
    ("POST", "/api/sessions/{sid}/checkpoints/{cid}/fork"): R(404, 404, 401, 404, json={}),
    # Hands on the machine: its owner's only (409: the world's session has no machine now).
    ("GET", "/api/sessions/{sid}/files"): R(409, 404, 401, 404),
    ("GET", "/api/sessions/{sid}/files/content"): R(409, 404, 401, 404, query="?path=x"),
    ("PUT", "/api/sessions/{sid}/files/content"): R(409, 404, 401, 404, query="?path=x"),
    ("DELETE", "/api/sessions/{sid}/files"): R(409, 404, 401, 404, query="?path=x"),
    ("GET", "/api/sessions/{sid}/services"): R(409, 404, 401, 404),
    ("GET", "/api/sessions/{sid}/services/{name}/output"): R(409, 404, 401, 404),
    ("POST", "/api/sessions/{sid}/services/{name}/stop"): R(409, 404, 401, 404),
    ("GET", "/api/sessions/{sid}/previews"): R(409, 404, 401, 404),
    ("POST", "/api/sessions/{sid}/previews/{port}/shares"): R(201, 404, 401, 404),
    ("DELETE", "/api/sessions/{sid}/previews/shares/{share_id}"): R(404, 404, 401, 404),
    # A preview's URL opens by its token alone: a made-up one opens nothing, for anyone.
    **{(m, "/preview/{sid}/{port}/@{token}/{path:path}"): R(403, 403, 403, 403)
       for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")},
    # The caller's own LLM use (no provider is configured here: 503 says so).
    ("POST", "/v1/chat/completions"): R(503, 503, 401, 503, json={"messages": [{"role": "user", "content": "hi"}]}),  # noqa: E501
    ("GET", "/v1/models"): R(200, 200, 401, 200),
    ("GET", "/api/usage"): R(200, 200, 401, 200),
    # MCP (api/mcp.py): any live token; the tools act as its owner through the API.
    ("POST", "/mcp"): R(200, 200, 401, 200, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}),  # noqa: E501
    # The caller's own preferences (an empty body puts the defaults back).
    ("GET", "/api/preferences"): R(200, 200, 401, 200),
    ("PUT", "/api/preferences"): R(200, 200, 401, 200, json={}),
    # Admins only.
    ("GET", "/api/pools/{template}"): R(403, 403, 401, 404),  # no pool runs here
    ("GET", "/api/admin/audit"): R(403, 403, 401, 200, query="?session_id={sid}"),
    ("POST", "/api/admin/invites"): R(403, 403, 401, 201),
    ("GET", "/api/admin/users/{user_id}/limits"): R(403, 403, 401, 200),
    ("PUT", "/api/admin/users/{user_id}/limits"): R(403, 403, 401, 200, json={"kept_disks": 3}),
    ("GET", "/api/admin/hosts"): R(403, 403, 401, 200),
    ("PUT", "/api/admin/hosts/{host_id}/state"): R(403, 403, 401, 404, json={"state": "draining"}),
    ("POST", "/codec/{operation}"): R(403, 403, 401, 200, json={"payloads": []}),
    ("OPTIONS", "/codec/{operation}"): R(204, 204, 204, 204),  # a CORS preflight carries no token
    # The dashboard (an anonymous page load goes to the login page, an htmx call gets 401).
    ("GET", "/"): R(200, 200, 303, 200),
    ("GET", "/login"): R(200, 200, 200, 200),
    ("POST", "/login"): R(303, 303, 303, 303, form={"password": PASSWORD, "action": "signup"}),
    ("POST", "/logout"): R(303, 303, 401, 303),
    ("POST", "/ui/sessions"): R(204, 204, 401, 204),
    ("GET", "/sessions/{sid}"): R(200, 404, 303, 200),
    ("GET", "/ui/sessions/{sid}/events"): R(200, 404, 303, 200),
    ("POST", "/ui/sessions/{sid}/tasks"): R(409, 404, 401, 404, form=PROMPT),
    ("POST", "/ui/sessions/{sid}/tasks/{tid}/modify"): R(409, 404, 401, 404, form=CHANGE),
    ("POST", "/ui/sessions/{sid}/tasks/{tid}/{action}"): R(409, 404, 401, 404),
    ("GET", "/ui/sessions/{sid}/machine"): R(200, 404, 303, 200),
    ("GET", "/ui/sessions/{sid}/artifacts/{artifact_id}"): R(200, 404, 303, 200),
    ("POST", "/ui/sessions/{sid}/end"): R(200, 404, 401, 404),
    ("POST", "/ui/sessions/{sid}/resume"): R(409, 404, 401, 404),
    ("POST", "/ui/sessions/{sid}/checkpoints"): R(409, 404, 401, 404),  # it has ended
    ("POST", "/ui/sessions/{sid}/checkpoints/{cid}/rollback"): R(404, 404, 401, 404),
    ("POST", "/ui/sessions/{sid}/checkpoints/{cid}/fork"): R(404, 404, 401, 404),
    ("GET", "/preferences"): R(200, 200, 303, 200),
    ("POST", "/ui/preferences"): R(200, 200, 401, 200),
    ("GET", "/tokens"): R(200, 200, 303, 200),
    ("POST", "/ui/tokens"): R(200, 200, 401, 200, form={"name": "script"}),
    ("POST", "/ui/tokens/{token_id}/revoke"): R(200, 404, 401, 404),
    # The caller's own webhooks (a public address: no name to resolve here).
    ("GET", "/api/webhooks"): R(200, 200, 401, 200),
    ("POST", "/api/webhooks"): R(201, 201, 401, 201, json=HOOK),
    ("GET", "/api/webhooks/{webhook_id}"): R(200, 404, 401, 404),
    ("PUT", "/api/webhooks/{webhook_id}"): R(200, 404, 401, 404, json=HOOK),
    ("DELETE", "/api/webhooks/{webhook_id}"): R(204, 404, 401, 404),
    ("POST", "/api/webhooks/{webhook_id}/rotate"): R(200, 404, 401, 404),
    ("GET", "/api/webhooks/{webhook_id}/deliveries"): R(200, 404, 401, 404),
    ("POST", "/ui/webhooks"): R(200, 200, 401, 200, form={"url": HOOK_URL, "events": "task.finished"}),  # noqa: E501
    ("POST", "/ui/webhooks/{webhook_id}/rotate"): R(200, 404, 401, 404),
    ("POST", "/ui/webhooks/{webhook_id}/delete"): R(200, 404, 401, 404),
    ("GET", "/ui/webhooks/{webhook_id}/deliveries"): R(200, 404, 303, 404),
    ("GET", "/admin"): R(403, 403, 303, 200),
    ("POST", "/ui/admin/hosts/{host_id}/{action}"): R(403, 403, 401, 404),
    ("GET", "/ui/sessions/{sid}/files"): R(200, 404, 303, 404),
    ("GET", "/ui/sessions/{sid}/files/content"): R(409, 404, 303, 404, query="?path=x"),
    ("POST", "/ui/sessions/{sid}/files"): R(409, 404, 401, 404),
    ("DELETE", "/ui/sessions/{sid}/files"): R(409, 404, 401, 404, query="?path=x"),
    ("GET", "/ui/sessions/{sid}/services"): R(200, 404, 303, 404),
    ("GET", "/ui/sessions/{sid}/services/{name}/output"): R(409, 404, 303, 404),
    ("POST", "/ui/sessions/{sid}/services/{name}/stop"): R(409, 404, 401, 404),
    ("GET", "/ui/sessions/{sid}/previews"): R(200, 404, 303, 404),
    ("POST", "/ui/sessions/{sid}/previews/{port}/shares"): R(200, 404, 401, 404),
    ("POST", "/ui/sessions/{sid}/previews/shares/{share_id}/revoke"): R(404, 404, 401, 404),
    ("GET", "/ui/sessions/{sid}/terminals"): R(200, 404, 303, 404),  # ready: false, no machine
    ("GET", "/preview/{sid}/{port}"): R(303, 404, 303, 404),
    ("GET", "/preview/{sid}/{port}/"): R(303, 404, 303, 404),
}
# fmt: on


def routes_of(app: Any) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, included routers' too (HEAD goes with GET)."""
    found = set()
    for route in iter_route_contexts(app.routes):
        found |= {(m, str(route.path)) for m in route.methods or () if m != "HEAD"}
    return sorted(found)


APP = create_app(Settings(data_dir=Path(tempfile.mkdtemp())))
ROUTES = routes_of(APP)
# The dashboard's paths: their callers carry the login cookie and the page's CSRF token.
DASHBOARD = {
    str(route.path)
    for route in iter_route_contexts(APP.routes)
    if isinstance(route.original_route, DashboardRoute)
}


@pytest.mark.parametrize("route", ROUTES, ids=" ".join)
def test_every_route_has_a_rule(route: tuple[str, str]) -> None:
    assert route in RULES, f"{route} has no rule: add one line to RULES in {__file__}"


def test_every_rule_has_a_route() -> None:
    assert set(RULES) - set(ROUTES) == set()


@dataclass
class Stage:
    client: TestClient
    settings: Settings
    world: World
    artifact_id: str = ""

    def caller_headers(self, caller: str, path: str, method: str) -> dict[str, str]:
        user = {"owner": self.world.owner, "other": self.world.other, "admin": self.world.admin}
        dashboard = path in DASHBOARD
        headers: dict[str, str] = {}
        if dashboard and method != "GET":
            headers |= {"Origin": "http://testserver", "HX-Request": "true"}
        self.client.cookies.clear()
        if caller == "anonymous":
            return headers
        with Session(self.client.app.state.engine) as db:  # type: ignore[attr-defined]
            token, secret = accounts.issue_token(db, self.settings, user[caller], "authz")
        if not dashboard:
            return headers | {"Authorization": f"Bearer {secret}"}
        self.client.cookies.set(COOKIE, secret)
        return headers | {guard.HEADER: guard.token_for(self.settings, token.id)}

    def values(self) -> dict[str, str]:
        """What each path parameter names: the owner's things."""
        with Session(self.client.app.state.engine) as db:  # type: ignore[attr-defined]
            token, _ = accounts.issue_token(db, self.settings, self.world.owner, "to revoke")
            token_id = token.id
            # A new one each time (a caller may delete it), the only one (below the cap).
            for old in db.exec(select(WebhookEndpoint)).all():
                db.delete(old)
            hook = WebhookEndpoint(
                user_id=self.world.owner.id, url=HOOK_URL, events=["task.finished"],
                secret=seal(payload_keys(self.settings), "secret"),
            )  # fmt: skip
            hook_id = hook.id
            db.add(hook)
            db.commit()
        return {
            "sid": self.world.session_id,
            "host_id": "nohost",
            "tid": self.world.task_id,
            "action": "pause",
            "operation": "decode",
            "token_id": token_id,
            "artifact_id": self.artifact_id,
            "template": "default",
            "user_id": self.world.owner.id,
            "cid": "0" * 32,
            "webhook_id": hook_id,
            "name": "s1",
            "port": "8000",
            "share_id": "no-such-share",
            "token": "made-up",
            "path": "index.html",
        }

    def login_form(self, form: dict[str, str]) -> dict[str, str]:
        """The login page's form as this browser got it, for a new email."""
        page = self.client.get("/login")
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert found
        return {**form, "csrf": found.group(1), "email": f"{uuid.uuid4().hex[:8]}@example.com"}


@pytest.fixture(scope="module")
def stage(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("authz"),
        temporal_address=temporal_address,
        **FAST_PASSWORDS,
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        world = build(engine)
        with Session(engine) as db:
            artifact_id = ArtifactStore(settings.artifacts_dir, 1 << 20).save(
                db, session_id=world.session_id, task_id=world.task_id, step_index=0,
                exec_id="e", name="shot.jpg", media_type="image/jpeg", data=b"\xff\xd8\xff",
            )  # fmt: skip
        yield Stage(client, settings, world, artifact_id)


@pytest.mark.parametrize("route", sorted(RULES), ids=" ".join)
def test_each_caller_gets_what_the_rule_says(stage: Stage, route: tuple[str, str]) -> None:
    method, path = route
    rule = RULES[route]
    got = {}
    for caller in CALLERS:
        url = (path.replace(":path}", "}") + rule.query).format(**stage.values())
        headers = stage.caller_headers(caller, path, method)
        form = stage.login_form(rule.form) if path == "/login" and method == "POST" else rule.form
        answer = stage.client.request(
            method, url, headers=headers, json=rule.json, data=form or None
        )
        got[caller] = answer.status_code
        if answer.status_code == 401 and path not in DASHBOARD:
            assert answer.headers["www-authenticate"].startswith("Bearer")
    assert got == {caller: rule.status(caller) for caller in CALLERS}


def test_admins_list_every_users_sessions(stage: Stage) -> None:
    url = "/api/sessions?all=true"
    admin = stage.caller_headers("admin", url, "GET")
    listed = {s["id"] for s in stage.client.get(url, headers=admin).json()}
    assert stage.world.session_id in listed
    assert (
        stage.client.get(url, headers=stage.caller_headers("other", url, "GET")).status_code == 403
    )
    mine = stage.client.get("/api/sessions", headers=admin).json()
    assert stage.world.session_id not in {s["id"] for s in mine}

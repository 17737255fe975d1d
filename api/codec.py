"""The codec endpoint: the Temporal Web UI (or ``temporal --codec-endpoint``) posts encrypted
payloads to /codec/decode to show them to an operator, and /codec/encode to send some.

Only an admin (API token, or the dashboard's cookie sent by a Web UI told to include
credentials) or the configured codec token may call it, and browsers only from the allowed
origins (CORS): anyone else would read every session's workflow data through it.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request, Response
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from api import accounts
from api.deps import COOKIE, DbDep, Problem, SettingsDep
from api.problems import problems
from config.settings import Settings
from workflows.codec import EncryptionCodec

router = APIRouter(prefix="/codec", tags=["codec"])
ALLOWED_HEADERS = "authorization, content-type, x-namespace"
Operation = Literal["encode", "decode"]


def allowed_origins(settings: Settings) -> set[str]:
    ui = settings.temporal_ui_port
    return set(settings.codec_origins) or {f"http://127.0.0.1:{ui}", f"http://localhost:{ui}"}


def cors(request: Request, settings: Settings) -> dict[str, str]:
    """Headers that let an allowed origin read the answer; other browsers' pages are refused."""
    origin = request.headers.get("origin")
    if origin is None:
        return {}  # not a browser's cross-origin call (the CLI, a script)
    if origin not in allowed_origins(settings):
        raise Problem(403, "this origin may not call the codec (BERTH_CODEC_ORIGINS)")
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def codec_caller(request: Request, response: Response, db: DbDep, settings: SettingsDep) -> None:
    response.headers.update(cors(request, settings))
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret:
        if settings.codec_token and hmac.compare_digest(secret, settings.codec_token):
            return
    else:
        secret = request.cookies.get(COOKIE, "")
    found = accounts.authenticate(db, settings, secret) if secret else None
    if found is None:
        raise Problem(401, "an admin's token, or the codec token, is needed")
    if not found[0].is_admin:
        raise Problem(403, "only an admin may decode workflow payloads")


@router.options("/{operation}", status_code=204, responses=problems(403))
def preflight(operation: Operation, request: Request, settings: SettingsDep) -> Response:
    """CORS preflight of a browser (the Temporal Web UI)."""
    headers = cors(request, settings) | {
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Max-Age": "600",
    }
    return Response(status_code=204, headers=headers)


@router.post(
    "/{operation}",
    dependencies=[Depends(codec_caller)],
    responses=problems(400, 401, 403),
)
async def transcode(
    operation: Operation,
    request: Request,
    body: Annotated[dict[str, Any], Body(examples=[{"payloads": []}])],
) -> dict[str, Any]:
    """``{"payloads": [...]}`` in Temporal's JSON form, encoded or decoded."""
    try:
        payloads = ParseDict(body, Payloads()).payloads
    except ParseError as exc:
        raise Problem(400, f"not Temporal payloads: {exc}") from exc
    codec: EncryptionCodec = request.app.state.codec
    try:
        done = await (codec.encode(payloads) if operation == "encode" else codec.decode(payloads))
    except ValueError as exc:
        raise Problem(400, str(exc)) from exc
    return MessageToDict(Payloads(payloads=done))

"""Per-sandbox guest tokens: an HMAC of the sandbox id, so a token opens no other sandbox and
the gateway needs no lookup to check one."""

from __future__ import annotations

import hashlib
import hmac


def guest_token(key: bytes, sandbox_id: str) -> str:
    return hmac.new(key, b"guest:" + sandbox_id.encode(), hashlib.sha256).hexdigest()


def check_guest_token(key: bytes, sandbox_id: str, token: str) -> bool:
    return hmac.compare_digest(guest_token(key, sandbox_id), token)

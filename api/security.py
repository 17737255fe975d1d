"""Passwords (scrypt) and user tokens (HMAC-signed, so checking one needs no lookup)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    scheme, salt, digest = stored.split("$")
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **SCRYPT)
    return hmac.compare_digest(candidate.hex(), digest)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, b"user:" + body.encode(), hashlib.sha256).digest())


def issue_token(key: bytes, user_id: str, ttl_s: int) -> str:
    body = _b64(json.dumps({"sub": user_id, "exp": int(time.time()) + ttl_s}).encode())
    return f"{body}.{_sign(key, body)}"


def read_token(key: bytes, token: str) -> str | None:
    """The user id a valid, unexpired token names; None for anything else."""
    body, _, signature = token.partition(".")
    if not hmac.compare_digest(_sign(key, body), signature):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if claims.get("exp", 0) < time.time():
        return None
    return str(claims["sub"])

"""Passwords (argon2id, parameters kept in each hash) and API token secrets.

Hashing a password costs tens of milliseconds of CPU and 64 MiB on purpose, so it runs on a
small executor of its own: a burst of logins queues there instead of taking every thread of
the pool that sync routes and database reads share.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from config.keys import Keyring, keyed_hash
from config.settings import Settings

TOKEN_PREFIX = "berth_"
# What scrypt hashes were made with before argon2id: they verify once, then get rehashed.
LEGACY_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass(frozen=True)
class PasswordVerdict:
    ok: bool
    rehash: bool = False  # the hash is of an older scheme or weaker parameters


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self.hasher = PasswordHasher(
            time_cost=settings.password_time_cost,
            memory_cost=settings.password_memory_kib,
            parallelism=settings.password_parallelism,
        )
        self._pool = ThreadPoolExecutor(
            settings.password_hash_threads, thread_name_prefix="password-hash"
        )
        # Checked against for unknown emails, so they cost what known ones do.
        self._decoy = self.hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.hasher.hash, password
        )

    async def check(self, password: str, stored: str | None) -> PasswordVerdict:
        """``stored`` None (no such user) does the same work and fails."""
        verdict = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._check, password, stored or self._decoy
        )
        return verdict if stored else PasswordVerdict(ok=False)

    def _check(self, password: str, stored: str) -> PasswordVerdict:
        if stored.startswith("scrypt$"):
            return PasswordVerdict(ok=_check_scrypt(password, stored), rehash=True)
        try:
            self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return PasswordVerdict(ok=False)
        return PasswordVerdict(ok=True, rehash=self.hasher.check_needs_rehash(stored))


def _check_scrypt(password: str, stored: str) -> bool:
    _, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **LEGACY_SCRYPT)
    return hmac.compare_digest(candidate.hex(), digest)


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hashes(keys: Keyring, secret: str) -> list[str]:
    """What a token's row may hold: its hash under the current key, then under previous ones."""
    return [keyed_hash(key, "api-token", secret) for key in keys.keys]

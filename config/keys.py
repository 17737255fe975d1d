"""Keys, each derived from a secret of its own purpose, so rotating one (after a leak, say)
leaves the others alone: user tokens, guest tokens, Temporal payloads.

A purpose's keyring holds the current key first, then the keys of its previous secrets,
which stay valid for a grace period: until the operator drops them from the settings.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings

# Before secrets were split, one generated file keyed both kinds of tokens: running sandboxes
# still hold guest tokens made with it.
LEGACY_SECRET_FILE = "secret_key"


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]  # current first

    @property
    def current(self) -> bytes:
        return self.keys[0]


def derive(secret: str, purpose: str) -> bytes:
    """An HKDF-style expansion: a key that says nothing about the secret or other purposes."""
    return hmac.new(secret.encode(), f"berth/{purpose}".encode(), hashlib.sha256).digest()


def generated_secret(data_dir: Path, name: str, own: bool = False) -> str:
    """A secret generated once and kept in the data dir (mode 0600); with ``own``, only a
    file of this process's user is taken (see owned())."""
    path = data_dir / name
    if not path.exists():
        # API and worker may start together: write aside, then link, so one secret wins.
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = path.with_suffix(f".{os.getpid()}")
        # O_EXCL: made here, never a file or link that was waiting under that name.
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as sink:
            sink.write(secrets.token_urlsafe(48))
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    return _read(path, own)


def owned(path: Path, fd: int | None = None) -> None:
    """RuntimeError unless this process's user owns ``path``: under `make run` as root the
    data dir belongs to the API's user (berth/privileges.py), who can put any file there, so
    a root process takes its own secrets and keys from files only it could have written."""
    owner = os.fstat(fd).st_uid if fd is not None else path.stat().st_uid
    if owner != os.geteuid():
        raise RuntimeError(
            f"{path} belongs to uid {owner}, not to this process's (uid {os.geteuid()}): "
            "refusing a secret another user could have written; remove it, or set it in "
            "the settings"
        )


def _read(path: Path, own: bool) -> str:
    # Never through a link: a secret is a file of its own, and root reads the API user's
    # folder to make its secrets (berth/privileges.py).
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as source:
        if own:
            owned(path, source.fileno())
        return source.read().strip()


def _keyring(
    settings: Settings, purpose: str, current: str | None, previous: list[str], own: bool = False
) -> Keyring:
    # Root's own secrets stay in the data dir; the API's are in the folder its user owns.
    folder = settings.data_dir if own else settings.shared_dir
    secret = current or generated_secret(folder, f"{purpose}_secret", own)
    return Keyring(tuple(derive(s, purpose) for s in (secret, *previous)))


def user_keys(settings: Settings) -> Keyring:
    return _keyring(
        settings, "user_token", settings.user_token_secret, settings.user_token_previous_secrets
    )


def guest_keys(settings: Settings) -> Keyring:
    """The worker's (root under `make run`): its secrets only from its own files."""
    previous = list(settings.guest_token_previous_secrets)
    legacy = settings.data_dir / LEGACY_SECRET_FILE
    ring = _keyring(settings, "guest_token", settings.guest_token_secret, previous, own=True)
    if legacy.exists():
        # The legacy key was the raw secret, not a derived one.
        ring = Keyring((*ring.keys, _read(legacy, own=True).encode()))
    return ring


def payload_keys(settings: Settings) -> Keyring:
    return _keyring(settings, "payload", settings.payload_secret, settings.payload_previous_secrets)


def key_id(key: bytes) -> str:
    """A short public name of a key, so a ciphertext says which key opens it."""
    return hashlib.sha256(b"key-id:" + key).hexdigest()[:16]


def keyed_hash(key: bytes, purpose: str, value: str) -> str:
    return hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def _sealing_key(key: bytes) -> bytes:
    return hmac.new(key, b"berth/sealed", hashlib.sha256).digest()


def seal(ring: Keyring, text: str) -> str:
    """``text`` encrypted (AES-GCM) under the ring's current key, naming the key: a secret
    the server must use again (a webhook's signing secret), kept unreadable in the database."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_sealing_key(ring.current)).encrypt(nonce, text.encode(), None)
    return f"{key_id(ring.current)}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"


def unseal(ring: Keyring, sealed: str) -> str:
    """What seal() sealed, with whichever key of the ring it names; ValueError if none does
    (its key was dropped from the settings) or it was tampered with."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    name, _, data = sealed.partition(".")
    key = next((k for k in ring.keys if key_id(k) == name), None)
    if key is None:
        raise ValueError("sealed under a key no longer in the ring")
    raw = base64.urlsafe_b64decode(data)
    try:
        return AESGCM(_sealing_key(key)).decrypt(raw[:12], raw[12:], None).decode()
    except InvalidTag:
        raise ValueError("sealed text was altered") from None


def relay_token(settings: Settings) -> str:
    """What the API shows the worker's relay (sandboxes/relay.py): derived from the payload
    secret, which both processes hold already."""
    return keyed_hash(payload_keys(settings).current, "relay", "api")

"""Where the command line and the MCP server find the API and the token: BERTH_URL and
BERTH_TOKEN, else what ``berth login`` saved (a file only its owner may read, under the
user's config dir: $XDG_CONFIG_HOME/berth or ~/.config/berth, or BERTH_CONFIG_DIR)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    if chosen := os.environ.get("BERTH_CONFIG_DIR"):
        return Path(chosen)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "berth"


def credentials_file() -> Path:
    return config_dir() / "credentials.json"


@dataclass(frozen=True)
class Login:
    url: str
    token: str | None


def load() -> Login:
    saved: dict[str, str] = {}
    path = credentials_file()
    if path.exists():
        saved = json.loads(path.read_text())
    url = os.environ.get("BERTH_URL") or saved.get("url") or DEFAULT_URL
    return Login(url=url, token=os.environ.get("BERTH_TOKEN") or saved.get("token"))


def save(url: str, token: str) -> Path:
    """Keep the token, readable by its owner only (0600 from its creation on: never a
    moment with wider rights)."""
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url, "token": token}, out)
    return path

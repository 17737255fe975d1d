"""Every setting of the backend, in one place.

Values come from the environment (prefix ``BERTH_``, except the providers' standard names)
or from an optional ``.env`` file in the working directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTH_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path(".berth"), description="Databases, logs, secrets")
    host: str = Field(default="127.0.0.1", description="Address the API listens on")
    port: int = Field(default=8000, description="Port of the API and dashboard")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "BERTH_DATABASE_URL"),
        description="SQLAlchemy URL; unset means a SQLite file in the data dir",
    )
    secret_key: str | None = Field(
        default=None, description="Signs user and guest tokens; unset means a generated one"
    )
    token_ttl_hours: int = Field(default=24 * 7, description="Lifetime of a user's API token")

    temporal_address: str | None = Field(
        default=None, description="host:port of Temporal; unset means `make run` starts one"
    )
    temporal_port: int = Field(default=7233, description="Port of the embedded Temporal server")
    temporal_namespace: str = "default"
    temporal_ui_port: int = 8233
    temporal_suggest_continue_as_new: int | None = Field(
        default=None,
        description="Embedded server: history length at which sessions continue as new "
        "(Temporal's default is 4096 events); tests set it low",
    )
    host_id: str = Field(
        default="local", description="Name of this sandbox host, whose task queue its sessions use"
    )

    sandbox_provider: Literal["docker", "libvirt"] = Field(
        default="docker", description="docker (containers, mock mode) or libvirt (VMs)"
    )
    sandbox_cpus: float = 1.0
    sandbox_memory_mb: int = 1024
    sandbox_pids: int = 512
    sandbox_connect_timeout_s: float = 60.0
    # Virtual machines (libvirt provider); a VM's size, limits and egress are its template's.
    libvirt_uri: str = Field(default="qemu:///system", description="The libvirt daemon to use")
    vm_images_dir: Path | None = Field(
        default=None, description="Where VM template images are cached; unset: data dir/images"
    )
    vm_bridge: str = Field(default="berthvm0", description="Linux bridge the VMs sit on")
    vm_subnet: str = Field(
        default="10.213.0.0/16", description="VMs' addresses; the host takes the first"
    )
    vm_shutdown_timeout_s: float = Field(
        default=5.0, description="How long a VM may take to power off before it is destroyed"
    )
    vm_max_running: int = Field(default=20, description="VMs this host runs at most at once")
    vm_max_booting: int = Field(
        default=2, ge=1, description="VMs this host boots at most at once (until their guest is up)"
    )
    vm_pool_min: int = Field(default=1, ge=0, description="Booted VMs kept ready per template")
    vm_pool_max: int = Field(
        default=4,
        ge=0,
        description="Most VMs a template's pool grows to with claims; 0: none",
    )
    debian_mirror: str = Field(
        default="http://deb.debian.org/debian",
        description="Where sandbox images' packages come from",
    )
    gateway_host: str = Field(
        default="0.0.0.0", description="Address the guest gateway (WebSocket) listens on"
    )
    gateway_port: int = Field(default=8765, description="Port guest agents connect to")

    max_live_sessions: int = Field(
        default=10, description="Sessions a user may have running at once"
    )
    max_streams_per_user: int = Field(
        default=100, description="Event streams one user may hold open at once (per API process)"
    )
    step_timeout_s: float = Field(default=600.0, description="Longest a single step may run")
    session_idle_timeout_s: float = Field(
        default=3600.0, description="An idle session ends itself after this long"
    )

    llm_model: str | None = Field(
        default=None,
        description="Planner model, e.g. gpt-4o-mini, claude-3-5-haiku-latest, "
        "or openai:NAME / anthropic:NAME",
    )
    openai_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "BERTH_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "BERTH_OPENAI_BASE_URL")
    )
    anthropic_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_API_KEY", "BERTH_ANTHROPIC_API_KEY"),
    )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'berth.db').resolve()}"

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def host_task_queue(self) -> str:
        return f"berth-host-{self.host_id}"

    def signing_key(self) -> bytes:
        """The configured secret, or one generated once and kept in the data dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            # API and worker may start together: write aside, then link, so one key wins.
            self.data_dir.mkdir(parents=True, exist_ok=True)
            draft = path.with_suffix(f".{os.getpid()}")
            draft.write_text(secrets.token_urlsafe(48))
            draft.chmod(0o600)
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
            draft.unlink()
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Every setting of the backend, in one place.

Values come from the environment (prefix ``BERTH_``, except the providers' standard names)
or from an optional ``.env`` file in the working directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LLMProvider(BaseModel):
    """One provider of the LLM proxy: a kind of API, a model, and where and how to reach it."""

    name: str
    kind: Literal["openai", "anthropic"] = "openai"  # openai: also any OpenAI-compatible server
    model: str
    base_url: str | None = None
    api_key: str | None = None
    # The agent's bounded context (issue 20): the model's context window in tokens; the
    # planner keeps each call within it (older steps summarized). Small by default, as a
    # local model's may be: set it to the model's (e.g. 128000 for gpt-4o-mini).
    context_tokens: int = Field(default=16_000, ge=2_000)


# The project's own folder: a cache there serves every data dir.
CHECKOUT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTH_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path(".berth"), description="Databases, logs, secrets")
    host: str = Field(default="127.0.0.1", description="Address the API listens on")
    port: int = Field(default=8000, description="Port of the API and dashboard")
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of the API and dashboard: set with "
        "BERTH_TLS_KEY_FILE, they are served over HTTPS only (with HSTS)",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM key of BERTH_TLS_CERT_FILE")
    trusted_proxies: str = Field(
        default="127.0.0.1",
        description="Comma-separated addresses or networks of reverse proxies whose "
        "X-Forwarded-Proto/-For headers the API believes (a TLS proxy in front of it); "
        "'*' trusts any",
    )
    run_as: str = Field(
        default="berth",
        description="System user that `make run`, started as root, runs the API and Temporal "
        "as (made if missing); empty: they stay root",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "BERTH_DATABASE_URL"),
        description="SQLAlchemy URL; unset means a SQLite file in the data dir",
    )
    token_ttl_hours: int = Field(default=24 * 7, description="Lifetime of a user's API token")

    # Accounts and secrets
    # Each secret is used only through keys derived from it (berth/keys.py); unset, it is
    # generated once into the data dir. A rotated secret moves to its *_previous list, which
    # keeps it valid for a grace period (a JSON list in the environment).
    user_token_secret: str | None = Field(
        default=None, description="Keys user API tokens and the dashboard's CSRF tokens"
    )
    user_token_previous_secrets: list[str] = Field(
        default_factory=list,
        description="Former user token secrets, still accepted; a token used meanwhile moves "
        "to the current secret",
    )
    guest_token_secret: str | None = Field(
        default=None, description="Keys sandbox guests' tokens; worker and API hosts share it"
    )
    guest_token_previous_secrets: list[str] = Field(
        default_factory=list, description="Former guest token secrets, still accepted"
    )
    payload_secret: str | None = Field(
        default=None, description="Encrypts Temporal payloads (AES-GCM); API and worker share it"
    )
    payload_previous_secrets: list[str] = Field(
        default_factory=list, description="Former payload secrets: old histories still decrypt"
    )
    temporal_accept_plaintext: bool = Field(
        default=False,
        description="Accept Temporal payloads that are not encrypted: only for a migration "
        "window, while workflows started before payload encryption finish; otherwise anyone "
        "who reaches the Temporal server could send a workflow a signal or update",
    )
    codec_token: str | None = Field(
        default=None,
        description="Bearer token that may call /codec (besides an admin's), for a Temporal "
        "Web UI or CLI that cannot log in",
    )
    codec_origins: list[str] = Field(
        default_factory=list,
        description="Web origins allowed to call /codec (CORS); unset means the embedded "
        "Temporal Web UI's",
    )
    password_time_cost: int = Field(default=3, ge=1, description="argon2id passes")
    password_memory_kib: int = Field(default=65536, ge=8, description="argon2id memory")
    password_parallelism: int = Field(default=4, ge=1, description="argon2id lanes")
    password_hash_threads: int = Field(
        default=2, ge=1, description="Threads that hash passwords (not the request threadpool)"
    )
    login_max_failures: int = Field(
        default=5, ge=1, description="Failed logins per email and address before a lockout"
    )
    login_max_attempts: int = Field(
        default=100, ge=1, description="Logins per address and window, failed or not"
    )
    login_window_s: int = Field(default=900, ge=1, description="Window of the login counters")
    lockout_s: int = Field(default=900, ge=1, description="How long a lockout lasts")
    signup_max_attempts: int = Field(
        default=30, ge=1, description="Sign-ups per address and window"
    )
    signup_window_s: int = Field(default=3600, ge=1, description="Window of the sign-up counter")
    signup: Literal["open", "closed", "invite"] = Field(
        default="open",
        description="Who may sign up: anyone (open), nobody (closed: accounts come from "
        "`python -m berth create-admin`), or whoever has a single-use invite an admin made "
        "(invite: POST /api/admin/invites)",
    )
    invite_ttl_hours: int = Field(default=72, ge=1, description="How long an invite is valid")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest request body of a request that carries a token or session cookie",
    )
    max_body_bytes_anonymous: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Largest request body before login: sign-up, log-in, the dashboard's login "
        "form, and any request without a token or session cookie",
    )

    temporal_address: str | None = Field(
        default=None, description="host:port of Temporal; unset means `make run` starts one"
    )
    temporal_port: int = Field(default=7233, description="Port of the embedded Temporal server")
    temporal_namespace: str = "default"
    # A Temporal cluster of one's own or Temporal Cloud: TLS (mTLS with a client certificate)
    # and/or an API key. The API, the worker and the tests all connect through
    # workflows/client.py, so they all use these.
    temporal_tls: bool = Field(
        default=False,
        description="Connect to Temporal over TLS (the system's CA roots unless "
        "BERTH_TEMPORAL_TLS_CA_FILE); implied by any other BERTH_TEMPORAL_TLS_* or "
        "BERTH_TEMPORAL_API_KEY",
    )
    temporal_tls_ca_file: Path | None = Field(
        default=None, description="PEM CA certificate(s) that Temporal's certificate must chain to"
    )
    temporal_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate for mTLS with Temporal (with "
        "BERTH_TEMPORAL_TLS_KEY_FILE)",
    )
    temporal_tls_key_file: Path | None = Field(
        default=None, description="PEM key of BERTH_TEMPORAL_TLS_CERT_FILE"
    )
    temporal_tls_server_name: str | None = Field(
        default=None,
        description="Name Temporal's certificate is checked against (and sent as SNI), when "
        "it differs from the host of BERTH_TEMPORAL_ADDRESS",
    )
    temporal_api_key: str | None = Field(
        default=None,
        description="API key sent to Temporal with every call (Temporal Cloud); implies TLS",
    )
    temporal_ui_port: int = 8233
    temporal_ui_url: str | None = Field(
        default=None,
        description="Base URL of the Temporal Web UI, for admins' links to session workflows; "
        "unset: the embedded one (http://127.0.0.1:<temporal_ui_port>)",
    )
    temporal_suggest_continue_as_new: int | None = Field(
        default=None,
        description="Embedded server: history length at which sessions continue as new "
        "(Temporal's default is 4096 events); tests set it low",
    )
    host_id: str = Field(
        default="local", description="Name of this sandbox host, whose task queue its sessions use"
    )
    # The worker's Temporal tuning; unset: Temporal's defaults (100 each, 1000 cached).
    worker_max_concurrent_workflow_tasks: int | None = Field(
        default=None, ge=1, description="Workflow tasks this worker runs at once"
    )
    worker_max_concurrent_activities: int | None = Field(
        default=None, ge=1, description="Activities (steps, boots, plans) this worker runs at once"
    )
    worker_max_concurrent_local_activities: int | None = Field(
        default=None, ge=1, description="Local activities this worker runs at once"
    )
    worker_max_cached_workflows: int = Field(
        default=1000,
        ge=0,
        description="Workflows this worker keeps in memory between their tasks (the sticky "
        "cache): a cached session's next task replays nothing; each costs some memory",
    )
    host_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description="How often a worker writes its host's capacity and load to the host registry",
    )
    host_lost_after_s: float = Field(
        default=30.0,
        gt=0,
        description="A host whose last heartbeat is older than this reads as lost",
    )
    # Fleet (issue 18): where preserved disks are kept. A folder every sandbox host reaches
    # (an NFS or CephFS mount) lets a session resume, or move off a drained host, anywhere.
    kept_disks_dir: Path | None = Field(
        default=None,
        description="Where preserved sandboxes' disks are kept; shared by every host for "
        "`host drain --move` and resuming elsewhere (default: <data dir>/preserved)",
    )

    sandbox_provider: Literal["docker", "libvirt"] = Field(
        default="libvirt",
        description="libvirt (a VM per session) or docker (containers, mock mode)",
    )
    sandbox_cpus: float = 1.0
    sandbox_memory_mb: int = 1024
    sandbox_pids: int = 512
    # A container's root filesystem is read-only; these tmpfs are all it may write, and
    # count against its memory, so they stay below sandbox_memory_mb.
    sandbox_workspace_mb: int = Field(
        default=512, ge=1, description="Size of a container's workspace, /home/berth"
    )
    sandbox_tmp_mb: int = Field(default=128, ge=1, description="Size of a container's /tmp")
    sandbox_connect_timeout_s: float = 60.0
    guest_reconnect_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="A running command fails once its guest has been gone this long (unless "
        "its machine is suspended: then it waits)",
    )
    guest_silence_s: float = Field(
        default=7.0,
        gt=0,
        description="A running machine whose guest answers nothing (no message, no ping) "
        "for this long is taken for dead: its step fails and its session gets a new machine",
    )
    # Kept disks (sessions ended with preserve), per user: count, bytes, and age.
    kept_disks_per_user: int = Field(
        default=5,
        ge=0,
        description="Sessions one user may end keeping their disk (preserve) at once (0: no "
        "limit); an admin may set another per user",
    )
    kept_bytes_per_user: int = Field(
        default=20 * 2**30,
        ge=0,
        description="Bytes of kept disks one user may hold before ending another session "
        "keeping its disk is refused (0: no limit); an admin may set another per user",
    )
    kept_max_age_days: float = Field(
        default=30.0,
        ge=0,
        description="Days a kept disk is kept before the worker removes it (the session can "
        "no longer be resumed; the dashboard and API show the date beforehand); 0: forever",
    )
    # Command policy
    command_policy_path: Path | None = Field(
        default=None,
        description="A policy file (TOML, as vm_templates/default/policy.toml) that replaces "
        "every template's own command policy",
    )

    # Virtual machines (libvirt provider); a VM's size, limits and egress are its template's.
    libvirt_uri: str = Field(default="qemu:///system", description="The libvirt daemon to use")
    vm_images_dir: Path = Field(
        # Keyed by a hash of what they are built from, so every data dir can share them.
        default=CHECKOUT / ".berth" / "images",
        description="Where VM template images are cached (shared by every data dir)",
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
    # Small: these are 2-core hosts running VMs under TCG, where each idle VM is ~300 MiB.
    vm_pool_max: int = Field(
        default=3,
        ge=0,
        description="Most VMs a template's pool grows to with claims; 0: none",
    )
    # Template snapshots (sandboxes/snapshots.py): new VMs restored from a saved one.
    vm_snapshots: bool = Field(
        default=True,
        description="Restore new VMs from their template's snapshot (taken by `prepare`) "
        "instead of booting them; off: every VM boots",
    )
    debian_mirror: str = Field(
        default="http://deb.debian.org/debian",
        description="Where sandbox images' packages come from",
    )
    # Local fleet (`python -m berth run --hosts N`): Docker sandboxes' network per host, as
    # vm_bridge and vm_subnet are libvirt's. The supervisor gives each extra host its own.
    docker_network: str = Field(
        default="berth-sandbox",
        description="Docker network the sandboxes sit on (internal; Docker picks its subnet)",
    )
    docker_bridge: str = Field(
        default="berth0", max_length=15, description="Linux bridge of BERTH_DOCKER_NETWORK"
    )
    # Density: VMs of one template share memory.
    vm_ksm: bool = Field(
        default=True,
        description="Turn on the kernel's same-page merging (KSM) when preparing a libvirt "
        "host: idle VMs of one template share their identical memory",
    )
    gateway_host: str = Field(
        default="",
        description="Address the guest gateway (WebSocket) listens on; empty: only the "
        "host's address on the sandboxes' bridge, where guests dial it",
    )
    gateway_port: int = Field(default=8765, description="Port guest agents connect to")
    gateway_tls: bool = Field(
        default=True,
        description="Guests dial the gateway over wss, pinning its certificate; off: plain ws",
    )
    gateway_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate of the guest gateway; unset: one generated once into "
        "the data dir (self-signed: guests pin it, whatever signed it)",
    )
    gateway_key_file: Path | None = Field(
        default=None, description="PEM key of BERTH_GATEWAY_CERT_FILE"
    )

    max_live_sessions: int = Field(
        default=10, description="Sessions a user may have running at once"
    )
    max_streams_per_user: int = Field(
        default=100,
        description="Event streams one user may hold open at once, across every API process",
    )
    stream_lifetime_s: float = Field(
        default=900.0,
        gt=0,
        description="An event stream ends after this long; clients reconnect where they were",
    )
    session_update_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Longest the API waits for a session to answer a task or control request "
        "(its worker down: a 503 with Retry-After after this long)",
    )
    session_sweep_every_s: float = Field(
        default=60.0,
        gt=0,
        description="How often each worker closes the session rows whose workflow is over "
        "(terminated, timed out, lost), freeing their users' live-session slots",
    )
    session_sweep_batch: int = Field(
        default=200, ge=1, description="Live session rows one sweep checks at most"
    )
    session_sweep_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="A session row changed more recently than this is not swept (its workflow "
        "may be starting)",
    )
    step_timeout_s: float = Field(default=600.0, description="Longest a single step may run")
    session_idle_timeout_s: float = Field(
        default=3600.0, description="An idle session ends itself after this long"
    )
    session_hibernate_after_s: float | None = Field(
        default=600.0,
        description="An idle session's sandbox is suspended after this long (a VM's memory "
        "saved to disk) and woken by the next task; unset: never",
    )

    session_max_replacements: int = Field(
        default=3,
        ge=0,
        description="Times in a row a session's dead machine is replaced (with a growing "
        "pause between) before the session fails; a step run on a machine resets the count",
    )

    # Agent loop
    agent_max_steps: int = Field(
        default=30, description="Steps one task may run before it fails for want of progress"
    )
    agent_max_revisions: int = Field(
        default=8, description="Times one task's plan may be revised after a failed check"
    )

    # ---- checkpoints, rollback and forks (issue 19)
    session_auto_checkpoint: Literal["none", "before_task"] = Field(
        default="none",
        description="Checkpoints a session takes by itself: before each task, or none "
        "(a session may ask otherwise when it is created)",
    )
    fork_max_count: int = Field(
        default=8, ge=1, description="Sessions one fork request may make from a checkpoint"
    )

    # Step artifacts, and what sandboxes may reach
    artifact_max_bytes: int = Field(
        default=16 * 1024 * 1024, description="Largest artifact (screenshot, file) stored"
    )
    sandbox_host_ports: list[int] = Field(
        default_factory=list,
        description="Ports on the host, besides the gateway's, that sandboxes may reach "
        "(a page served for them, a package cache), e.g. [8080]",
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

    # LLM proxy
    llm_providers: list[LLMProvider] = Field(
        default_factory=list,
        description="Ordered providers, tried in turn (JSON list); unset means the one given "
        "by BERTH_LLM_MODEL and the OPENAI_* / ANTHROPIC_API_KEY variables",
    )
    llm_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="USD per million input and output tokens, by model, "
        'e.g. {"gpt-4o-mini": [0.15, 0.6]}',
    )
    llm_cache_ttl_s: float = Field(default=86400.0, description="How long an answer is cached")
    llm_cache_shared: bool = Field(
        default=False,
        description="One cache for every user (more hits; a hit tells that someone asked the "
        "same); unset, each user's answers are cached for them alone",
    )
    redis_url: str | None = Field(
        default=None, description="Redis for the LLM response cache; unset means the database"
    )
    llm_rate_limit_per_minute: int = Field(
        default=120, description="LLM requests one user may make per minute (0: no limit)"
    )
    llm_max_concurrent_per_user: int = Field(
        default=8,
        ge=0,
        description="LLM calls one user may have in flight at once, over every process "
        "(0: no limit)",
    )
    llm_max_tokens: int = Field(
        default=32768,
        ge=1,
        description="Largest max_tokens / max_completion_tokens a chat completions request "
        "may ask for",
    )
    llm_task_token_budget: int = Field(
        default=500_000, description="Tokens one task may spend on LLM calls (0: no limit)"
    )
    spend_day_usd: float = Field(
        default=25.0,
        ge=0,
        description="LLM spending (USD, priced by BERTH_LLM_PRICES) one user may reach per UTC "
        "day before their calls are refused (0: no limit); an admin may set another per user",
    )
    spend_month_usd: float = Field(
        default=250.0,
        ge=0,
        description="LLM spending (USD) one user may reach per UTC calendar month (0: no "
        "limit); an admin may set another per user",
    )
    llm_timeout_s: float = Field(default=60.0, description="Longest one provider call may take")
    llm_retries: int = Field(
        default=2, description="Retries of a provider's transient error before the next provider"
    )
    llm_backoff_s: float = Field(default=0.5, description="First retry's wait, doubled each time")
    llm_cooldown_s: float = Field(
        default=30.0, description="How long a failed provider is tried only after the others"
    )

    # Operating it: metrics and logs
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How every process logs: text lines, or JSON lines with the ids of the "
        "session, task, step and trace each line is about",
    )
    metrics_token: str | None = Field(
        default=None,
        description="Bearer token that may read the API's /metrics (Prometheus); unset: only "
        "callers on the loopback address may",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's and the Temporal SDK's metrics listeners bind to",
    )
    worker_metrics_port: int = Field(
        default=0, ge=0, description="Port of a worker host's /metrics (Prometheus); 0: off"
    )
    temporal_metrics_port: int = Field(
        default=0,
        ge=0,
        description="Port of the worker's Temporal SDK metrics (Prometheus, its own listener); "
        "0: off",
    )

    # Webhooks (issue 24): each user's endpoints, told of their sessions' events
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhook endpoints resolve to loopback, link-local, private or other "
        "non-public addresses (off: refused, since a URL a user chooses would otherwise make "
        "the server reach its own network)",
    )
    webhook_max_endpoints: int = Field(default=10, ge=1, description="Webhook endpoints per user")
    webhook_max_attempts: int = Field(
        default=12,
        ge=1,
        description="Attempts at one webhook delivery (backing off from 2 s, doubling, at most "
        "10 min apart) before it is logged failed",
    )
    webhook_timeout_s: float = Field(
        default=10, gt=0, description="How long one webhook attempt may take"
    )
    webhook_dispatch_every_s: float = Field(
        default=1.0, gt=0, description="How often a worker starts the deliveries just written"
    )
    webhook_keep_days: float = Field(
        default=7,
        gt=0,
        description="How long a delivered or failed webhook delivery stays in its endpoint's "
        "log (with the body it sent)",
    )
    # --- Hands on the machine: the workspace's files from the API (issue 21) ---
    relay_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's relay (how the API reaches guests' files) listens on",
    )
    relay_port: int = Field(default=8767, description="Port of the worker's relay")
    files_max_upload_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=0,
        description="Largest file a person may upload into a session's workspace, in bytes",
    )
    files_max_archive_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Most bytes a folder's download (a zip) reads from the workspace",
    )
    preview_share_ttl_s: int = Field(
        default=24 * 3600,
        ge=60,
        description="How long a preview's share link opens it (until revoked sooner)",
    )
    preview_owner_ttl_s: int = Field(
        default=3600,
        ge=60,
        description="How long the URL an owner is sent on to opens their preview; a visit to "
        "/preview/{sid}/{port}/ makes a new one",
    )

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        for cert, key in (
            ("tls_cert_file", "tls_key_file"),
            ("gateway_cert_file", "gateway_key_file"),
            ("temporal_tls_cert_file", "temporal_tls_key_file"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(
                    f"set both or neither of BERTH_{cert.upper()}, BERTH_{key.upper()}"
                )
        return self

    @property
    def shared_dir(self) -> Path:
        """What the API and Temporal write (their databases, the artifacts the API serves, the
        API's secrets): under `make run` as root the one folder their user owns, while the
        data dir around it, and all else in it, stays root's (berth/privileges.py)."""
        return self.data_dir / "shared"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.shared_dir / 'berth.db').resolve()}"

    @property
    def api_scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    @property
    def artifacts_dir(self) -> Path:
        return self.shared_dir / "artifacts"

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def temporal_ui_base(self) -> str:
        return (self.temporal_ui_url or f"http://127.0.0.1:{self.temporal_ui_port}").rstrip("/")

    @property
    def warm_pool(self) -> bool:
        """Whether sessions claim VMs from warm pools (only VMs can change owner)."""
        return self.sandbox_provider == "libvirt" and self.vm_pool_max > 0

    @property
    def host_task_queue(self) -> str:
        return f"berth-host-{self.host_id}"


@lru_cache
def get_settings() -> Settings:
    return Settings()

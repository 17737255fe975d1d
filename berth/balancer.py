"""The load balancer in front of API replicas (``python -m berth run --api-replicas N``):
Debian's nginx, configured here, run by the supervisor as its own unprivileged process.

The API keeps nothing per process that a request needs from another one (limits and the
event streams' bells live in the database), so nginx spreads requests round robin. What it
must not do is buffer: an event stream (SSE) passes each event on as it comes, for as long
as the stream lasts, and WebSocket upgrades pass through. A replica that refuses connections
(killed, restarting) is skipped; a stream that was on it ends, and its client reconnects
with Last-Event-ID, on another replica, where it left off.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

NGINX = "nginx"
NGINX_FALLBACK = Path("/usr/sbin/nginx")  # Debian's, off an unprivileged user's PATH
STREAM_TIMEOUT = "1h"  # beyond a stream's lifetime; the API sends keep-alives meanwhile
REPLICA_HEADER = "X-Berth-Replica"  # which replica answered: api-1, api-2, ...


def nginx_binary() -> str:
    found = shutil.which(NGINX) or (str(NGINX_FALLBACK) if NGINX_FALLBACK.exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: run `make setup` (Debian package nginx)")
    return found


@dataclass(frozen=True)
class Balancer:
    """Where nginx listens, the replicas it spreads over, and its files: its configuration
    (``config_file``, in a folder of the supervisor's that nginx only reads) and what it
    writes (``folder``: its pid, error log, buffers; writable by the user it runs as)."""

    listen_host: str
    listen_port: int
    replicas: dict[str, int]  # name → loopback port
    config_file: Path
    folder: Path
    max_body_bytes: int
    tls: tuple[Path, Path] | None = None  # certificate and key: HTTPS in front and behind

    @property
    def error_log(self) -> Path:
        return self.folder / "error.log"

    def command(self) -> list[str]:
        return [
            nginx_binary(),
            "-p", str(self.folder),
            "-c", str(self.config_file),
            "-e", str(self.error_log),  # before the config is read too, not /var/log's
            "-g", "daemon off;",
        ]  # fmt: skip

    def config(self) -> str:
        scheme = "https" if self.tls else "http"
        listen = f"{self.listen_host}:{self.listen_port}"
        if ":" in self.listen_host:
            listen = f"[{self.listen_host}]:{self.listen_port}"
        servers = "\n".join(
            f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;"
            for port in self.replicas.values()
        )
        names = "\n".join(
            f"        127.0.0.1:{port} {name};" for name, port in self.replicas.items()
        )
        tmp = self.folder
        tls = ""
        if self.tls:
            cert, key = self.tls
            tls = (
                f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                # The replicas, on loopback, serve its certificate.
                "        proxy_ssl_verify off;\n"
            )
        return f"""# Written by `python -m berth run` (berth/balancer.py) at each start.
worker_processes 1;
pid {self.folder / "nginx.pid"};
error_log {self.error_log} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    # Every path nginx writes is in its folder (Debian's defaults are root's).
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # The API refuses larger bodies itself (BERTH_MAX_BODY_BYTES), saying why.
    client_max_body_size {self.max_body_bytes + 65536};
    server_tokens off;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';  # no upgrade: the connection to the replica stays open for the next request
    }}
    map $upstream_addr $berth_replica {{
        default '';
{names}
    }}
    upstream berth_api {{
{servers}
        keepalive 32;
    }}
    server {{
        listen {listen}{" ssl" if self.tls else ""};
{tls}        location / {{
            proxy_pass {scheme}://berth_api;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            # nginx is the edge: the client is whoever connected to it, not what it claims.
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            # Event streams: each event passed on at once, the stream held open.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_cache off;
            proxy_read_timeout {STREAM_TIMEOUT};
            proxy_send_timeout {STREAM_TIMEOUT};
            proxy_connect_timeout 2s;
            add_header {REPLICA_HEADER} $berth_replica always;
        }}
    }}
}}
"""

    def write(self) -> None:
        """The configuration, readable by the user nginx runs as (it holds no secret: the
        TLS key is a path)."""
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.parent.chmod(0o711)
        draft = self.config_file.with_name(f"{self.config_file.name}.new")
        draft.write_text(self.config())
        draft.chmod(0o644)
        draft.replace(self.config_file)

"""The guest's trust in its gateway: one certificate, pinned by its SHA-256 fingerprint.

The fingerprint comes with the guest's identity, from the host alone (the machine's
configuration: a container's, a VM's seed disk). No CA bundle is consulted, nor any host
name: the TLS handshake completes unverified, then the peer's certificate is compared with
the pin before a single byte of the guest's own (its hello, its token) is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from typing import Any

SECURE_SCHEME = "wss"
# Where the agent finds the pin (the host sets it with the agent's other settings). Not a
# secret, as it names a public certificate; and a step cannot change its agent's environment.
PIN_VARIABLE = "BERTH_GUEST_GATEWAY_SHA256"


class UntrustedGateway(ConnectionError):
    """The gateway's certificate is not the pinned one (a retry may find the real one)."""


def fingerprint(der: bytes) -> str:
    """A certificate's pin: the SHA-256 of its DER form, in lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def client_context() -> ssl.SSLContext:
    """TLS without CA verification: the pin, checked after the handshake, is the trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_peer(transport: Any, pin: str | None) -> None:
    """UntrustedGateway unless the connection's peer shows the pinned certificate (with no
    pin, no certificate is trusted)."""
    if not pin:
        raise UntrustedGateway("no pin for the gateway's certificate: refusing it")
    tls = transport.get_extra_info("ssl_object")
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    if der is None:
        raise UntrustedGateway("the gateway showed no certificate")
    seen = fingerprint(der)
    if not hmac.compare_digest(seen, pin.lower()):
        raise UntrustedGateway(f"the gateway's certificate {seen[:16]}... is not the pinned one")

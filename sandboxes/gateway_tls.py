"""The guest gateway's certificate: the operator's, or one generated once into the data dir
(berth/host.py keeps it there, under the file names below).

Guests do not trust it through any CA: each is given its SHA-256 fingerprint with its
identity (guest_agent/pinning.py). A generated certificate is self-signed, names the
addresses guests dial, and lasts ten years: replacing it would cut off every running
sandbox, whose pin is the old one.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from guest_agent.pinning import fingerprint

CERT_FILE = "gateway.crt"
KEY_FILE = "gateway.key"
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class GatewayCertificate:
    cert_file: Path
    key_file: Path

    @property
    def fingerprint(self) -> str:
        """The pin guests are given."""
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert_file.read_text()))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def self_signed(names: list[str]) -> tuple[bytes, bytes]:
    """A new self-signed certificate for ``names`` (addresses or host names) and its key,
    both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "berth guest gateway")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem

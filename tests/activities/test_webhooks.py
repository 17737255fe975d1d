"""Signing, the URL policy (SSRF), and sealed secrets of webhooks."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from activities.webhooks import Refused, check_address, check_url, sign
from config.keys import Keyring, seal, unseal


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    header = sign("whsec_x", 1767225600, '{"id":"d1"}')
    expected = hmac.new(b"whsec_x", b'1767225600.{"id":"d1"}', hashlib.sha256).hexdigest()
    assert header == f"t=1767225600,v1={expected}"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/h",
        "file:///etc/passwd",
        "https:///nohost",
        "https://user:pw@example.com/h",
    ],
)
def test_only_plain_http_urls_are_taken(url: str) -> None:
    with pytest.raises(Refused):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/h",
        "http://localhost/h",
        "http://10.1.2.3/h",
        "http://192.168.0.1/h",
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://[::1]/h",
        "http://[fe80::1]/h",
        "http://[::ffff:10.0.0.1]/h",
        "http://100.64.0.1/h",
        "http://0.0.0.0/h",
    ],
)
async def test_a_non_public_address_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(Refused, match="non-public"):
        await check_address(url, allow_private=False)
    await check_address(url, allow_private=True)


async def test_a_public_address_is_taken() -> None:
    await check_address("https://93.184.216.34/hooks", allow_private=False)


def test_a_sealed_secret_opens_with_its_key_also_after_a_rotation() -> None:
    old, new = Keyring((b"k" * 32,)), Keyring((b"n" * 32, b"k" * 32))
    sealed = seal(old, "whsec_secret")
    assert "whsec_secret" not in sealed
    assert unseal(old, sealed) == unseal(new, sealed) == "whsec_secret"
    with pytest.raises(ValueError, match="no longer"):
        unseal(Keyring((b"n" * 32,)), sealed)
    name, _, data = sealed.partition(".")
    altered = f"{name}.{data[:-4]}AAAA"
    with pytest.raises(ValueError):
        unseal(old, altered)

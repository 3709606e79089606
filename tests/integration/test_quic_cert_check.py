"""The QUIC listener checks a stored cert pair with qh3 (quic.qh3_pair_usable), the same
verdicts as certs.usable (cryptography) gives, so a bad pair is still replaced."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.transports import quic
from node.transports.certs import (
    CERT_FILE_NAME,
    KEY_FILE_NAME,
    generate_cert,
    load_or_create_cert,
    usable,
)


def _cert_expiring_in(days: int) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pfs")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


GOOD = generate_cert()
OTHER = generate_cert()
CASES = {
    "good": GOOD,
    "key of another cert": (GOOD[0], OTHER[1]),
    "two certificates": (GOOD[0] + OTHER[0], GOOD[1]),
    "garbage cert": (b"-----BEGIN CERTIFICATE-----\ngarbage\n", GOOD[1]),
    "garbage key": (GOOD[0], b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
    "not PEM": (b"junk", b"junk"),
    "expires in 10 days": _cert_expiring_in(10),
    "expires in 400 days": _cert_expiring_in(400),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_qh3_check_agrees_with_the_cryptography_check(case: str) -> None:
    cert_pem, key_pem = CASES[case]
    expected = case in ("good", "expires in 400 days")
    assert quic.qh3_pair_usable(cert_pem, key_pem) is expected
    if case != "two certificates":  # cryptography reads the first of the two
        assert usable(cert_pem, key_pem) is expected


def test_a_pair_the_qh3_check_refuses_is_replaced(tmp_path: Path) -> None:
    first = load_or_create_cert(tmp_path, check=quic.qh3_pair_usable)
    assert load_or_create_cert(tmp_path, check=quic.qh3_pair_usable) == first
    (tmp_path / KEY_FILE_NAME).write_bytes(OTHER[1])
    second = load_or_create_cert(tmp_path, check=quic.qh3_pair_usable)
    assert second != first and quic.qh3_pair_usable(*second)
    assert (tmp_path / CERT_FILE_NAME).read_bytes() == second[0]

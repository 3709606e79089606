"""The QUIC listener's self-signed certificate: created once, kept private, replaced if bad."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from node.transports.certs import CERT_FILE_NAME, KEY_FILE_NAME, generate_cert, load_or_create_cert


def test_created_in_home_with_private_key_mode(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cert_pem, key_pem = load_or_create_cert(home)
    assert stat.S_IMODE((home / KEY_FILE_NAME).stat().st_mode) == 0o600
    assert (home / CERT_FILE_NAME).read_bytes() == cert_pem
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.issuer == cert.subject  # self-signed


def test_reused_on_next_start(tmp_path: Path) -> None:
    assert load_or_create_cert(tmp_path) == load_or_create_cert(tmp_path)


def test_corrupt_or_mismatched_pair_is_replaced(tmp_path: Path) -> None:
    first = load_or_create_cert(tmp_path)
    (tmp_path / CERT_FILE_NAME).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    second = load_or_create_cert(tmp_path)
    assert second != first and x509.load_pem_x509_certificate(second[0])
    other_cert, _ = generate_cert()
    (tmp_path / CERT_FILE_NAME).write_bytes(other_cert)  # cert no longer matches the key
    third = load_or_create_cert(tmp_path)
    assert third != second
    assert load_or_create_cert(tmp_path) == third


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    load_or_create_cert(tmp_path)
    (tmp_path / KEY_FILE_NAME).chmod(0o644)
    load_or_create_cert(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600


def test_in_memory_without_home() -> None:
    assert load_or_create_cert(None) == load_or_create_cert(None)

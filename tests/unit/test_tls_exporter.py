"""Unit tests of node/transports/tls_exporter.py against the RFC 8448 §3 trace."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from node.transports.tls_exporter import (
    ExporterTap,
    expand_label,
    exporter_master_secret,
    tls_exporter,
)

# RFC 8448 §3 "Simple 1-RTT Handshake"
MASTER = bytes.fromhex("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
HASH_CH_TO_SF = bytes.fromhex("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
EXP_MASTER = bytes.fromhex("fe22f881176eda18eb8f44529e6792c50c9a3f89452f68d8ae311b4309d3cf50")
S_AP_TRAFFIC = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
S_AP_KEY = bytes.fromhex("9f02283b6c9c07efc26bb9f2ac92e356")


def test_expand_label_and_exporter_master_match_rfc_8448() -> None:
    sha = hashes.SHA256()
    assert expand_label(sha, MASTER, b"s ap traffic", HASH_CH_TO_SF, 32) == S_AP_TRAFFIC
    assert expand_label(sha, S_AP_TRAFFIC, b"key", b"", 16) == S_AP_KEY
    assert exporter_master_secret(sha, MASTER, HASH_CH_TO_SF) == EXP_MASTER


def test_exporter_is_rfc_8446_section_7_5() -> None:
    sha = hashes.SHA256()
    empty, ctx = hashlib.sha256(b"").digest(), hashlib.sha256(b"ctx").digest()
    derived = expand_label(sha, EXP_MASTER, b"EXPORTER-x", empty, 32)
    assert tls_exporter(sha, EXP_MASTER, b"EXPORTER-x", b"ctx", 32) == expand_label(
        sha, derived, b"exporter", ctx, 32)
    assert tls_exporter(sha, EXP_MASTER, b"EXPORTER-y", b"ctx", 32) != tls_exporter(
        sha, EXP_MASTER, b"EXPORTER-x", b"ctx", 32)


@dataclass
class FakeKeySchedule:
    """qh3's KeySchedule as the tap reads it: algorithm, secret, running transcript hash."""

    algorithm: int
    secret: bytes
    hash: object


class FixedHash:
    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    def copy(self) -> FixedHash:
        return self

    def digest(self) -> bytes:
        return self._digest


def test_tap_takes_the_rfc_trace_state_and_refuses_any_other() -> None:
    good = FakeKeySchedule(256, MASTER, FixedHash(HASH_CH_TO_SF))
    tap = ExporterTap()
    assert tap.export(b"EXPORTER-x", b"", 32) == b""  # nothing before the handshake
    assert tap.capture(good, S_AP_TRAFFIC) and tap.ready
    assert tap.export(b"EXPORTER-x", b"", 32) == tls_exporter(
        hashes.SHA256(), EXP_MASTER, b"EXPORTER-x", b"", 32)
    # a state that did not produce this secret (transcript moved on): no binding at all
    moved = FakeKeySchedule(256, MASTER, FixedHash(bytes(32)))
    late = ExporterTap()
    assert not late.capture(moved, S_AP_TRAFFIC) and not late.ready
    assert late.export(b"EXPORTER-x", b"", 32) == b""

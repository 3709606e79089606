"""The TLS 1.3 exporter (RFC 8446 §7.5) of a qh3 QUIC connection, for channel binding.

qh3 exposes no ``export_keying_material``, but its TLS 1.3 key schedule is plain
Python: at the moment it derives the server's application traffic secret
(``"s ap traffic"``, the first 1-RTT secret on both sides) its state holds the
master secret and the transcript hash of ClientHello..server Finished, which is
exactly what RFC 8446 §7.1 derives ``exporter_master_secret`` from. ``tap()``
wraps the connection's TLS traffic-key callback to take that value then (after
checking that the state re-derives the very "s ap traffic" secret it was handed,
so a qh3 that moved things gives no binding rather than a wrong one), and
``ExporterTap.export()`` is RFC 8446 §7.5 ``TLS-Exporter(label, context,
length)``. All HKDF through ``cryptography``; the RFC 8448 trace checks the
derivation (tests/unit/test_tls_exporter.py).

Imports only qh3 and cryptography; knows nothing of channels or identities.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from qh3 import tls as qh3_tls
from qh3.quic.connection import QuicConnection

log = logging.getLogger(__name__)

_HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    256: hashes.SHA256, 384: hashes.SHA384}


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def expand_label(algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes,
                 context: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 HKDF-Expand-Label."""
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + struct.pack(">B", len(context)) + context
    return HKDFExpand(algorithm, length, info).derive(secret)


def exporter_master_secret(algorithm: hashes.HashAlgorithm, master_secret: bytes,
                           transcript_hash: bytes) -> bytes:
    """Derive-Secret(Master Secret, "exp master", ClientHello..server Finished)."""
    return expand_label(algorithm, master_secret, b"exp master", transcript_hash,
                        algorithm.digest_size)


def tls_exporter(algorithm: hashes.HashAlgorithm, exporter_master: bytes, label: bytes,
                 context: bytes, length: int) -> bytes:
    """RFC 8446 §7.5: HKDF-Expand-Label(Derive-Secret(EMS, label, ""), "exporter",
    Hash(context), length)."""
    derived = expand_label(algorithm, exporter_master, label, _digest(algorithm, b""),
                           algorithm.digest_size)
    return expand_label(algorithm, derived, b"exporter", _digest(algorithm, context), length)


class ExporterTap:
    """The exporter master secret of one connection, once its handshake got that far."""

    def __init__(self) -> None:
        self._algorithm: hashes.HashAlgorithm | None = None
        self._secret = b""

    @property
    def ready(self) -> bool:
        return bool(self._secret)

    def capture(self, key_schedule: Any, server_app_secret: bytes) -> bool:
        """Take the exporter master secret from `key_schedule`, if its state is the one
        that produced `server_app_secret` ("s ap traffic"): then it holds exactly the master
        secret and the ClientHello..server Finished hash. Otherwise take nothing."""
        make = _HASHES.get(int(key_schedule.algorithm))
        if make is None:  # a cipher suite qh3 might add; no binding rather than a wrong one
            log.warning("TLS key schedule with SHA-%s: no exporter", key_schedule.algorithm)
            return False
        algorithm = make()
        master, transcript = key_schedule.secret, key_schedule.hash.copy().digest()
        if expand_label(algorithm, master, b"s ap traffic", transcript,
                        algorithm.digest_size) != server_app_secret:
            log.warning("qh3's key schedule is not where RFC 8446 puts it: no TLS exporter")
            return False
        self._algorithm = algorithm
        self._secret = exporter_master_secret(algorithm, master, transcript)
        return True

    def export(self, label: bytes, context: bytes, length: int) -> bytes:
        """TLS-Exporter(label, context, length); b"" before the handshake derived it."""
        if self._algorithm is None or not self._secret:
            return b""
        return tls_exporter(self._algorithm, self._secret, label, context, length)


def tap(quic: QuicConnection) -> ExporterTap:
    """Install the capture on `quic` before its TLS handshake starts; returns the tap."""
    exporter = ExporterTap()
    create_tls = getattr(quic, "_create_tls", None)
    if create_tls is None:  # another qh3 layout: the caller sees exporter.ready False
        log.warning("this qh3 has no TLS context hook: QUIC channels are not bound")
        return exporter

    def create_tls_tapped(*args: Any, **kwargs: Any) -> Any:
        bridge = create_tls(*args, **kwargs)
        context = bridge.tls
        on_secret = context.update_traffic_key_cb

        def on_secret_tapped(direction: Any, epoch: Any, cipher_suite: Any,
                             secret: bytes) -> None:
            # the first 1-RTT secret is "s ap traffic" on both sides: right after the
            # master secret's extraction, with the transcript at server Finished
            if epoch == qh3_tls.Epoch.ONE_RTT and not exporter.ready:
                exporter.capture(context.key_schedule, secret)
            on_secret(direction, epoch, cipher_suite, secret)

        context.update_traffic_key_cb = on_secret_tapped
        return bridge

    quic._create_tls = create_tls_tapped  # type: ignore[method-assign]
    return exporter

"""The self-signed TLS certificate a node presents on its QUIC listener.

QUIC requires TLS 1.3, and TLS requires the server to present a certificate.
p2pfs does not use that certificate for identity: clients connect with
certificate verification off, and the peer is authenticated by the p2pfs
handshake (node/secure.py) that runs over the pipe. The certificate only lets
the TLS layer complete; it is generated once per node (ECDSA P-256, the key
type every QUIC library accepts) and kept in the home dir, key file mode 0600.

Uses the `cryptography` package (only X.509 generation and PEM encoding; no
protocol crypto is done here), imported only to generate or check a pair with
it: ``load_or_create_cert`` takes the check as a parameter, so the QUIC
transport checks a stored pair with the TLS library it has loaded anyway (qh3)
and a node that finds its pair in the home never touches cryptography's X.509
code (about 1.5 MB of resident memory for generating, 0.9 MB for checking).
``ensure_cert`` creates the pair ahead of time: `node start` calls it before it
execs the daemon (node/daemon_main.py), so even a node's first start does not
pay for generating it in the long-running process.

Imports nothing of the project except errors;
must not import transports, identity, trust or anything higher.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from node.errors import LocalIOError

CERT_FILE_NAME = "quic-cert.pem"
KEY_FILE_NAME = "quic-key.pem"
CERT_VALIDITY_DAYS = 3650
# regenerate when less than this is left, so a long-running node never serves an expired cert
CERT_RENEW_BEFORE_DAYS = 30
MAX_PEM_FILE_BYTES = 64 * 1024

# (cert_pem, key_pem) -> True if the pair may be served: it parses, the key matches, and
# more than CERT_RENEW_BEFORE_DAYS are left
PairCheck = Callable[[bytes, bytes], bool]

_memory_cert: tuple[bytes, bytes] | None = None


def generate_cert(common_name: str = "p2pfs") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate and its private key, both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def renew_after_s() -> float:
    """A pair whose certificate expires before this Unix time is replaced."""
    return (datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(days=CERT_RENEW_BEFORE_DAYS)).timestamp()


def usable(cert_pem: bytes, key_pem: bytes) -> bool:
    """The check with `cryptography` (any caller; QUIC passes its own, see the docstring)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return same_key and cert.not_valid_after_utc.timestamp() > renew_after_s()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with `mode` set before any byte is written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_or_create_cert(home: Path | None, check: PairCheck = usable) -> tuple[bytes, bytes]:
    """(cert_pem, key_pem) for this node's QUIC listener.

    With a home dir, the pair is read from (or created in) ``home/quic-cert.pem``
    and ``home/quic-key.pem`` (mode 0600); an unreadable, mismatched or nearly
    expired pair is replaced (``check`` decides; a pair it refuses is checked
    again with ``usable`` before it is replaced, so a narrower check never
    discards a good pair). Without one (tests, benchmarks), one in-memory pair
    is generated per process.
    """
    global _memory_cert
    if home is None:
        if _memory_cert is None:
            _memory_cert = generate_cert()
        return _memory_cert
    cert_path, key_path = home / CERT_FILE_NAME, home / KEY_FILE_NAME
    try:
        if (cert_path.is_file() and key_path.is_file()
                and max(cert_path.stat().st_size, key_path.stat().st_size) <= MAX_PEM_FILE_BYTES):
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
            if check(cert_pem, key_pem) or (check is not usable and usable(cert_pem, key_pem)):
                if key_path.stat().st_mode & 0o077:
                    os.chmod(key_path, 0o600)
                return cert_pem, key_pem
        home.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = generate_cert()
        _write_private(key_path, key_pem, 0o600)
        _write_private(cert_path, cert_pem, 0o600)  # everything in the home is 0600
        return cert_pem, key_pem
    except OSError as exc:
        raise LocalIOError(f"cannot read or write the QUIC certificate in {home}: {exc}") from None


def ensure_cert(home: Path) -> None:
    """Create the home's pair now if it has none (a stored pair is not checked here)."""
    try:
        present = (home / CERT_FILE_NAME).is_file() and (home / KEY_FILE_NAME).is_file()
    except OSError as exc:
        raise LocalIOError(f"cannot read the QUIC certificate in {home}: {exc}") from None
    if not present:
        load_or_create_cert(home)

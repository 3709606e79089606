"""Authenticated key exchange (SIGMA-I, 3 messages) and frame encryption. Sans-IO.

This module is a pure state machine: bytes in, bytes out. It must not import
sockets, asyncio, transports, trust, or anything above ``identity``/``wire``;
randomness comes from an injectable ``rand`` callable so tests can pin it.

Handshake, protocol version 2 (all messages are ``node.wire`` messages, every
field bounded)::

    msg1  I -> R  clear      ["hs1", 2, "p2pfs-secure", [versions], [aeads_I], e_I, nonce_I]
    msg2  R -> I  clear part ["hs2", 2, version, aead, [aeads_R], e_R, box_R]
                  box_R  = AEAD(k_hs_R2I, aad=T2, [S_R, name_R, sig_R])
                  sig_R  = Sign_R(["p2pfs-sig-R", T2, e_I, e_R, version, S_R, name_R])
    msg3  I -> R  encrypted  ["hs3", 1, box_I]
                  box_I  = AEAD(k_hs_I2R, aad=T3, [S_I, name_I, sig_I])
                  sig_I  = Sign_I(["p2pfs-sig-I", T3, e_I, e_R, version, S_R, S_I, name_I])

``e_*`` are fresh X25519 (crypto_kx) keys, ``S_*`` the static Ed25519 keys.
The transcript hash runs over every message byte-exactly:
``T1 = H(label || msg1)``,
``T2 = H(T1 || msgpack([version, aead, aeads_R, e_R, binding]))``,
``T3 = H(T2 || box_R)``, ``T4 = H(T3 || msg3)`` with H = blake2b-256
(personalised). crypto_kx over the ephemerals gives one key per direction;
every derived key is ``blake2b(key=kx_key, data=T, person=purpose)``, so
handshake keys are bound to T2/T3 and the traffic secrets to the full
transcript T4 (both identities). Ephemeral secrets are dropped as soon as the
keys are derived (forward secrecy). The handshake itself is libsodium only
(X25519, Ed25519, blake2b, and XChaCha20-Poly1305 for the two identity boxes,
each key used once).

AEAD negotiation: each side offers the frame AEADs it wants, best first
(``local_aeads()``: ``aes256gcm`` then ``chacha20poly1305`` where the CPU has
AES instructions, ``chacha20poly1305`` alone where it has not;
``P2PFS_AEAD=aes256gcm|chacha20poly1305`` forces one). The responder picks the
first entry of the initiator's list that it offers too, and the initiator
checks that it did. The initiator's list is in T1 (msg1), the choice and the
responder's list in T2, and both signatures cover T2, so a man in the middle
who strips AES from a list (a downgrade) breaks both signatures. No common AEAD
or no common version: the responder refuses in clear text
(``hs-abort``) with "peer speaks protocol vN, this node vM" or the two lists.
A version-1 peer cannot read a version-2 hello and says so; both sides turn
that into the same clear error.

Channel binding: over QUIC the caller passes the connection's RFC 8446 §7.5
TLS exporter value as ``channel_binding``; it enters T2, so a handshake
relayed onto another QUIC connection (another exporter) fails, and frames are
then *not* encrypted a second time (QUIC's TLS 1.3 already protects, orders and
authenticates them). Over tcp and udp the binding is empty and frames are
encrypted as below.

Frames, as TLS 1.3 records (RFC 8446 §5.3, §7.1-7.2): each direction has a
traffic secret from the handshake. Its key epoch ``n`` uses
``key_n = ExpandLabel(secret_n, "key", 32)`` and
``iv_n = ExpandLabel(secret_n, "iv", 12)``; frame ``c`` of the epoch (``c``
from 0) has nonce ``iv_n XOR u96be(c)`` and is ``ciphertext || tag`` (16
bytes overhead, no associated data, nothing else on the wire). ExpandLabel is
TLS 1.3's HKDF-Expand-Label with HKDF-SHA-256 from ``cryptography`` and the
label prefix ``"p2pfs "`` instead of ``"tls13 "``. Key update is implicit: a
direction moves to ``secret_{n+1} = ExpandLabel(secret_n, "traffic upd", 32)``
(and the counter back to 0) right after the frame that brings its epoch to
KEY_UPDATE_FRAMES frames or KEY_UPDATE_BYTES plaintext bytes. Both sides count
the same frames over a reliable, ordered pipe, so no message is needed and
nothing can desync; the old key is forgotten, so a frame from an earlier epoch
never opens again. Any frame that fails to open (forged, replayed, reordered,
truncated) raises ProtocolError and kills the session.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.hash
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from nacl.encoding import RawEncoder

from node.errors import ConfigError, HandshakeError, ProtocolError
from node.identity import MAX_NAME_LEN, PUBKEY_LEN_BYTES, Identity, PeerId
from node.wire import Message, bound, decode_message, message, packb, unpackb

log = logging.getLogger(__name__)

PROTOCOL_NAME = "p2pfs-secure"
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)
MAX_OFFERED_VERSIONS = 8
MAX_VERSION = 65535
EPHEMERAL_LEN_BYTES = sodium.crypto_kx_PUBLIC_KEY_BYTES  # 32
NONCE_LEN_BYTES = 32
SIGNATURE_LEN_BYTES = 64
HASH_LEN_BYTES = 32
KEY_LEN_BYTES = 32
HS_NONCE_LEN_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
FRAME_IV_LEN_BYTES = 12
FRAME_OVERHEAD_BYTES = 16  # the AEAD tag; 0 on a QUIC-bound session
# sealed identity box: msgpack [32-byte key, name <= 64 bytes, 64-byte sig] + tag
MAX_BOX_BYTES = 256
MAX_HANDSHAKE_MSG_BYTES = 512
MAX_ABORT_REASON_BYTES = 200
CHANNEL_BINDING_LEN_BYTES = 32

# frame AEADs, by their wire names
AEAD_AES256GCM = "aes256gcm"
AEAD_CHACHA20POLY1305 = "chacha20poly1305"
KNOWN_AEADS: tuple[str, ...] = (AEAD_AES256GCM, AEAD_CHACHA20POLY1305)
MAX_OFFERED_AEADS = 8
MAX_AEAD_NAME_BYTES = 24
AEAD_ENV_VAR = "P2PFS_AEAD"
_AEAD_ALIASES = {
    "aes256gcm": (AEAD_AES256GCM,), "aes-256-gcm": (AEAD_AES256GCM,), "aes": (AEAD_AES256GCM,),
    "chacha20poly1305": (AEAD_CHACHA20POLY1305,), "chacha20-poly1305": (AEAD_CHACHA20POLY1305,),
    "chacha20": (AEAD_CHACHA20POLY1305,), "chacha": (AEAD_CHACHA20POLY1305,),
}
CPUINFO_PATH = "/proc/cpuinfo"

# implicit key update per direction (TLS 1.3 KeyUpdate without the message): far below
# AES-GCM's per-key limits (RFC 8446 §5.5, 2^24.5 full-size records) and the 2^96 nonces
KEY_UPDATE_FRAMES = 2**20
KEY_UPDATE_BYTES = 2**30

_HS_PERSON_TRANSCRIPT = b"p2pfs-transcript"
_LABEL_SIG_R = "p2pfs-sig-R"
_LABEL_SIG_I = "p2pfs-sig-I"
_LABEL_PREFIX = b"p2pfs "
_ZERO_HS_NONCE = bytes(HS_NONCE_LEN_BYTES)

Rand = Callable[[int], bytes]
Buffer = bytes | bytearray | memoryview
_AEAD_CLASSES: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {
    AEAD_AES256GCM: AESGCM, AEAD_CHACHA20POLY1305: ChaCha20Poly1305}


# ---------------------------------------------------------------------------
# which AEADs this node offers


def cpu_has_aes(cpuinfo: str) -> bool:
    """True when /proc/cpuinfo text lists the AES instructions (x86 ``flags``, arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features") and "aes" in value.split():
            return True
    return False


@functools.lru_cache(maxsize=1)
def _hardware_aes() -> bool:
    try:
        with open(CPUINFO_PATH, encoding="ascii", errors="replace") as f:
            return cpu_has_aes(f.read())
    except OSError:  # no /proc (not Linux): ChaCha20-Poly1305 is fast everywhere
        return False


def local_aeads(env: Mapping[str, str] | None = None,
                hardware_aes: bool | None = None) -> tuple[str, ...]:
    """The frame AEADs this node offers, best first (see the module docstring)."""
    env = os.environ if env is None else env
    forced = env.get(AEAD_ENV_VAR, "").strip().lower()
    if forced and forced != "auto":
        if forced not in _AEAD_ALIASES:
            raise ConfigError(f"{AEAD_ENV_VAR}={forced[:40]!r}: use auto, "
                              f"{AEAD_AES256GCM} or {AEAD_CHACHA20POLY1305}")
        return _AEAD_ALIASES[forced]
    aes = _hardware_aes() if hardware_aes is None else hardware_aes
    return (AEAD_AES256GCM, AEAD_CHACHA20POLY1305) if aes else (AEAD_CHACHA20POLY1305,)


def _check_aead_offer(aeads: tuple[str, ...]) -> tuple[str, ...]:
    if not aeads or any(a not in KNOWN_AEADS for a in aeads):
        raise ValueError(f"offered AEADs must be a non-empty subset of {list(KNOWN_AEADS)}")
    return tuple(aeads)


# ---------------------------------------------------------------------------
# key schedule of the frames (HKDF-SHA-256 from cryptography)


def expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label (RFC 8446 §7.1) with an empty context and prefix ``p2pfs ``."""
    full = _LABEL_PREFIX + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def frame_key_iv(secret: bytes) -> tuple[bytes, bytes]:
    return (expand_label(secret, b"key", KEY_LEN_BYTES),
            expand_label(secret, b"iv", FRAME_IV_LEN_BYTES))


def next_traffic_secret(secret: bytes) -> bytes:
    return expand_label(secret, b"traffic upd", KEY_LEN_BYTES)


# ---------------------------------------------------------------------------
# messages


def _small_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION


def _check_aead_list(what: str, aeads: tuple[Any, ...]) -> None:
    if not aeads or not all(
        isinstance(a, str) and 0 < len(a.encode("utf-8", "surrogatepass")) <= MAX_AEAD_NAME_BYTES
        for a in aeads
    ):
        raise HandshakeError(f"{what}: the AEAD list must hold short names")


@message("hs1", version=PROTOCOL_VERSION)
class Hello(Message):
    protocol: str = field(metadata=bound(max_len=32))
    versions: tuple = field(metadata=bound(max_len=MAX_OFFERED_VERSIONS))  # type: ignore[type-arg]
    aeads: tuple = field(metadata=bound(max_len=MAX_OFFERED_AEADS))  # type: ignore[type-arg]
    ephemeral: bytes = field(metadata=bound(max_len=EPHEMERAL_LEN_BYTES))
    nonce: bytes = field(metadata=bound(max_len=NONCE_LEN_BYTES))

    def validate(self) -> None:
        if self.protocol != PROTOCOL_NAME:
            raise HandshakeError(f"peer speaks {self.protocol[:32]!r}, not {PROTOCOL_NAME!r}")
        if not self.versions or not all(_small_int(v) for v in self.versions):
            raise HandshakeError("hello: the version list must hold small integers")
        _check_aead_list("hello", self.aeads)
        _exact_len("hello.ephemeral", self.ephemeral, EPHEMERAL_LEN_BYTES)
        _exact_len("hello.nonce", self.nonce, NONCE_LEN_BYTES)


@message("hs2", version=PROTOCOL_VERSION)
class HelloReply(Message):
    version: int = field(metadata=bound(max_val=MAX_VERSION))
    aead: str = field(metadata=bound(max_len=MAX_AEAD_NAME_BYTES))
    aeads: tuple = field(metadata=bound(max_len=MAX_OFFERED_AEADS))  # type: ignore[type-arg]
    ephemeral: bytes = field(metadata=bound(max_len=EPHEMERAL_LEN_BYTES))
    box: bytes = field(metadata=bound(max_len=MAX_BOX_BYTES))

    def validate(self) -> None:
        _check_aead_list("reply", self.aeads)
        _exact_len("reply.ephemeral", self.ephemeral, EPHEMERAL_LEN_BYTES)


@message("hs3")
class Finish(Message):
    box: bytes = field(metadata=bound(max_len=MAX_BOX_BYTES))


@message("hs-abort")
class HandshakeAbort(Message):
    """Clear-text refusal before keys exist (e.g. no common version). Unauthenticated."""

    reason: str = field(metadata=bound(max_len=MAX_ABORT_REASON_BYTES))


def _exact_len(what: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise HandshakeError(f"{what} must be {n} bytes, got {len(value)}")


def _version_mismatch(theirs: Any, ours: tuple[int, ...]) -> HandshakeError:
    peer = max((v for v in theirs if _small_int(v)), default=0)
    return HandshakeError(f"peer speaks protocol v{peer}, this node v{max(ours)}; "
                          "both nodes need the same p2pfs protocol version")


def _legacy_hello_versions(data: bytes) -> tuple[int, ...] | None:
    """The version list of an older node's hello (``["hs1", 1, name, [versions], ...]``)."""
    try:
        obj = unpackb(bytes(data), max_bytes=MAX_HANDSHAKE_MSG_BYTES)
    except ProtocolError:
        return None
    if (isinstance(obj, list) and len(obj) >= 4 and obj[0] == "hs1" and obj[1] != PROTOCOL_VERSION
            and obj[2] == PROTOCOL_NAME and isinstance(obj[3], list)
            and 0 < len(obj[3]) <= MAX_OFFERED_VERSIONS and all(_small_int(v) for v in obj[3])):
        return tuple(obj[3])
    return None


# what a version-1 responder answers to our version-2 hello
_LEGACY_REFUSAL = "hs1: unsupported version"


# ---------------------------------------------------------------------------
# handshake primitives (all libsodium through pynacl)


def _hash(data: bytes, *, key: bytes = b"", person: bytes = _HS_PERSON_TRANSCRIPT) -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=HASH_LEN_BYTES, key=key, person=person[:16], encoder=RawEncoder
    )


def _derive(kx_key: bytes, transcript: bytes, purpose: bytes) -> bytes:
    """A 32-byte key bound to the transcript: keyed blake2b, personalised per purpose."""
    return _hash(transcript, key=kx_key, person=purpose)


def _seal_box(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    # each handshake key encrypts exactly one box, so a zero nonce is safe
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, _ZERO_HS_NONCE, key)


def _open_box(key: bytes, aad: bytes, box: bytes, who: str) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(box, aad, _ZERO_HS_NONCE, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise HandshakeError(
            f"{who}'s handshake message failed to decrypt (tampered, a man in the middle, "
            "or relayed from another connection)"
        ) from None


def _parse_identity_box(plain: bytes, who: str) -> tuple[PeerId, str, bytes]:
    obj: Any = unpackb(plain, max_bytes=MAX_BOX_BYTES)
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not isinstance(obj[0], bytes)
        or len(obj[0]) != PUBKEY_LEN_BYTES
        or not isinstance(obj[1], str)
        or len(obj[1].encode("utf-8", "surrogatepass")) > MAX_NAME_LEN
        or not isinstance(obj[2], bytes)
        or len(obj[2]) != SIGNATURE_LEN_BYTES
    ):
        raise HandshakeError(f"{who}'s identity block is malformed")
    return PeerId(obj[0]), obj[1], obj[2]


def _display_name(name: str) -> str:
    """A peer-chosen name is shown to users: keep it only if printable."""
    return name if name.isprintable() else ""


def _decode(data: bytes, expect: tuple[type[Message], ...]) -> Message:
    if not isinstance(data, (bytes, bytearray)):
        raise HandshakeError("handshake message must be bytes")
    if len(data) > MAX_HANDSHAKE_MSG_BYTES:
        raise HandshakeError(
            f"handshake message of {len(data)} bytes exceeds {MAX_HANDSHAKE_MSG_BYTES}"
        )
    try:
        return decode_message(bytes(data), expect=expect, max_bytes=MAX_HANDSHAKE_MSG_BYTES)
    except HandshakeError:
        raise
    except ProtocolError as exc:
        raise HandshakeError(f"malformed handshake message: {exc}") from None


def _check_binding(binding: bytes) -> bytes:
    if len(binding) not in (0, CHANNEL_BINDING_LEN_BYTES):
        raise ValueError(f"channel binding must be empty or {CHANNEL_BINDING_LEN_BYTES} bytes")
    return bytes(binding)


def _t2(t1: bytes, version: int, aead: str, r_aeads: tuple[str, ...], e_r: bytes,
        binding: bytes) -> bytes:
    return _hash(t1 + packb([version, aead, list(r_aeads), e_r, binding]))


# ---------------------------------------------------------------------------
# session (frame crypto)


class SessionState(enum.Enum):
    OPEN = "open"
    DEAD = "dead"


@dataclass(slots=True)
class _Direction:
    """One direction's key epoch: the AEAD under the current key and what it has done."""

    secret: bytes
    cipher: AESGCM | ChaCha20Poly1305 | None
    iv: int
    epoch: int = 0
    frames: int = 0  # frames sealed/opened under this key = the next nonce counter
    octets: int = 0  # plaintext bytes under this key
    total_frames: int = 0


class Session:
    """Frame protection for one established channel. Not thread-safe; one per channel."""

    def __init__(self, *, peer: PeerId, peer_name: str, version: int, transcript_hash: bytes,
                 aead: str, send_secret: bytes, recv_secret: bytes,
                 encrypt_frames: bool = True, key_update_frames: int | None = None,
                 key_update_bytes: int | None = None) -> None:
        if aead not in _AEAD_CLASSES:
            raise ValueError(f"unknown frame AEAD {aead!r}")
        self.peer = peer
        self.peer_name = peer_name
        self.version = version
        self.transcript_hash = transcript_hash
        self.aead = aead
        self.frames_encrypted = encrypt_frames
        self.overhead_bytes = FRAME_OVERHEAD_BYTES if encrypt_frames else 0
        # read at construction so tests can shrink the limits for a whole channel
        self._limit_frames = KEY_UPDATE_FRAMES if key_update_frames is None else key_update_frames
        self._limit_bytes = KEY_UPDATE_BYTES if key_update_bytes is None else key_update_bytes
        if not 1 <= self._limit_frames <= 2**64 or self._limit_bytes < 1:
            raise ValueError("key update limits must be positive (frames at most 2^64)")
        self._aead_class = _AEAD_CLASSES[aead]
        self._send = self._direction(send_secret)
        self._recv = self._direction(recv_secret)
        self.state = SessionState.OPEN
        self.failure = ""

    @property
    def protection(self) -> str:
        """What protects frames, for logs: the AEAD, or the QUIC connection they are bound to."""
        return self.aead if self.frames_encrypted else "QUIC TLS 1.3 (bound, no second AEAD)"

    @property
    def send_epoch(self) -> int:
        return self._send.epoch

    @property
    def recv_epoch(self) -> int:
        return self._recv.epoch

    def _direction(self, secret: bytes) -> _Direction:
        if not self.frames_encrypted:
            return _Direction(secret=b"", cipher=None, iv=0)
        key, iv = frame_key_iv(secret)
        return _Direction(secret=secret, cipher=self._aead_class(key),
                          iv=int.from_bytes(iv, "big"))

    def _advance(self, d: _Direction, plaintext_len: int) -> None:
        """Count one frame; move to the next key epoch at the limits (implicit KeyUpdate)."""
        d.frames += 1
        d.octets += plaintext_len
        d.total_frames += 1
        if d.cipher is not None and (d.frames >= self._limit_frames
                                     or d.octets >= self._limit_bytes):
            d.secret = next_traffic_secret(d.secret)
            key, iv = frame_key_iv(d.secret)
            d.cipher = self._aead_class(key)
            d.iv = int.from_bytes(iv, "big")
            d.epoch += 1
            d.frames = d.octets = 0

    @staticmethod
    def _nonce(d: _Direction) -> bytes:
        return (d.iv ^ d.frames).to_bytes(FRAME_IV_LEN_BYTES, "big")

    def _check_open(self) -> None:
        if self.state is not SessionState.OPEN:
            raise ProtocolError(f"the session is dead ({self.failure})")

    def _kill(self, reason: str) -> None:
        if self.state is SessionState.OPEN:
            log.debug("session with %s: %s -> dead (%s)", self.peer.short, self.state.value, reason)
        self.state = SessionState.DEAD
        self.failure = reason
        for d in (self._send, self._recv):
            d.secret, d.cipher = b"", None

    def _check_recv(self, frame_len: int) -> _Direction:
        self._check_open()
        if frame_len < self.overhead_bytes:
            self._kill("truncated frame")
            raise ProtocolError(
                f"frame of {frame_len} bytes is shorter than its "
                f"{FRAME_OVERHEAD_BYTES}-byte tag (truncated)"
            )
        return self._recv

    def _auth_failed(self) -> ProtocolError:
        n = self._recv.total_frames
        self._kill(f"frame {n} failed authentication")
        return ProtocolError(
            f"frame {n} from {self.peer.short} failed authentication "
            "(forged, replayed, reordered or truncated); channel closed"
        )

    def seal(self, plaintext: Buffer) -> bytes:
        """The next frame (``ciphertext || tag``) as new bytes."""
        self._check_open()
        d = self._send
        if d.cipher is None:
            frame = plaintext if type(plaintext) is bytes else bytes(plaintext)
        else:
            frame = d.cipher.encrypt(self._nonce(d), plaintext, None)
        self._advance(d, len(plaintext))
        return frame

    def seal_into(self, plaintext: Buffer, out: bytearray | memoryview, offset: int = 0) -> int:
        """Write the next frame into ``out[offset:offset + len(plaintext) + overhead]``; its length.

        The same frame ``seal`` would return, without allocating it; ``out`` must
        not overlap ``plaintext``.
        """
        n = len(plaintext) + self.overhead_bytes
        if offset < 0 or len(out) - offset < n:
            raise ValueError(f"seal_into: {len(out) - offset} bytes of room, need {n}")
        self._check_open()
        d = self._send
        with memoryview(out) as view:
            if d.cipher is None:
                view[offset:offset + n] = plaintext
            else:
                d.cipher.encrypt_into(self._nonce(d), plaintext, None, view[offset:offset + n])
        self._advance(d, len(plaintext))
        return n

    def open(self, ciphertext: Buffer) -> bytes:
        """The plaintext of the next frame, as new bytes; ProtocolError kills the session."""
        d = self._check_recv(len(ciphertext))
        if d.cipher is None:
            plain = ciphertext if type(ciphertext) is bytes else bytes(ciphertext)
        else:
            try:
                plain = d.cipher.decrypt(self._nonce(d), ciphertext, None)
            except InvalidTag:
                raise self._auth_failed() from None
        self._advance(d, len(plain))
        return plain

    def open_in_place(self, frame: bytearray) -> bytearray:
        """Open the next frame by decrypting it over itself; returns ``frame`` minus its tag.

        For a buffer the caller owns outright (no copy of a large frame); on
        failure the frame is wiped and ProtocolError kills the session.
        """
        d = self._check_recv(len(frame))
        n = len(frame) - self.overhead_bytes
        if d.cipher is not None:
            with memoryview(frame) as view:
                try:  # OpenSSL decrypts in place (out == in); the tag is checked at the end
                    d.cipher.decrypt_into(self._nonce(d), view, None, view[:n])
                except InvalidTag:
                    view[:] = bytes(len(view))  # no unauthenticated plaintext left behind
                    raise self._auth_failed() from None
        self._advance(d, n)
        if not self.overhead_bytes:
            return frame
        try:
            del frame[n:]
        except BufferError:  # someone holds a view of it: hand out a copy instead
            return bytearray(memoryview(frame)[:n])
        return frame

    def close(self) -> None:
        self._kill("closed")

    def __repr__(self) -> str:
        return f"Session(peer={self.peer.short}, {self.protection}, state={self.state.value})"


# ---------------------------------------------------------------------------
# handshake machines


class InitiatorState(enum.Enum):
    NEW = "new"
    HELLO_SENT = "hello-sent"
    DONE = "done"
    FAILED = "failed"


class ResponderState(enum.Enum):
    NEW = "new"
    REPLY_SENT = "reply-sent"
    DONE = "done"
    FAILED = "failed"


def _transition(machine: Any, expected: enum.Enum, new: enum.Enum) -> None:
    if machine.state is not expected:
        raise HandshakeError(
            f"{type(machine).__name__}: cannot go {machine.state.value} -> {new.value} "
            f"(expected state {expected.value})"
        )
    log.debug("%s: %s -> %s", type(machine).__name__, machine.state.value, new.value)
    machine.state = new


class InitiatorHandshake:
    """The connecting side. ``start()`` -> msg1; ``receive(msg2)`` -> (msg3, Session).

    ``aeads``: the frame AEADs offered, best first (default ``local_aeads()``);
    ``channel_binding``: the QUIC connection's TLS exporter value, or empty.
    """

    def __init__(self, identity: Identity, *, expected_peer: PeerId | None = None,
                 rand: Rand = nacl.utils.random,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                 aeads: tuple[str, ...] | None = None,
                 channel_binding: bytes = b"") -> None:
        self._identity = identity
        self._expected = expected_peer
        self._rand = rand
        self._versions = versions
        self._aeads = _check_aead_offer(local_aeads() if aeads is None else aeads)
        self._binding = _check_binding(channel_binding)
        self.state = InitiatorState.NEW
        self._eph_pk = b""
        self._eph_sk = b""
        self._t1 = b""

    def start(self) -> bytes:
        _transition(self, InitiatorState.NEW, InitiatorState.HELLO_SENT)
        self._eph_pk, self._eph_sk = sodium.crypto_kx_seed_keypair(
            self._rand(sodium.crypto_kx_SEED_BYTES)
        )
        msg1 = Hello(PROTOCOL_NAME, tuple(self._versions), self._aeads, self._eph_pk,
                     self._rand(NONCE_LEN_BYTES)).encode()
        self._t1 = _hash(PROTOCOL_NAME.encode() + msg1)
        return msg1

    def receive(self, msg2: bytes) -> tuple[bytes, Session]:
        if self.state is not InitiatorState.HELLO_SENT:
            _transition(self, InitiatorState.HELLO_SENT, InitiatorState.DONE)  # raises
        try:
            result = self._receive(msg2)
        except Exception:
            self.state = InitiatorState.FAILED
            self._eph_sk = b""
            raise
        _transition(self, InitiatorState.HELLO_SENT, InitiatorState.DONE)
        return result

    def _receive(self, msg2: bytes) -> tuple[bytes, Session]:
        reply = _decode(msg2, (HelloReply, HandshakeAbort))
        if isinstance(reply, HandshakeAbort):
            if _LEGACY_REFUSAL in reply.reason:
                raise HandshakeError(
                    f"peer speaks protocol v1, this node v{max(self._versions)}; both nodes "
                    f"need the same p2pfs protocol version (peer said: {reply.reason})")
            raise HandshakeError(f"peer refused the handshake: {reply.reason}")
        assert isinstance(reply, HelloReply)
        if reply.version not in self._versions:
            raise HandshakeError(
                f"peer chose protocol version {reply.version}, which we did not offer "
                f"(we support {list(self._versions)})"
            )
        expected_aead = next((a for a in self._aeads if a in reply.aeads), None)
        if reply.aead != expected_aead:
            raise HandshakeError(
                f"peer chose frame AEAD {reply.aead[:MAX_AEAD_NAME_BYTES]!r}, but the first "
                f"of ours {list(self._aeads)} that it offers is {expected_aead!r}"
            )
        e_i, e_r, version, aead = self._eph_pk, reply.ephemeral, reply.version, reply.aead
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(e_i, self._eph_sk, e_r)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise HandshakeError("peer sent an invalid ephemeral key") from None
        self._eph_sk = b""  # forward secrecy: the ephemeral secret is no longer needed
        t2 = _t2(self._t1, version, aead, reply.aeads, e_r, self._binding)
        plain = _open_box(_derive(rx, t2, b"p2pfs-hs-r2i"), t2, reply.box, "the responder")
        responder, r_name, sig_r = _parse_identity_box(plain, "the responder")
        signed_r = packb([_LABEL_SIG_R, t2, e_i, e_r, version, responder.key, r_name])
        if not responder.verify(signed_r, sig_r):
            raise HandshakeError("the responder's transcript signature is invalid")
        if self._expected is not None and responder != self._expected:
            raise HandshakeError("peer presented a different key than its record claims")
        t3 = _hash(t2 + reply.box)
        me = self._identity
        sig_i = me.sign(packb([_LABEL_SIG_I, t3, e_i, e_r, version, responder.key,
                               me.public_key, me.name]))
        box_i = _seal_box(_derive(tx, t3, b"p2pfs-hs-i2r"), t3,
                          packb([me.public_key, me.name, sig_i]))
        msg3 = Finish(box_i).encode()
        t4 = _hash(t3 + msg3)
        session = Session(peer=responder, peer_name=_display_name(r_name), version=version,
                          transcript_hash=t4, aead=aead,
                          send_secret=_derive(tx, t4, b"p2pfs-app-i2r"),
                          recv_secret=_derive(rx, t4, b"p2pfs-app-r2i"),
                          encrypt_frames=not self._binding)
        return msg3, session


class ResponderHandshake:
    """The accepting side. ``receive_hello(msg1)`` -> msg2; ``receive_finish(msg3)`` -> Session.

    ``aeads`` and ``channel_binding`` as for ``InitiatorHandshake``.
    """

    def __init__(self, identity: Identity, *, rand: Rand = nacl.utils.random,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                 aeads: tuple[str, ...] | None = None,
                 channel_binding: bytes = b"") -> None:
        self._identity = identity
        self._rand = rand
        self._versions = versions
        self._aeads = _check_aead_offer(local_aeads() if aeads is None else aeads)
        self._binding = _check_binding(channel_binding)
        self.state = ResponderState.NEW
        self._e_i = b""
        self._e_r = b""
        self._rx = b""
        self._tx = b""
        self._version = 0
        self._aead = ""
        self._t3 = b""

    @staticmethod
    def abort_message(reason: str) -> bytes:
        """A clear-text refusal the initiator turns into a HandshakeError."""
        return HandshakeAbort(reason.encode()[:MAX_ABORT_REASON_BYTES].decode(
            "utf-8", "ignore")).encode()

    def receive_hello(self, msg1: bytes) -> bytes:
        if self.state is not ResponderState.NEW:
            _transition(self, ResponderState.NEW, ResponderState.REPLY_SENT)  # raises
        try:
            msg2 = self._receive_hello(msg1)
        except Exception:
            self.state = ResponderState.FAILED
            raise
        _transition(self, ResponderState.NEW, ResponderState.REPLY_SENT)
        return msg2

    def _receive_hello(self, msg1: bytes) -> bytes:
        try:
            hello = _decode(msg1, (Hello,))
        except HandshakeError:
            legacy = _legacy_hello_versions(msg1) if isinstance(msg1, (bytes, bytearray)) else None
            if legacy is not None:
                raise _version_mismatch(legacy, self._versions) from None
            raise
        assert isinstance(hello, Hello)
        common = set(hello.versions) & set(self._versions)
        if not common:
            raise _version_mismatch(hello.versions, self._versions)
        version = max(common)
        aead = next((a for a in hello.aeads if a in self._aeads), None)
        if aead is None:
            offered = [a[:MAX_AEAD_NAME_BYTES] for a in hello.aeads]
            raise HandshakeError(f"no common frame AEAD: peer offers {offered}, "
                                 f"this node {list(self._aeads)}")
        e_r, sk_r = sodium.crypto_kx_seed_keypair(self._rand(sodium.crypto_kx_SEED_BYTES))
        e_i = hello.ephemeral
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(e_r, sk_r, e_i)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise HandshakeError("peer sent an invalid ephemeral key") from None
        del sk_r  # forward secrecy
        t1 = _hash(PROTOCOL_NAME.encode() + bytes(msg1))
        t2 = _t2(t1, version, aead, self._aeads, e_r, self._binding)
        me = self._identity
        sig_r = me.sign(packb([_LABEL_SIG_R, t2, e_i, e_r, version, me.public_key, me.name]))
        box_r = _seal_box(_derive(tx, t2, b"p2pfs-hs-r2i"), t2,
                          packb([me.public_key, me.name, sig_r]))
        self._e_i, self._e_r, self._rx, self._tx = e_i, e_r, rx, tx
        self._version, self._aead = version, aead
        self._t3 = _hash(t2 + box_r)
        return HelloReply(version, aead, self._aeads, e_r, box_r).encode()

    def receive_finish(self, msg3: bytes) -> Session:
        if self.state is not ResponderState.REPLY_SENT:
            _transition(self, ResponderState.REPLY_SENT, ResponderState.DONE)  # raises
        try:
            session = self._receive_finish(msg3)
        except Exception:
            self.state = ResponderState.FAILED
            raise
        finally:
            self._rx = self._tx = b""
        _transition(self, ResponderState.REPLY_SENT, ResponderState.DONE)
        return session

    def _receive_finish(self, msg3: bytes) -> Session:
        fin = _decode(msg3, (Finish,))
        assert isinstance(fin, Finish)
        t3 = self._t3
        plain = _open_box(_derive(self._rx, t3, b"p2pfs-hs-i2r"), t3, fin.box, "the initiator")
        initiator, i_name, sig_i = _parse_identity_box(plain, "the initiator")
        me = self._identity
        signed_i = packb([_LABEL_SIG_I, t3, self._e_i, self._e_r, self._version, me.public_key,
                          initiator.key, i_name])
        if not initiator.verify(signed_i, sig_i):
            raise HandshakeError("the initiator's transcript signature is invalid")
        t4 = _hash(t3 + bytes(msg3))
        return Session(peer=initiator, peer_name=_display_name(i_name), version=self._version,
                       transcript_hash=t4, aead=self._aead,
                       send_secret=_derive(self._tx, t4, b"p2pfs-app-r2i"),
                       recv_secret=_derive(self._rx, t4, b"p2pfs-app-i2r"),
                       encrypt_frames=not self._binding)

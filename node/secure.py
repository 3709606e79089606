"""Authenticated key exchange (SIGMA-I, 3 messages) and frame encryption. Sans-IO.

This module is a pure state machine: bytes in, bytes out. It must not import
sockets, asyncio, transports, trust, or anything above ``identity``/``wire``;
randomness comes from an injectable ``rand`` callable so tests can pin it.

Handshake (all messages are ``node.wire`` messages, every field bounded)::

    msg1  I -> R  clear      ["hs1", 1, "p2pfs-secure", [versions], e_I, nonce_I]
    msg2  R -> I  clear part ["hs2", 1, version, e_R, box_R]
                  box_R  = AEAD(k_hs_R2I, aad=T2, [S_R, name_R, sig_R])
                  sig_R  = Sign_R(["p2pfs-sig-R", T2, e_I, e_R, version, S_R, name_R])
    msg3  I -> R  encrypted  ["hs3", 1, box_I]
                  box_I  = AEAD(k_hs_I2R, aad=T3, [S_I, name_I, sig_I])
                  sig_I  = Sign_I(["p2pfs-sig-I", T3, e_I, e_R, version, S_R, S_I, name_I])

``e_*`` are fresh X25519 (crypto_kx) keys, ``S_*`` the static Ed25519 keys.
The transcript hash runs over every message byte-exactly:
``T1 = H(label || msg1)``, ``T2 = H(T1 || version || e_R)``, ``T3 = H(T2 || box_R)``,
``T4 = H(T3 || msg3)`` with H = blake2b-256 (personalised). crypto_kx over the
ephemerals gives one key per direction; every derived key is
``blake2b(key=kx_key, data=T, person=purpose)``, so handshake keys are bound to
T2/T3 and the session keys to the full transcript T4 (both identities).
Ephemeral secrets are dropped as soon as the keys are derived (forward secrecy).

Frames: XChaCha20-Poly1305-IETF, key per direction, nonce = 16 zero bytes ||
u64 big-endian counter (implicit, never sent). A frame is ``ciphertext || tag``
(16 bytes overhead). Any frame that fails to open (forged, replayed,
reordered, truncated) raises ProtocolError and kills the session.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import field
from typing import Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.hash
import nacl.utils
from nacl.encoding import RawEncoder

from node.errors import HandshakeError, ProtocolError

try:  # pynacl's own cffi binding of libsodium: lets frames reuse one output buffer
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
except ImportError:  # pragma: no cover - layout of a future pynacl; use the public wrappers
    _ffi = _lib = None
from node.identity import MAX_NAME_LEN, PUBKEY_LEN_BYTES, Identity, PeerId
from node.wire import Message, bound, decode_message, message, packb, unpackb

log = logging.getLogger(__name__)

PROTOCOL_NAME = "p2pfs-secure"
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_OFFERED_VERSIONS = 8
MAX_VERSION = 65535
EPHEMERAL_LEN_BYTES = sodium.crypto_kx_PUBLIC_KEY_BYTES  # 32
NONCE_LEN_BYTES = 32
SIGNATURE_LEN_BYTES = 64
HASH_LEN_BYTES = 32
KEY_LEN_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES  # 32
AEAD_NONCE_LEN_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
FRAME_OVERHEAD_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
# sealed identity box: msgpack [32-byte key, name <= 64 bytes, 64-byte sig] + tag
MAX_BOX_BYTES = 256
MAX_HANDSHAKE_MSG_BYTES = 512
MAX_ABORT_REASON_BYTES = 200
MAX_FRAME_COUNTER = 2**64 - 1

_HS_PERSON_TRANSCRIPT = b"p2pfs-transcript"
_LABEL_SIG_R = "p2pfs-sig-R"
_LABEL_SIG_I = "p2pfs-sig-I"
_ZERO_NONCE = bytes(AEAD_NONCE_LEN_BYTES)
_NONCE_PREFIX = bytes(AEAD_NONCE_LEN_BYTES - 8)
_COUNTER = struct.Struct(">Q")

Rand = Callable[[int], bytes]
# pynacl's public AEAD wrappers allocate and zero a fresh output buffer per call,
# which halves throughput for 1 MiB frames. We call the same libsodium functions
# through pynacl's cffi binding instead: ``seal_into`` writes straight into the
# caller's (reused) send buffer and ``open_in_place`` decrypts the received buffer
# where it lies (libsodium allows m == c), so a large frame is never copied in
# Python. ``seal``/``open`` keep the allocate-a-result API for small messages and
# go through a reused per-thread scratch buffer.
_SCRATCH_MIN_BYTES = 64 * 1024
_scratch = threading.local()
Buffer = bytes | bytearray | memoryview


def _scratch_buffer(n: int) -> Any:
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _ffi.new("unsigned char[]", max(n, _SCRATCH_MIN_BYTES))
        _scratch.buf = buf
    return buf


def _c_in(data: Buffer) -> Any:
    """A read-only C view of `data` without copying it."""
    return data if type(data) is bytes else _ffi.from_buffer(data)


def _aead_encrypt(plaintext: Buffer, nonce: bytes, key: bytes) -> bytes:
    if _lib is None:
        return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plaintext), None,
                                                                 nonce, key)
    n = len(plaintext) + FRAME_OVERHEAD_BYTES
    out = _scratch_buffer(n)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out, _ffi.NULL, _c_in(plaintext), len(plaintext), _ffi.NULL, 0, _ffi.NULL, nonce, key)
    if rc != 0:
        raise ProtocolError("frame encryption failed")
    return _ffi.buffer(out, n)[:]


def _aead_encrypt_into(plaintext: Buffer, out: bytearray | memoryview, offset: int,
                       nonce: bytes, key: bytes) -> int:
    n = len(plaintext) + FRAME_OVERHEAD_BYTES
    if _lib is None:
        out[offset:offset + n] = _aead_encrypt(plaintext, nonce, key)
        return n
    dst = _ffi.from_buffer(out, require_writable=True)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        dst + offset, _ffi.NULL, _c_in(plaintext), len(plaintext), _ffi.NULL, 0, _ffi.NULL,
        nonce, key)
    del dst
    if rc != 0:
        raise ProtocolError("frame encryption failed")
    return n


def _aead_decrypt(ciphertext: Buffer, nonce: bytes, key: bytes) -> bytes | None:
    """The plaintext, or None when the frame does not authenticate."""
    if _lib is None:
        try:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(ciphertext), None,
                                                                     nonce, key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None
    n = len(ciphertext) - FRAME_OVERHEAD_BYTES
    out = _scratch_buffer(n)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out, _ffi.NULL, _ffi.NULL, _c_in(ciphertext), len(ciphertext), _ffi.NULL, 0, nonce, key)
    if rc != 0:
        return None
    return _ffi.buffer(out, n)[:]


def _aead_decrypt_in_place(frame: bytearray, nonce: bytes, key: bytes) -> bool:
    """Decrypt frame[:-16] over itself; False (frame zeroed) when it does not authenticate.

    libsodium checks the tag before it decrypts anything, and supports m == c.
    """
    if _lib is None:
        plain = _aead_decrypt(frame, nonce, key)
        if plain is None:
            return False
        frame[:len(plain)] = plain
        return True
    buf = _ffi.from_buffer(frame, require_writable=True)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        buf, _ffi.NULL, _ffi.NULL, buf, len(frame), _ffi.NULL, 0, nonce, key)
    del buf
    return rc == 0


# ---------------------------------------------------------------------------
# messages


@message("hs1")
class Hello(Message):
    protocol: str = field(metadata=bound(max_len=32))
    versions: tuple = field(metadata=bound(max_len=MAX_OFFERED_VERSIONS))  # type: ignore[type-arg]
    ephemeral: bytes = field(metadata=bound(max_len=EPHEMERAL_LEN_BYTES))
    nonce: bytes = field(metadata=bound(max_len=NONCE_LEN_BYTES))

    def validate(self) -> None:
        if self.protocol != PROTOCOL_NAME:
            raise HandshakeError(f"peer speaks {self.protocol[:32]!r}, not {PROTOCOL_NAME!r}")
        if not self.versions or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION
            for v in self.versions
        ):
            raise HandshakeError("hello: the version list must hold small integers")
        _exact_len("hello.ephemeral", self.ephemeral, EPHEMERAL_LEN_BYTES)
        _exact_len("hello.nonce", self.nonce, NONCE_LEN_BYTES)


@message("hs2")
class HelloReply(Message):
    version: int = field(metadata=bound(max_val=MAX_VERSION))
    ephemeral: bytes = field(metadata=bound(max_len=EPHEMERAL_LEN_BYTES))
    box: bytes = field(metadata=bound(max_len=MAX_BOX_BYTES))

    def validate(self) -> None:
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


# ---------------------------------------------------------------------------
# primitives (all libsodium through pynacl)


def _hash(data: bytes, *, key: bytes = b"", person: bytes = _HS_PERSON_TRANSCRIPT) -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=HASH_LEN_BYTES, key=key, person=person[:16], encoder=RawEncoder
    )


def _derive(kx_key: bytes, transcript: bytes, purpose: bytes) -> bytes:
    """A 32-byte key bound to the transcript: keyed blake2b, personalised per purpose."""
    return _hash(transcript, key=kx_key, person=purpose)


def _seal_box(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    # each handshake key encrypts exactly one box, so a zero nonce is safe
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, _ZERO_NONCE, key)


def _open_box(key: bytes, aad: bytes, box: bytes, who: str) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(box, aad, _ZERO_NONCE, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise HandshakeError(
            f"{who}'s handshake message failed to decrypt (tampered, or a man in the middle)"
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


# ---------------------------------------------------------------------------
# session (frame crypto)


class SessionState(enum.Enum):
    OPEN = "open"
    DEAD = "dead"


class Session:
    """Frame encryption for one established channel. Not thread-safe; one per channel."""

    def __init__(self, *, peer: PeerId, peer_name: str, version: int, transcript_hash: bytes,
                 send_key: bytes, recv_key: bytes) -> None:
        self.peer = peer
        self.peer_name = peer_name
        self.version = version
        self.transcript_hash = transcript_hash
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_counter = 0
        self._recv_counter = 0
        self.state = SessionState.OPEN
        self.failure = ""

    def _check_open(self) -> None:
        if self.state is not SessionState.OPEN:
            raise ProtocolError(f"the session is dead ({self.failure})")

    def _kill(self, reason: str) -> None:
        if self.state is SessionState.OPEN:
            log.debug("session with %s: %s -> dead (%s)", self.peer.short, self.state.value, reason)
        self.state = SessionState.DEAD
        self.failure = reason
        self._send_key = self._recv_key = b""

    def _next_send_nonce(self) -> bytes:
        self._check_open()
        if self._send_counter >= MAX_FRAME_COUNTER:
            self._kill("send counter exhausted")
            raise ProtocolError("the session is dead (send counter exhausted)")
        nonce = _NONCE_PREFIX + _COUNTER.pack(self._send_counter)
        self._send_counter += 1
        return nonce

    def _recv_nonce(self, frame_len: int) -> bytes:
        self._check_open()
        if frame_len < FRAME_OVERHEAD_BYTES:
            self._kill("truncated frame")
            raise ProtocolError(
                f"frame of {frame_len} bytes is shorter than its "
                f"{FRAME_OVERHEAD_BYTES}-byte tag (truncated)"
            )
        if self._recv_counter >= MAX_FRAME_COUNTER:
            self._kill("receive counter exhausted")
            raise ProtocolError("the session is dead (receive counter exhausted)")
        return _NONCE_PREFIX + _COUNTER.pack(self._recv_counter)

    def _auth_failed(self) -> ProtocolError:
        self._kill(f"frame {self._recv_counter} failed authentication")
        return ProtocolError(
            f"frame {self._recv_counter} from {self.peer.short} failed authentication "
            "(forged, replayed, reordered or truncated); channel closed"
        )

    def seal(self, plaintext: Buffer) -> bytes:
        """The next frame (``ciphertext || tag``) as new bytes."""
        nonce = self._next_send_nonce()
        return _aead_encrypt(plaintext, nonce, self._send_key)

    def seal_into(self, plaintext: Buffer, out: bytearray | memoryview, offset: int = 0) -> int:
        """Write the next frame into ``out[offset:offset + len(plaintext) + 16]``; its length.

        The same frame ``seal`` would return, without allocating it; ``out`` must
        not overlap ``plaintext``.
        """
        n = len(plaintext) + FRAME_OVERHEAD_BYTES
        if offset < 0 or len(out) - offset < n:
            raise ValueError(f"seal_into: {len(out) - offset} bytes of room, need {n}")
        nonce = self._next_send_nonce()
        return _aead_encrypt_into(plaintext, out, offset, nonce, self._send_key)

    def open(self, ciphertext: Buffer) -> bytes:
        """The plaintext of the next frame, as new bytes; ProtocolError kills the session."""
        nonce = self._recv_nonce(len(ciphertext))
        plain = _aead_decrypt(ciphertext, nonce, self._recv_key)
        if plain is None:
            raise self._auth_failed()
        self._recv_counter += 1
        return plain

    def open_in_place(self, frame: bytearray) -> bytearray:
        """Open the next frame by decrypting it over itself; returns ``frame`` minus its tag.

        For a buffer the caller owns outright (no copy of a large frame); on
        failure the frame is wiped and ProtocolError kills the session.
        """
        nonce = self._recv_nonce(len(frame))
        if not _aead_decrypt_in_place(frame, nonce, self._recv_key):
            raise self._auth_failed()
        self._recv_counter += 1
        try:
            del frame[len(frame) - FRAME_OVERHEAD_BYTES:]
        except BufferError:  # someone holds a view of it: hand out a copy instead
            return bytearray(memoryview(frame)[:len(frame) - FRAME_OVERHEAD_BYTES])
        return frame

    def close(self) -> None:
        self._kill("closed")

    def __repr__(self) -> str:
        return f"Session(peer={self.peer.short}, state={self.state.value})"


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
    """The connecting side. ``start()`` -> msg1; ``receive(msg2)`` -> (msg3, Session)."""

    def __init__(self, identity: Identity, *, expected_peer: PeerId | None = None,
                 rand: Rand = nacl.utils.random,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        self._identity = identity
        self._expected = expected_peer
        self._rand = rand
        self._versions = versions
        self.state = InitiatorState.NEW
        self._eph_pk = b""
        self._eph_sk = b""
        self._t1 = b""

    def start(self) -> bytes:
        _transition(self, InitiatorState.NEW, InitiatorState.HELLO_SENT)
        self._eph_pk, self._eph_sk = sodium.crypto_kx_seed_keypair(
            self._rand(sodium.crypto_kx_SEED_BYTES)
        )
        msg1 = Hello(PROTOCOL_NAME, tuple(self._versions), self._eph_pk,
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
            raise HandshakeError(f"peer refused the handshake: {reply.reason}")
        assert isinstance(reply, HelloReply)
        if reply.version not in self._versions:
            raise HandshakeError(
                f"peer chose protocol version {reply.version}, which we did not offer "
                f"(we support {list(self._versions)})"
            )
        e_i, e_r, version = self._eph_pk, reply.ephemeral, reply.version
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(e_i, self._eph_sk, e_r)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise HandshakeError("peer sent an invalid ephemeral key") from None
        self._eph_sk = b""  # forward secrecy: the ephemeral secret is no longer needed
        t2 = _hash(self._t1 + packb([version, e_r]))
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
                          transcript_hash=t4,
                          send_key=_derive(tx, t4, b"p2pfs-app-i2r"),
                          recv_key=_derive(rx, t4, b"p2pfs-app-r2i"))
        return msg3, session


class ResponderHandshake:
    """The accepting side. ``receive_hello(msg1)`` -> msg2; ``receive_finish(msg3)`` -> Session."""

    def __init__(self, identity: Identity, *, rand: Rand = nacl.utils.random,
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        self._identity = identity
        self._rand = rand
        self._versions = versions
        self.state = ResponderState.NEW
        self._e_i = b""
        self._e_r = b""
        self._rx = b""
        self._tx = b""
        self._version = 0
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
        hello = _decode(msg1, (Hello,))
        assert isinstance(hello, Hello)
        common = set(hello.versions) & set(self._versions)
        if not common:
            raise HandshakeError(
                f"no common protocol version: peer offers {list(hello.versions)}, "
                f"we support {list(self._versions)}"
            )
        version = max(common)
        e_r, sk_r = sodium.crypto_kx_seed_keypair(self._rand(sodium.crypto_kx_SEED_BYTES))
        e_i = hello.ephemeral
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(e_r, sk_r, e_i)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise HandshakeError("peer sent an invalid ephemeral key") from None
        del sk_r  # forward secrecy
        t1 = _hash(PROTOCOL_NAME.encode() + bytes(msg1))
        t2 = _hash(t1 + packb([version, e_r]))
        me = self._identity
        sig_r = me.sign(packb([_LABEL_SIG_R, t2, e_i, e_r, version, me.public_key, me.name]))
        box_r = _seal_box(_derive(tx, t2, b"p2pfs-hs-r2i"), t2,
                          packb([me.public_key, me.name, sig_r]))
        self._e_i, self._e_r, self._rx, self._tx, self._version = e_i, e_r, rx, tx, version
        self._t3 = _hash(t2 + box_r)
        return HelloReply(version, e_r, box_r).encode()

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
                       transcript_hash=t4,
                       send_key=_derive(self._tx, t4, b"p2pfs-app-r2i"),
                       recv_key=_derive(self._rx, t4, b"p2pfs-app-i2r"))

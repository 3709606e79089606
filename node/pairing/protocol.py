"""The pairing exchange, pure: SPAKE2 on the code, derived keys, confirmation, sealed box.

Two sides, A (the inviter) and B (the accepter), each in this order:

1. ``PakeSide(code, side, entropy)``: SPAKE2 (the ``spake2`` package, A/B roles,
   identities bound to APP_ID) on the whole code; ``outbound`` goes to the mailbox.
2. ``finish(peer_message)`` -> ``PairingKeys``: the SPAKE2 key and a transcript hash
   (APP_ID, nameplate, A's and B's messages) feed HKDF-SHA256 for a confirmation key and
   a box key per direction.
3. ``seal(keys, identity, record)`` -> the box message: our confirmation MAC (HMAC-SHA256
   over the transcript), then ChaCha20-Poly1305 over {public key, name, contact record,
   Ed25519 signature of the transcript}. The signature binds our identity to this one
   pairing, so a box cannot be replayed into another.
4. ``open_box(keys, message)`` -> ``PeerOffer``: the MAC is checked first: a mismatch is
   ``WrongCode`` (different codes give unrelated keys); then the AEAD, the signature and
   the record (it must belong to the key that signed).

Each box key encrypts exactly one message, so a fixed nonce is safe. The rendezvous sees
the SPAKE2 messages and ciphertext only. No I/O; randomness enters as ``entropy``.
Imports identity, contact, wire and errors only.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any

import nacl.hash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.encoding import RawEncoder
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.spake2 import SPAKEError

from node.contact import ContactRecord
from node.errors import IdentityError, ProtocolError
from node.identity import MAX_NAME_LEN, PUBKEY_LEN_BYTES, Identity, PeerId
from node.pairing import WrongCode
from node.pairing.code import Code, Entropy
from node.pairing.wordlist import EVEN_WORDS, ODD_WORDS
from node.wire import packb, unpackb

APP_ID = b"p2pfs-pair-v1"
SIDE_A = "A"  # the inviter
SIDE_B = "B"  # the accepter
SIDES = (SIDE_A, SIDE_B)
BOX_VERSION = 1
KEY_LEN_BYTES = 32
MAC_LEN_BYTES = 32
SIG_LEN_BYTES = 64
# an Ed25519-group SPAKE2 message: one side byte + a 32-byte element
PAKE_MESSAGE_LEN_BYTES = 33
MAX_BOX_BYTES = 4096
VERIFY_WORDS = 3
_NONCE = bytes(12)  # each box key seals exactly one message


def other(side: str) -> str:
    return SIDE_B if side == SIDE_A else SIDE_A


@dataclass(frozen=True, slots=True)
class PairingKeys:
    side: str
    transcript: bytes
    confirm_mine: bytes
    confirm_theirs: bytes
    box_mine: bytes
    box_theirs: bytes
    app_id: bytes = APP_ID  # the purpose (pairing, one-shot send): every key is bound to it

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes, side: str,
               app_id: bytes = APP_ID) -> PairingKeys:
        keys = {}
        for purpose in ("confirm", "box"):
            for s in SIDES:
                keys[purpose, s] = _hkdf(shared, transcript,
                                         app_id + f" {purpose} {s}".encode())
        return cls(side, transcript, keys["confirm", side], keys["confirm", other(side)],
                   keys["box", side], keys["box", other(side)], app_id)


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """What the other side proved inside the box: its key, its chosen name, its record."""

    peer_id: PeerId
    name: str
    record: ContactRecord | None
    # what the purpose adds (a one-shot send's file offer), decoded by its own module
    extra: Any = None


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN_BYTES, salt=salt,
                info=info).derive(secret)


def transcript_hash(nameplate: int, msg_a: bytes, msg_b: bytes,
                    app_id: bytes = APP_ID) -> bytes:
    data = packb([app_id, nameplate, msg_a, msg_b])
    return nacl.hash.blake2b(data, digest_size=32, encoder=RawEncoder)


class PakeSide:
    """One side's SPAKE2 state: ``outbound`` once, then ``finish`` once."""

    def __init__(self, code: Code, side: str, entropy: Entropy = os.urandom,
                 app_id: bytes = APP_ID) -> None:
        if side not in SIDES:
            raise ValueError("side must be 'A' or 'B'")
        self.code = code
        self.side = side
        self.app_id = app_id
        role = SPAKE2_A if side == SIDE_A else SPAKE2_B
        # a code made for one purpose fails the PAKE of another (different identities)
        self._spake = role(code.password, idA=app_id + b":inviter", idB=app_id + b":accepter",
                           entropy_f=entropy)
        self.outbound: bytes = self._spake.start()
        self._finished = False

    def finish(self, inbound: bytes) -> PairingKeys:
        if self._finished:
            raise ProtocolError("the PAKE already finished")
        if not isinstance(inbound, bytes) or len(inbound) != PAKE_MESSAGE_LEN_BYTES:
            raise ProtocolError("the other side's PAKE message has the wrong size")
        self._finished = True
        try:
            shared = self._spake.finish(inbound)
        except (SPAKEError, ValueError) as exc:  # reflection, wrong side byte, bad point
            raise ProtocolError(f"bad PAKE message from the other side: {exc}") from None
        if self.side == SIDE_A:
            th = transcript_hash(self.code.nameplate, self.outbound, inbound, self.app_id)
        else:
            th = transcript_hash(self.code.nameplate, inbound, self.outbound, self.app_id)
        return PairingKeys.derive(shared, th, self.side, self.app_id)


def _mac(key: bytes, transcript: bytes, app_id: bytes = APP_ID) -> bytes:
    return hmac.new(key, app_id + b" confirm" + transcript, "sha256").digest()


def _identity_message(side: str, transcript: bytes, app_id: bytes = APP_ID) -> bytes:
    return packb([app_id + b" identity", side, transcript])


def seal(keys: PairingKeys, identity: Identity, name: str,
         record: ContactRecord | None, extra: Any = None) -> bytes:
    """Our box message: confirmation MAC || AEAD(box key) of our identity offer (plus the
    purpose's `extra`, msgpack-able, when given). ProtocolError if it exceeds the box."""
    sig = identity.sign(_identity_message(keys.side, keys.transcript, keys.app_id))
    fields = [BOX_VERSION, identity.public_key, name[:MAX_NAME_LEN],
              record.to_wire() if record is not None else None, sig]
    if extra is not None:
        fields.append(extra)
    body = packb(fields)
    sealed = ChaCha20Poly1305(keys.box_mine).encrypt(_NONCE, body, keys.transcript)
    message = _mac(keys.confirm_mine, keys.transcript, keys.app_id) + sealed
    if len(message) > MAX_BOX_BYTES:
        raise ProtocolError(f"the sealed box has {len(message)} bytes, over the "
                            f"{MAX_BOX_BYTES} a rendezvous message may have")
    return message


def open_box(keys: PairingKeys, message: bytes, *, now: float | None = None) -> PeerOffer:
    """Check the other side's confirmation (WrongCode), then decrypt and verify its offer."""
    if not isinstance(message, bytes) or not MAC_LEN_BYTES < len(message) <= MAX_BOX_BYTES:
        raise ProtocolError("the other side's pairing box has the wrong size")
    mac, sealed = message[:MAC_LEN_BYTES], message[MAC_LEN_BYTES:]
    if not hmac.compare_digest(mac, _mac(keys.confirm_theirs, keys.transcript, keys.app_id)):
        raise WrongCode()
    try:
        body = ChaCha20Poly1305(keys.box_theirs).decrypt(_NONCE, sealed, keys.transcript)
    except InvalidTag:
        raise ProtocolError("the other side's pairing box does not decrypt") from None
    obj: Any = unpackb(body, max_bytes=MAX_BOX_BYTES)
    if not isinstance(obj, list) or len(obj) not in (5, 6) or obj[0] != BOX_VERSION:
        raise ProtocolError("pairing box: unknown version or shape")
    _, key, name, raw_record, sig = obj[:5]
    extra = obj[5] if len(obj) == 6 else None
    if not isinstance(key, bytes) or len(key) != PUBKEY_LEN_BYTES:
        raise ProtocolError("pairing box: bad public key")
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not name.isprintable():
        raise ProtocolError("pairing box: bad name")
    if not isinstance(sig, bytes) or len(sig) != SIG_LEN_BYTES:
        raise ProtocolError("pairing box: bad signature field")
    try:
        peer = PeerId(key)
    except IdentityError as exc:
        raise ProtocolError(f"pairing box: {exc}") from None
    if not peer.verify(_identity_message(other(keys.side), keys.transcript, keys.app_id), sig):
        raise ProtocolError("pairing box: the identity signature over the transcript is bad")
    record = None
    if raw_record is not None:
        record = ContactRecord.from_wire(raw_record).verify(now)
        if record.peer_id != peer:
            raise ProtocolError("pairing box: the contact record belongs to another key")
    return PeerOffer(peer, name, record, extra)


def verification_words(key_a: bytes, key_b: bytes) -> str:
    """Three words both people can compare, from blake2b over both public keys (sorted,
    so each side computes the same string)."""
    first, second = sorted((key_a, key_b))
    digest = nacl.hash.blake2b(APP_ID + b" verify" + first + second, digest_size=VERIFY_WORDS,
                               encoder=RawEncoder)
    return "-".join((ODD_WORDS if i % 2 == 0 else EVEN_WORDS)[b] for i, b in enumerate(digest))

"""Signed change events and presence heartbeats: the values gossip carries.

A ``ChangeEvent`` says "origin saw this change in its shared folder": it is
signed by the origin's Ed25519 key over the canonical msgpack list
``[DOMAIN, origin, folder, seq, lamport, wall_ms, kind, path, old_path, size, hash]``
and its id is blake2b-256 of its full signed encoding, so any relay can check
it and nobody can alter or re-attribute it. ``Heartbeat`` is the same idea for
presence ("origin is online now").

Every field is bounded and validated when decoding (``from_wire``), before the
signature is even checked: paths are relative posix paths that cannot escape
a target folder.

Pure: no I/O. Imports only node.identity, node.wire, node.pathrules and node.errors; it must
not import the engine, the log, the service or any transport.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import nacl.hash
from nacl.encoding import RawEncoder

from node.errors import IdentityError, ProtocolError
from node.identity import Identity, PeerId, validate_name
from node.pathrules import check_rel_path
from node.wire import packb, unpackb

EVENT_DOMAIN = "p2pfs-event-v1"
HEARTBEAT_DOMAIN = "p2pfs-heartbeat-v1"
# a heartbeat that says "I am stopping" signs under its own domain, so an ordinary
# heartbeat can never be passed off as a goodbye
GOODBYE_DOMAIN = "p2pfs-goodbye-v1"
KINDS = ("created", "modified", "deleted", "moved", "shared")
HASH_LEN_BYTES = 32
SIGNATURE_LEN_BYTES = 64
EVENT_ID_LEN_BYTES = 32
MAX_PATH_BYTES = 1024
MAX_PATH_COMPONENTS = 64
MAX_FOLDER_BYTES = 64
MAX_SEQ = 2**63 - 1
MAX_FILE_SIZE_BYTES = 2**53
MAX_EVENT_BYTES = 4096
MAX_HEARTBEAT_BYTES = 512
_WIRE_FIELDS = 11


@lru_cache(maxsize=1024)
def peer_text(peer: PeerId) -> str:
    """``str(peer)`` (base32 with checksum), memoized: every notification names a peer."""
    return str(peer)


def now_ms() -> int:
    return int(time.time() * 1000)


def validate_rel_path(path: Any, what: str = "path") -> str:
    """A received relative path (node.pathrules: posix, bounded, no escape, no control
    character, no reserved or p2pfs-internal name), at most MAX_PATH_BYTES."""
    return check_rel_path(path, what, MAX_PATH_BYTES)


def validate_folder(label: Any) -> str:
    """A shared-folder label: one path component, 1-64 bytes."""
    if not isinstance(label, str):
        raise ProtocolError("folder: must be text")
    if not 0 < len(label.encode("utf-8", "surrogatepass")) <= MAX_FOLDER_BYTES:
        raise ProtocolError(f"folder: must be 1-{MAX_FOLDER_BYTES} bytes")
    if "/" in label or "\\" in label or label in (".", "..") or label.startswith("."):
        raise ProtocolError("folder: must be a single name, not starting with '.'")
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise ProtocolError("folder: control character")
    return label


def _check_int(name: str, value: Any, hi: int, lo: int = 0) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"event: {name} out of range")
    return value


def _blake2b_256(data: bytes) -> bytes:
    return nacl.hash.blake2b(data, digest_size=EVENT_ID_LEN_BYTES, encoder=RawEncoder)


@dataclass(frozen=True)
class ChangeEvent:
    origin: PeerId
    folder: str
    seq: int
    lamport: int
    wall_ms: int
    kind: str
    path: str
    old_path: str
    size: int
    hash: bytes
    signature: bytes = field(default=b"", repr=False)

    # -- construction ------------------------------------------------------
    @classmethod
    def create(cls, identity: Identity, *, folder: str, seq: int, lamport: int, kind: str,
               path: str, size: int, hash: bytes, old_path: str = "",
               wall_ms: int | None = None) -> ChangeEvent:
        unsigned = cls(identity.peer_id, folder, seq, lamport,
                       now_ms() if wall_ms is None else wall_ms, kind, path, old_path, size,
                       hash, b"")
        unsigned.check_fields()
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))

    def to_wire_fields(self) -> list[Any]:
        return [self.origin, self.folder, self.seq, self.lamport, self.wall_ms, self.kind,
                self.path, self.old_path, self.size, self.hash, self.signature]

    def signed_bytes(self) -> bytes:
        return packb([EVENT_DOMAIN, self.origin.key, self.folder, self.seq, self.lamport,
                      self.wall_ms, self.kind, self.path, self.old_path, self.size, self.hash])

    # -- checks ------------------------------------------------------------
    def check_fields(self) -> None:
        """Bounds and cross-field rules; ProtocolError naming the first bad field."""
        validate_folder(self.folder)
        _check_int("seq", self.seq, MAX_SEQ, lo=1)
        _check_int("lamport", self.lamport, MAX_SEQ, lo=1)
        _check_int("wall_ms", self.wall_ms, 2**53)
        _check_int("size", self.size, MAX_FILE_SIZE_BYTES)
        if self.kind not in KINDS:
            raise ProtocolError(f"event: unknown kind {str(self.kind)[:16]!r}")
        validate_rel_path(self.path)
        if not isinstance(self.hash, bytes) or not isinstance(self.old_path, str):
            raise ProtocolError("event: bad hash or old_path type")
        if self.kind == "moved":
            validate_rel_path(self.old_path, "old_path")
            if self.old_path == self.path:
                raise ProtocolError("event: a move needs two different paths")
        elif self.old_path:
            raise ProtocolError("event: old_path is only for moves")
        if self.kind == "deleted":
            if self.hash != b"" or self.size != 0:
                raise ProtocolError("event: a deletion carries no hash or size")
        elif len(self.hash) != HASH_LEN_BYTES:
            raise ProtocolError(f"event: hash must be {HASH_LEN_BYTES} bytes")

    def verify(self) -> ChangeEvent:
        """Raise ProtocolError unless the origin signed exactly these fields."""
        if len(self.signature) != SIGNATURE_LEN_BYTES or not self.origin.verify(
                self.signed_bytes(), self.signature):
            raise ProtocolError(
                f"event {self.origin.short}#{self.seq} has a bad signature")
        return self

    # -- identity ----------------------------------------------------------
    @cached_property
    def id(self) -> bytes:
        return _blake2b_256(self.encode())

    # -- codecs ------------------------------------------------------------
    def to_wire(self) -> list[Any]:
        return [self.origin.key, *self.to_wire_fields()[1:]]

    def encode(self) -> bytes:
        return packb(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> ChangeEvent:
        """Build from decoded msgpack, checking types and bounds (not the signature)."""
        if not isinstance(obj, list) or len(obj) != _WIRE_FIELDS:
            raise ProtocolError(f"event: expected a list of {_WIRE_FIELDS} fields")
        key, folder, seq, lamport, wall_ms, kind, path, old_path, size, hsh, sig = obj
        if not isinstance(key, bytes) or len(key) != 32:
            raise ProtocolError("event: bad origin key")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LEN_BYTES:
            raise ProtocolError("event: bad signature field")
        if not isinstance(kind, str):
            raise ProtocolError("event: kind must be text")
        try:
            origin = PeerId(key)
        except IdentityError:
            raise ProtocolError("event: bad origin key") from None
        event = cls(origin, folder, seq, lamport, wall_ms, kind, path, old_path, size, hsh, sig)
        event.check_fields()
        return event

    @classmethod
    def decode(cls, data: bytes) -> ChangeEvent:
        return cls.from_wire(unpackb(data, max_bytes=MAX_EVENT_BYTES))

    def summary(self) -> dict[str, Any]:
        """Plain, JSON-friendly view (for notifications, `node log --json`)."""
        return {
            "id": self.id.hex(),
            "origin": peer_text(self.origin),
            "folder": self.folder,
            "seq": self.seq,
            "lamport": self.lamport,
            "wall_ms": self.wall_ms,
            "kind": self.kind,
            "path": self.path,
            "old_path": self.old_path,
            "size": self.size,
            "hash": self.hash.hex(),
        }


@dataclass(frozen=True)
class Heartbeat:
    """Signed 'I am online' note; a later wall_ms supersedes an earlier one.

    ``leaving``: the goodbye a node sends its peers when it stops, so they show it
    offline at once instead of after the presence timeout. Encoded as a fifth field
    (``True``) and signed under GOODBYE_DOMAIN.
    """

    origin: PeerId
    wall_ms: int
    name: str
    signature: bytes = field(default=b"", repr=False)
    leaving: bool = False

    @classmethod
    def create(cls, identity: Identity, wall_ms: int | None = None, *,
               leaving: bool = False) -> Heartbeat:
        hb = cls(identity.peer_id, now_ms() if wall_ms is None else wall_ms, identity.name,
                 leaving=leaving)
        return cls(hb.origin, hb.wall_ms, hb.name, identity.sign(hb.signed_bytes()),
                   leaving)

    def signed_bytes(self) -> bytes:
        domain = GOODBYE_DOMAIN if self.leaving else HEARTBEAT_DOMAIN
        return packb([domain, self.origin.key, self.wall_ms, self.name])

    def verify(self) -> Heartbeat:
        if len(self.signature) != SIGNATURE_LEN_BYTES or not self.origin.verify(
                self.signed_bytes(), self.signature):
            raise ProtocolError(f"heartbeat from {self.origin.short} has a bad signature")
        return self

    @cached_property
    def id(self) -> bytes:
        return _blake2b_256(self.encode())

    def encode(self) -> bytes:
        fields = [self.origin.key, self.wall_ms, self.name, self.signature]
        return packb([*fields, True] if self.leaving else fields)

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat:
        obj = unpackb(data, max_bytes=MAX_HEARTBEAT_BYTES)
        if not isinstance(obj, list) or len(obj) not in (4, 5):
            raise ProtocolError("heartbeat: expected a list of 4 fields (5 for a goodbye)")
        if len(obj) == 5 and obj[4] is not True:
            raise ProtocolError("heartbeat: the fifth field (goodbye) must be true")
        key, wall_ms, name, sig = obj[:4]
        if not isinstance(key, bytes) or len(key) != 32:
            raise ProtocolError("heartbeat: bad origin key")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LEN_BYTES:
            raise ProtocolError("heartbeat: bad signature field")
        _check_int("heartbeat wall_ms", wall_ms, 2**53)
        if not isinstance(name, str):
            raise ProtocolError("heartbeat: name must be text")
        try:
            validate_name(name)
        except IdentityError as exc:
            raise ProtocolError(f"heartbeat: {exc}") from None
        return cls(PeerId(key), wall_ms, name, sig, len(obj) == 5)

"""The folder exchange: signed folder changes and the messages of the "folders" channel.

A ``FolderChange`` says "device ORIGIN holds this FileInfo for NAME in folder
FOLDER, as its change number SEQ": signed by the origin's Ed25519 key over the
canonical msgpack list ``[DOMAIN, origin, folder, seq, wall_ms, info]``, so any
device of the folder can relay it and nobody can alter it. Each device keeps,
per folder, the newest change of every origin for every name (older ones of the
same name are superseded), which is that origin's index.

The channel (service "folders", one per pair of peers, either side opens it):

* ``Hello(folders, labels)``: the ids of the folders the sender shares with the
  receiver, and its label of each. Only ids both sides list for each other flow;
  an id from a trusted peer that we do not share with it becomes a
  ``folder_offered`` notification carrying the offering device's label.
* ``Digest(folder, marks)``: per origin, the sender's complete mark (it holds
  every change of that origin up to that seq). The receiver answers with
  ``Changes(folder, origin, upto, changes)``: every change it holds of that
  origin with seq in (mark, upto], oldest first, in bounded batches; the
  last batch's ``upto`` is the receiver's own complete mark, so a mark only ever
  advances over a range received whole.
* ``Changes`` with ``live=True``: a change just made by its origin (or relayed),
  pushed at once; it is stored but advances no mark (a relay may have gaps).

Pure: imports node.wire, node.identity, node.errors and the folder model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from node.errors import IdentityError, ProtocolError
from node.folders.config import FOLDER_ID_RE, MAX_FOLDERS, MAX_LABEL_LEN
from node.folders.model import FileInfo
from node.identity import Identity, PeerId
from node.wire import Message, bound, message, packb, unpackb

CHANGE_DOMAIN = "p2pfs-folder-change-v1"
MAX_CHANGE_BYTES = 8192
CHANGES_BATCH_MAX = 256
DIGEST_ORIGINS_MAX = 256
MAX_SEQ = 2**63 - 1
SIGNATURE_LEN_BYTES = 64
MAX_LABEL_BYTES = 4 * MAX_LABEL_LEN


def check_folder_id(folder: object) -> str:
    if not isinstance(folder, str) or not FOLDER_ID_RE.match(folder):
        raise ProtocolError("folder: not a valid folder id")
    return folder


@dataclass(frozen=True)
class FolderChange:
    origin: PeerId
    folder: str
    seq: int
    wall_ms: int
    info: FileInfo
    signature: bytes = field(default=b"", repr=False)

    @classmethod
    def create(cls, identity: Identity, *, folder: str, seq: int, wall_ms: int,
               info: FileInfo) -> FolderChange:
        unsigned = cls(identity.peer_id, folder, seq, wall_ms, info)
        unsigned.check()
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))

    def signed_bytes(self) -> bytes:
        return packb([CHANGE_DOMAIN, self.origin.key, self.folder, self.seq, self.wall_ms,
                      self.info.to_wire()])

    def check(self) -> None:
        check_folder_id(self.folder)
        for what, v in (("seq", self.seq), ("wall_ms", self.wall_ms)):
            if type(v) is not int or not (1 if what == "seq" else 0) <= v <= MAX_SEQ:
                raise ProtocolError(f"folder change: {what} out of range")
        self.info.check()

    def verify(self) -> FolderChange:
        if len(self.signature) != SIGNATURE_LEN_BYTES or not self.origin.verify(
                self.signed_bytes(), self.signature):
            raise ProtocolError(f"folder change {self.origin.short}#{self.seq} has a bad "
                                "signature")
        return self

    def encode(self) -> bytes:
        return packb([self.origin.key, self.folder, self.seq, self.wall_ms,
                      self.info.to_wire(), self.signature])

    @cached_property
    def encoded(self) -> bytes:
        return self.encode()

    @classmethod
    def decode(cls, data: bytes) -> FolderChange:
        """Bytes -> a checked (not yet verified) change; ProtocolError otherwise."""
        obj = unpackb(data, max_bytes=MAX_CHANGE_BYTES)
        if not isinstance(obj, list) or len(obj) != 6:
            raise ProtocolError("folder change: expected a list of 6 fields")
        key, folder, seq, wall_ms, info, sig = obj
        if not isinstance(key, bytes) or len(key) != 32:
            raise ProtocolError("folder change: bad origin key")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_LEN_BYTES:
            raise ProtocolError("folder change: bad signature field")
        try:
            origin = PeerId(key)
        except IdentityError:
            raise ProtocolError("folder change: bad origin key") from None
        change = cls(origin, folder, seq, wall_ms, FileInfo.from_wire(info), sig)
        change.check()
        return change


def _check_blobs(items: tuple[Any, ...], what: str) -> None:
    for item in items:
        if not isinstance(item, bytes) or len(item) > MAX_CHANGE_BYTES:
            raise ProtocolError(f"{what}: each change is at most {MAX_CHANGE_BYTES} bytes")


@message("folders.hello", version=2)
class Hello(Message):
    folders: tuple[str, ...] = field(metadata=bound(max_len=MAX_FOLDERS))
    # the sender's label of each folder, in the same order ("" for none): shown with a
    # folder_offered notification; peer text, bounded here, made printable where shown
    labels: tuple[str, ...] = field(default=(), metadata=bound(max_len=MAX_FOLDERS))

    def validate(self) -> None:
        for f in self.folders:
            check_folder_id(f)
        if self.labels and len(self.labels) != len(self.folders):
            raise ProtocolError("folders hello: one label per folder, or none")
        for label in self.labels:
            if not isinstance(label, str) or len(label) > MAX_LABEL_LEN or len(
                    label.encode("utf-8", "surrogatepass")) > MAX_LABEL_BYTES:
                raise ProtocolError(f"folders hello: a label is at most {MAX_LABEL_LEN} "
                                    "characters")

    def label_of(self, folder: str) -> str:
        for f, label in zip(self.folders, self.labels, strict=False):
            if f == folder:
                return label
        return ""


@message("folders.digest")
class Digest(Message):
    folder: str = field(metadata=bound(max_len=64))
    marks: tuple[tuple[bytes, int], ...] = field(metadata=bound(max_len=DIGEST_ORIGINS_MAX))

    def validate(self) -> None:
        check_folder_id(self.folder)
        for item in self.marks:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not isinstance(item[0], bytes) or len(item[0]) != 32
                    or type(item[1]) is not int or not 0 <= item[1] <= MAX_SEQ):
                raise ProtocolError("folders digest: bad (origin, mark) entry")

    def as_dict(self) -> dict[bytes, int]:
        return {bytes(k): int(v) for k, v in self.marks}


@message("folders.changes")
class Changes(Message):
    folder: str = field(metadata=bound(max_len=64))
    origin: bytes = field(metadata=bound(max_len=32))
    upto: int = field(metadata=bound(min_val=0, max_val=MAX_SEQ))
    since: int = field(metadata=bound(min_val=0, max_val=MAX_SEQ))
    live: bool
    changes: tuple[bytes, ...] = field(metadata=bound(max_len=CHANGES_BATCH_MAX))

    def validate(self) -> None:
        check_folder_id(self.folder)
        if len(self.origin) != 32:
            raise ProtocolError("folders changes: bad origin key")
        if self.since > self.upto:
            raise ProtocolError("folders changes: since > upto")
        _check_blobs(self.changes, "folders changes")


FOLDER_MESSAGES = (Hello, Digest, Changes)

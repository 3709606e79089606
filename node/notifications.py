"""Notifications: one typed value per kind, what `node events` streams and the CLI renders.

Every notification the node produces is one of the frozen classes below, built
by its producer (sharing, gossip, sync, the daemon) and stored by the event log
as ``encode()``: a flat map whose keys are those the log has always stored, so
rows already in an events.db still ``decode()`` (older spellings are read too:
``reason`` for ``error``, ``origin`` for ``peer_id``, ``local_path`` for
``saved_as``, ``path`` for ``paths``).

Peers are named by their full id only. The label a person sees (the local
alias, else the short id) is resolved when a notification is shown: the daemon
sends ``labels`` (full id -> label) beside each one, and ``render(labels)``
falls back to the short id through ``peer_label``, the one place a label is
computed from an id. So one peer has one name in every line.

Imports the errors module only: the gossip, sharing and transfer layers import
this one, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from node.errors import ProtocolError

MAX_TEXT_LEN = 4096
MAX_PATHS = 64
SHORT_ID_LEN = 7  # the first group of a peer id, as PeerId.short shows it

Labels = Mapping[str, str]


def peer_label(peer_id: str, labels: Labels | None = None) -> str:
    """How a peer is shown: its label (alias, or "me") if known, else its short id."""
    if not peer_id:
        return "an unknown peer"
    found = (labels or {}).get(peer_id)
    return found if found else peer_id[:SHORT_ID_LEN]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Notice(Protocol):
    KIND: ClassVar[str]

    def encode(self) -> dict[str, Any]: ...

    def peers(self) -> tuple[str, ...]: ...

    def render(self, labels: Labels | None = None) -> str: ...


# -- field checks, once, at decode -------------------------------------------------
def _str(data: Mapping[str, Any], *keys: str, default: str = "") -> str:
    for key in keys:
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_TEXT_LEN:
            raise ProtocolError(f"notification field {key!r} must be a short string")
        return value
    return default


def _int(data: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"notification field {key!r} must be an integer")
    return value


def _bool(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"notification field {key!r} must be true or false")
    return value


def _paths(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("paths")
    if value is None:
        single = _str(data, "path")
        return (single,) if single else ()
    if not isinstance(value, list | tuple) or len(value) > MAX_PATHS:
        raise ProtocolError("notification field 'paths' must be a short list")
    out = []
    for p in value:
        if not isinstance(p, str) or len(p) > MAX_TEXT_LEN:
            raise ProtocolError("notification field 'paths' must hold short strings")
        out.append(p)
    return tuple(out)


# -- file changes (signed change events of a trusted origin, or our own) -------------
@dataclass(frozen=True, slots=True)
class _FileChange:
    """A change event someone (``local``: this node) made in a shared folder."""

    KIND: ClassVar[str] = ""
    event_id: str  # hex
    origin: str  # full peer id
    folder: str
    path: str
    change: str  # the event's own kind: created, modified, deleted, moved, shared
    size: int = 0
    hash: str = ""
    old_path: str = ""
    seq: int = 0
    lamport: int = 0
    wall_ms: int = 0
    local: bool = False
    via: str = ""  # full id of the peer that passed it on to us

    def encode(self) -> dict[str, Any]:
        return {"id": self.event_id, "origin": self.origin, "folder": self.folder,
                "seq": self.seq, "lamport": self.lamport, "wall_ms": self.wall_ms,
                "kind": self.change, "path": self.path, "old_path": self.old_path,
                "size": self.size, "hash": self.hash, "local": self.local, "via": self.via}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> _FileChange:
        return cls(event_id=_str(data, "id"), origin=_str(data, "origin"),
                   folder=_str(data, "folder"), path=_str(data, "path"),
                   change=_str(data, "kind"), size=_int(data, "size"),
                   hash=_str(data, "hash"), old_path=_str(data, "old_path"),
                   seq=_int(data, "seq"), lamport=_int(data, "lamport"),
                   wall_ms=_int(data, "wall_ms"), local=_bool(data, "local"),
                   via=_str(data, "via"))

    def peers(self) -> tuple[str, ...]:
        return tuple(p for p in (self.origin, self.via) if p)

    def render(self, labels: Labels | None = None) -> str:
        who = "me" if self.local else peer_label(self.origin, labels)
        where = f"{self.folder}/" if self.folder else ""
        what = (f"{where}{self.old_path} -> {where}{self.path}" if self.old_path
                else f"{where}{self.path or '?'}")
        size = f" ({human_size(self.size)})" if self.size and self.change != "deleted" else ""
        via = (f" (via {peer_label(self.via, labels)})"
               if self.via and self.via != self.origin and not self.local else "")
        return f"{what}{size} by {who}{via}"


@dataclass(frozen=True, slots=True)
class FileShared(_FileChange):
    KIND: ClassVar[str] = "file_shared"


@dataclass(frozen=True, slots=True)
class FileUpdated(_FileChange):
    KIND: ClassVar[str] = "file_updated"


@dataclass(frozen=True, slots=True)
class FileDeleted(_FileChange):
    KIND: ClassVar[str] = "file_deleted"


@dataclass(frozen=True, slots=True)
class FileMoved(_FileChange):
    KIND: ClassVar[str] = "file_moved"


FILE_CHANGE_CLASS: dict[str, type[_FileChange]] = {
    "created": FileShared, "shared": FileShared, "modified": FileUpdated,
    "deleted": FileDeleted, "moved": FileMoved,
}


class ChangeEventLike(Protocol):
    """What `file_change` reads of a node.gossip.events.ChangeEvent."""

    @property
    def id(self) -> bytes: ...
    @property
    def origin(self) -> object: ...
    @property
    def folder(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def old_path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def hash(self) -> bytes: ...
    @property
    def seq(self) -> int: ...
    @property
    def lamport(self) -> int: ...
    @property
    def wall_ms(self) -> int: ...


def file_change(event: ChangeEventLike, *, local: bool = False,
                via: object | None = None) -> _FileChange:
    """The notification for one accepted change event (our own when `local`)."""
    cls = FILE_CHANGE_CLASS[event.kind]
    return cls(event_id=event.id.hex(), origin=str(event.origin), folder=event.folder,
               path=event.path, change=event.kind, size=event.size, hash=event.hash.hex(),
               old_path=event.old_path, seq=event.seq, lamport=event.lamport,
               wall_ms=event.wall_ms, local=local, via=str(via) if via else "")


# -- transfers -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FileReceived:
    """A file arrived and matched its hash: pushed to us, or fetched/copied by sync."""

    KIND: ClassVar[str] = "file_received"
    peer_id: str  # full id of the sender (for sync: the event's origin)
    path: str
    size: int
    hash: str = ""
    saved_as: str = ""
    transfer_id: str = ""
    folder: str = ""
    event_id: str = ""
    how: str = "pushed"  # pushed | fetched | copied

    def encode(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "path": self.path, "size": self.size,
                "hash": self.hash, "saved_as": self.saved_as, "transfer_id": self.transfer_id,
                "folder": self.folder, "id": self.event_id, "how": self.how}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> FileReceived:
        return cls(peer_id=_str(data, "peer_id", "origin"), path=_str(data, "path"),
                   size=_int(data, "size"), hash=_str(data, "hash"),
                   saved_as=_str(data, "saved_as", "local_path"),
                   transfer_id=_str(data, "transfer_id"), folder=_str(data, "folder"),
                   event_id=_str(data, "id"), how=_str(data, "how", default="pushed"))

    def peers(self) -> tuple[str, ...]:
        return (self.peer_id,) if self.peer_id else ()

    def render(self, labels: Labels | None = None) -> str:
        where = f"{self.folder}/" if self.folder else ""
        how = "" if self.how == "pushed" else f", {self.how}"
        return (f"received {where}{self.path or '?'} ({human_size(self.size)}{how}) "
                f"from {peer_label(self.peer_id, labels)}")


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """A transfer (or applying a synced change) failed or was cancelled."""

    KIND: ClassVar[str] = "transfer_failed"
    peer_id: str
    direction: str  # send | receive | fetch | serve | sync
    error: str
    paths: tuple[str, ...] = ()
    state: str = "failed"  # failed | cancelled
    transfer_id: str = ""
    event_id: str = ""

    def encode(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "direction": self.direction, "error": self.error,
                "paths": list(self.paths), "state": self.state,
                "transfer_id": self.transfer_id, "id": self.event_id}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> TransferFailed:
        return cls(peer_id=_str(data, "peer_id", "origin"),
                   direction=_str(data, "direction", default="sync"),
                   error=_str(data, "error", "reason", default="unknown error"),
                   paths=_paths(data), state=_str(data, "state", default="failed"),
                   transfer_id=_str(data, "transfer_id"), event_id=_str(data, "id", "event"))

    def peers(self) -> tuple[str, ...]:
        return (self.peer_id,) if self.peer_id else ()

    def render(self, labels: Labels | None = None) -> str:
        if self.paths:
            what = ", ".join(self.paths[:3]) + (f" (+{len(self.paths) - 3} more)"
                                                if len(self.paths) > 3 else "")
        else:
            what = "a requested file" if self.direction == "serve" else "files"
        verb = {"send": "sending", "receive": "receiving", "fetch": "fetching",
                "serve": "serving", "sync": "syncing"}.get(self.direction, self.direction)
        return (f"{verb} {what} with {peer_label(self.peer_id, labels)} {self.state}: "
                f"{self.error}")


# -- presence, rejections -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Presence:
    KIND: ClassVar[str] = ""
    peer_id: str
    name: str = ""  # the name the peer gives itself (never used as its label)

    def encode(self) -> dict[str, Any]:
        # "peer" is the key rows of older versions carry: kept, so both read alike
        return {"peer_id": self.peer_id, "peer": self.peer_id, "name": self.name}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> _Presence:
        return cls(peer_id=_str(data, "peer_id", "peer"), name=_str(data, "name"))

    def peers(self) -> tuple[str, ...]:
        return (self.peer_id,) if self.peer_id else ()

    def render(self, labels: Labels | None = None) -> str:
        label = peer_label(self.peer_id, labels)
        calls = f" (calls itself {self.name!r})" if self.name and self.name != label else ""
        state = "is online" if self.KIND == "peer_joined" else "went offline"
        return f"{label}{calls} {state}"


@dataclass(frozen=True, slots=True)
class PeerJoined(_Presence):
    KIND: ClassVar[str] = "peer_joined"


@dataclass(frozen=True, slots=True)
class PeerLeft(_Presence):
    KIND: ClassVar[str] = "peer_left"


@dataclass(frozen=True, slots=True)
class EventRejected:
    """A change event (or gossip message) we refused; the audit table has the row."""

    KIND: ClassVar[str] = "event_rejected"
    reason: str
    via: str = ""  # full id of the peer that sent it
    origin: str = ""  # full id the event claims as its origin
    seq: int = -1
    event_id: str = ""

    def encode(self) -> dict[str, Any]:
        return {"reason": self.reason, "via": self.via, "origin": self.origin,
                "seq": self.seq, "event": self.event_id}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> EventRejected:
        return cls(reason=_str(data, "reason", default="no reason given"),
                   via=_str(data, "via"), origin=_str(data, "origin"),
                   seq=_int(data, "seq", -1), event_id=_str(data, "event"))

    def peers(self) -> tuple[str, ...]:
        return tuple(p for p in (self.via, self.origin) if p)

    def render(self, labels: Labels | None = None) -> str:
        what = "a message"
        if self.origin:
            what = f"an event of {peer_label(self.origin, labels)}"
            if self.seq >= 0:
                what += f" #{self.seq}"
        via = f" from {peer_label(self.via, labels)}" if self.via else ""
        return f"rejected {what}{via}: {self.reason}"


# -- folders ------------------------------------------------------------------------------
def _printable(text: str) -> str:
    """Peer-chosen text for a terminal line: control characters (escapes) shown as '?'."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)


@dataclass(frozen=True, slots=True)
class FolderOffered:
    """A trusted peer offers a folder id this node has not added with it: nothing syncs
    until the user adds the same id with that peer (`node folder add`)."""

    KIND: ClassVar[str] = "folder_offered"
    peer_id: str  # full id of the peer that offers it
    folder_id: str  # peer-chosen: bounded at decode, made printable at render
    label: str = ""

    def encode(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "folder_id": self.folder_id, "label": self.label}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> FolderOffered:
        return cls(peer_id=_str(data, "peer_id", "peer"), folder_id=_str(data, "folder_id"),
                   label=_str(data, "label"))

    def peers(self) -> tuple[str, ...]:
        return (self.peer_id,) if self.peer_id else ()

    def render(self, labels: Labels | None = None) -> str:
        who = peer_label(self.peer_id, labels)
        fid = _printable(self.folder_id) or "?"
        label = f" ({_printable(self.label)!r})" if self.label else ""
        return (f"{who} offers folder {fid}{label}; to sync it: "
                f"node folder add PATH --id {fid} --peer {who}")


@dataclass(frozen=True, slots=True)
class FolderConflict:
    """Two devices changed a file concurrently: the loser is kept as a conflict copy."""

    KIND: ClassVar[str] = "conflict"
    folder: str
    path: str
    copy: str  # the conflict copy's path in the folder
    peer_id: str = ""  # full id of the winning version's author, when known

    def encode(self) -> dict[str, Any]:
        return {"folder": self.folder, "path": self.path, "copy": self.copy,
                "peer_id": self.peer_id}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> FolderConflict:
        return cls(folder=_str(data, "folder"), path=_str(data, "path"),
                   copy=_str(data, "copy"), peer_id=_str(data, "peer_id"))

    def peers(self) -> tuple[str, ...]:
        return (self.peer_id,) if self.peer_id else ()

    def render(self, labels: Labels | None = None) -> str:
        by = f" (the other version is by {peer_label(self.peer_id, labels)})" if (
            self.peer_id) else ""
        return (f"conflict in {self.folder}/{self.path}: both versions kept, ours as "
                f"{self.copy}{by}")


@dataclass(frozen=True, slots=True)
class FolderLocallyChanged:
    """Files of a receive-only folder were edited here: kept, reported, never sent (`node
    folder revert ID` restores the global version, the edit kept in the versions folder)."""

    KIND: ClassVar[str] = "locally_changed"
    local: ClassVar[bool] = True  # about edits made on this node: it names no peer
    folder: str
    paths: tuple[str, ...]  # the names newly changed (at most MAX_PATHS)
    count: int = 0  # how many names are locally changed in all

    def encode(self) -> dict[str, Any]:
        return {"folder": self.folder, "paths": list(self.paths[:MAX_PATHS]),
                "count": self.count}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> FolderLocallyChanged:
        return cls(folder=_str(data, "folder"), paths=_paths(data), count=_int(data, "count"))

    def peers(self) -> tuple[str, ...]:
        return ()

    def render(self, labels: Labels | None = None) -> str:
        shown = ", ".join(_printable(p) for p in self.paths[:5])
        more = f" and {len(self.paths) - 5} more" if len(self.paths) > 5 else ""
        return (f"locally changed in receive-only folder {self.folder}: {shown}{more} "
                f"({self.count} in all; not sent; node folder revert {self.folder} restores "
                "the global version)")


KINDS: dict[str, Any] = {cls.KIND: cls for cls in (
    FileShared, FileUpdated, FileDeleted, FileMoved, FileReceived, TransferFailed,
    PeerJoined, PeerLeft, EventRejected, FolderOffered, FolderConflict,
    FolderLocallyChanged)}
NOTIFICATION_KINDS = tuple(KINDS)


def decode(kind: str, data: object) -> Notice:
    """The typed value of a stored notification; ProtocolError for an unknown kind or a
    field of the wrong type."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown notification kind {kind!r}")
    if not isinstance(data, Mapping):
        raise ProtocolError("notification data must be a map")
    notice: Notice = cls.decode(data)
    return notice


def render(kind: str, data: object, labels: Labels | None = None) -> str:
    """One line for a stored notification; an unreadable one says so instead of failing."""
    try:
        return decode(kind, data).render(labels)
    except ProtocolError as exc:
        return f"(unreadable {kind} notification: {exc})"

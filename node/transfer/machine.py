"""The transfer protocol as two pure state machines: ``SourceMachine`` and ``SinkMachine``.

Sans-IO, like ``node/transports/udp_machine.py`` and aioquic's ``QuicConnection``:
a machine never touches a channel, a file or a clock. Decoded peer messages enter
through ``receive(msg, now)``; the outcome of local work the machine asked for
enters through one method each (``resolved``, ``chunk_sent``, ``file_planned``,
``chunk_written``, ``files_committed``); time enters only as ``now`` and through
``get_timer()`` / ``handle_timer(now)``. What the machine wants done comes out of
``next_event()``: a message to send, a chunk to read and send, a file to plan, a
chunk to verify and write, files to commit. The asyncio driver (session.py) owns
the channel, the worker threads and the timers, and decides nothing about the
protocol: which chunk to ask for, what a peer may send when, how often a bad
chunk is re-requested, when a file is committed and when the transfer is over
are all decided here. A peer that breaks the rules raises ProtocolError (the
machine is FAILED by then); an Abort from the peer raises RemoteError.

States (each change goes through ``_set_state`` / ``_set_file``, which refuse an
illegal transition)::

    source  AWAITING_REQUEST -> PREPARING -> SERVING -> DONE      (serve_fetch)
                                PREPARING -> SERVING -> DONE      (send_files)
            any -> FAILED | CANCELLED
      file  OFFERED -> SENDING -> SENT | FAILED;  OFFERED -> HAVE | REFUSED
    sink    AWAITING_OFFER -> RECEIVING -> DONE;  any -> FAILED | CANCELLED
      file  QUEUED | INLINE -> PLANNING -> RECEIVING -> COMMIT_QUEUED -> COMMITTING
            -> DONE | FAILED;  PLANNING -> HAVE | REFUSED | COMMIT_QUEUED (resumed whole)

Message flow and limits are in protocol.py. Must not import asyncio, the channel,
transports, the store or the daemon.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from node.errors import IntegrityError, LocalIOError, PeerUnreachable, ProtocolError, RemoteError
from node.transfer.manifest import FileEntry
from node.transfer.paths import safe_relpath
from node.transfer.protocol import (
    MAX_CHUNKS_PER_TRANSFER,
    MAX_FILES_PER_TRANSFER,
    Abort,
    ChunkData,
    ChunkRequest,
    ChunkView,
    Complete,
    FetchManyRequest,
    FetchRequest,
    FileDone,
    FileStatus,
    FileStatusCode,
    Keepalive,
    Offer,
    clip,
    inline_indices,
    offer_batches,
)
from node.wire import Message

log = logging.getLogger(__name__)

WINDOW_BYTES = 16 << 20  # chunk bytes requested and not yet received (pipelining)
# a window with requests in flight is topped up once this much of it is free, so
# requests go out (and are read and answered) a few at a time, not one per chunk
REQUEST_BATCH_BYTES = 4 << 20
MAX_CHUNK_FAILURES = 3  # the same chunk failing verification this often aborts the transfer
IDLE_TIMEOUT_S = 60.0  # no message from the peer for this long: it is unreachable
KEEPALIVE_INTERVAL_S = 10.0  # while busy locally (hashing, planning), tell the peer we live
REQUEST_SLACK_FACTOR = 4  # a sink may re-request chunks, but not without bound
MAX_QUEUED_REQUESTS = 1024  # requests the source holds before serving them
MAX_PENDING_WRITES = 2  # received chunks waiting for the writer (memory: 2 chunks)
# complete files committed together (one syncfs, then the renames)
COMMIT_BATCH_FILES = 256
MAX_OPEN_PARTIALS = 256  # partial files a sink holds open (many small files in the window)


# ---------------------------------------------------------------------------
# what a machine asks its driver to do


@dataclass(frozen=True, slots=True)
class SendMessage:
    message: Message


@dataclass(frozen=True, slots=True)
class Resolve:
    """Source: find and hash the files a fetch names; answer with ``resolved``."""

    wanted: tuple[tuple[str, bytes | None], ...]
    many: bool


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """Source: read this chunk (hash it first when ``verify``), send it as ChunkData, then
    call ``chunk_sent``."""

    index: int
    chunk: int
    verify: bool


@dataclass(frozen=True, slots=True)
class PlanFile:
    """Sink: look at the disk for this file (have it, resume a partial, refused); answer
    with ``file_planned``."""

    index: int


@dataclass(frozen=True, slots=True)
class WriteChunk:
    """Sink: verify this chunk against the manifest and write it; answer ``chunk_written``."""

    index: int
    chunk: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class CommitFiles:
    """Sink: make these complete files durable and rename them into place (one sync for
    all); answer ``files_committed``."""

    indices: tuple[int, ...]


Event = SendMessage | Resolve | ReadChunk | PlanFile | WriteChunk | CommitFiles


class TransferPhase(Enum):
    AWAITING_REQUEST = "awaiting_request"
    PREPARING = "preparing"
    SERVING = "serving"
    AWAITING_OFFER = "awaiting_offer"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TransferPhase.DONE, TransferPhase.FAILED, TransferPhase.CANCELLED})

_SOURCE_MOVES: dict[TransferPhase, frozenset[TransferPhase]] = {
    TransferPhase.AWAITING_REQUEST: frozenset({TransferPhase.PREPARING}),
    TransferPhase.PREPARING: frozenset({TransferPhase.SERVING}),
    TransferPhase.SERVING: frozenset({TransferPhase.DONE}),
}
_SINK_MOVES: dict[TransferPhase, frozenset[TransferPhase]] = {
    TransferPhase.AWAITING_OFFER: frozenset({TransferPhase.RECEIVING}),
    TransferPhase.RECEIVING: frozenset({TransferPhase.DONE}),
}


class SourceFileState(Enum):
    OFFERED = "offered"
    SENDING = "sending"  # the sink needs it (FileStatus NEED, or inline)
    SENT = "sent"  # FileDone ok
    HAVE = "have"
    REFUSED = "refused"
    FAILED = "failed"  # FileDone not ok


_SOURCE_FILE_MOVES: dict[SourceFileState, frozenset[SourceFileState]] = {
    SourceFileState.OFFERED: frozenset({SourceFileState.SENDING, SourceFileState.HAVE,
                                        SourceFileState.REFUSED}),
    # an inline file is SENDING before its status: the sink may still say HAVE / REFUSED
    SourceFileState.SENDING: frozenset({SourceFileState.SENT, SourceFileState.FAILED,
                                        SourceFileState.HAVE, SourceFileState.REFUSED}),
}


class SinkFileState(Enum):
    QUEUED = "queued"
    INLINE = "inline"  # its only chunk comes unrequested
    PLANNING = "planning"
    RECEIVING = "receiving"
    COMMIT_QUEUED = "commit_queued"
    COMMITTING = "committing"
    DONE = "done"
    HAVE = "have"
    REFUSED = "refused"
    FAILED = "failed"


_SINK_FILE_MOVES: dict[SinkFileState, frozenset[SinkFileState]] = {
    SinkFileState.QUEUED: frozenset({SinkFileState.PLANNING}),
    SinkFileState.INLINE: frozenset({SinkFileState.PLANNING}),
    SinkFileState.PLANNING: frozenset({SinkFileState.HAVE, SinkFileState.REFUSED,
                                       SinkFileState.RECEIVING, SinkFileState.COMMIT_QUEUED}),
    SinkFileState.RECEIVING: frozenset({SinkFileState.COMMIT_QUEUED}),
    SinkFileState.COMMIT_QUEUED: frozenset({SinkFileState.COMMITTING}),
    SinkFileState.COMMITTING: frozenset({SinkFileState.DONE, SinkFileState.FAILED}),
}


class PlanOutcome(Enum):
    NEED = "need"
    HAVE = "have"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """A file the transfer finished: ``path`` is the receiver's final file (sink) or
    None (source: the driver knows where it lives)."""

    index: int
    rel_path: str
    size: int
    root_hex: str
    path: Path | None


class IllegalTransition(LocalIOError):
    """The driver fed a machine out of order (a bug on our side, never the peer's): the
    transfer stops with this as a local error instead of going on in a wrong state."""


def _remote_error(peer: str, msg: Abort) -> RemoteError:
    err = RemoteError(f"{peer} aborted the transfer: {msg.reason}")
    err.code = msg.code  # type: ignore[attr-defined]
    return err


class _Machine:
    """What both machines share: the phase, counters for progress, the timers."""

    _moves: dict[TransferPhase, frozenset[TransferPhase]] = {}

    def __init__(self, phase: TransferPhase, *, peer: str, now: float,
                 idle_timeout_s: float | None, keepalive_s: float | None) -> None:
        self.phase = phase
        self.idle_timeout_s = IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s
        self.keepalive_s = KEEPALIVE_INTERVAL_S if keepalive_s is None else keepalive_s
        self.peer = peer
        self.tid = b""
        self.error = ""  # why the transfer ended, when it did not succeed
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0
        self.current = ""
        self.failures: list[tuple[str, str]] = []
        self._events: collections.deque[Event] = collections.deque()
        self._waiting_since = now  # since when we wait for the peer (idle timeout)
        self._last_sent = now  # keepalives while busy locally

    # -- state ---------------------------------------------------------------
    def _set_state(self, new: TransferPhase) -> None:
        if self.phase in TERMINAL:
            raise IllegalTransition(f"transfer already {self.phase.value}")
        if new not in TERMINAL and new not in self._moves.get(self.phase, frozenset()):
            raise IllegalTransition(
                f"illegal transfer transition {self.phase.value} -> {new.value}")
        log.debug("transfer %s %s -> %s", self.tid.hex(), self.phase.value, new.value)
        self.phase = new

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    def halt(self, phase: TransferPhase, error: str = "") -> None:
        """The transfer ends early (FAILED or CANCELLED): the driver stopped it."""
        if phase not in (TransferPhase.FAILED, TransferPhase.CANCELLED):
            raise ValueError("halt() takes FAILED or CANCELLED")
        if not self.finished:
            self.error = error
            self._set_state(phase)
            self._events.clear()

    def _violation(self, text: str) -> ProtocolError:
        if not self.finished:
            self._set_state(TransferPhase.FAILED)
        self.error = text
        return ProtocolError(text)

    # -- events --------------------------------------------------------------
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _send(self, msg: Message, now: float) -> None:
        self._last_sent = now
        self._events.append(SendMessage(msg))

    # -- timers --------------------------------------------------------------
    def _busy_locally(self) -> bool:
        return False

    def _local_done(self, now: float) -> None:
        """Local work finished: the peer gets a full idle timeout from here."""
        self._waiting_since = max(self._waiting_since, now)

    def get_timer(self) -> float | None:
        if self.finished:
            return None
        if self._busy_locally():
            return self._last_sent + self.keepalive_s
        return self._waiting_since + self.idle_timeout_s

    def handle_timer(self, now: float) -> None:
        if self.finished:
            return
        if self._busy_locally():
            if now >= self._last_sent + self.keepalive_s:
                self._send(Keepalive("busy"), now)
            return
        if now >= self._waiting_since + self.idle_timeout_s:
            text = f"{self.peer} sent nothing for {self.idle_timeout_s:.0f} s; giving up"
            self._set_state(TransferPhase.FAILED)
            self.error = text
            raise PeerUnreachable(text)

    def _heard(self, msg: Any, now: float) -> None:
        self._waiting_since = now
        if isinstance(msg, Abort):
            error = _remote_error(self.peer, msg)
            self._set_state(TransferPhase.FAILED)
            self.error = str(error)
            raise error

    def sent_something(self, now: float) -> None:
        """The driver put a frame on the wire (keepalives are due only when we are silent)."""
        self._last_sent = now


# ---------------------------------------------------------------------------
# source


class SourceMachine(_Machine):
    """The sender: offers a manifest, answers the sink's chunk requests."""

    _moves = _SOURCE_MOVES
    expect: tuple[type[Message], ...] = (FetchRequest, FetchManyRequest, FileStatus,
                                         ChunkRequest, FileDone, Complete, Keepalive, Abort)

    def __init__(self, tid: bytes = b"", *, peer: str = "", now: float = 0.0,
                 serve_request: bool = False, idle_timeout_s: float | None = None,
                 keepalive_s: float | None = None) -> None:
        super().__init__(TransferPhase.AWAITING_REQUEST if serve_request
                         else TransferPhase.PREPARING, peer=peer, now=now,
                         idle_timeout_s=idle_timeout_s, keepalive_s=keepalive_s)
        self.tid = tid
        self.entries: list[FileEntry] = []
        self.files: list[SourceFileState] = []
        self._request: tuple[str, bytes | None] | None = None  # a single-file fetch
        self._inline_mode = False
        self._inline: set[int] = set()
        self._served: dict[int, bytearray] = {}  # file -> chunks sent once (a repeat is checked)
        self._counted: dict[int, bytearray] = {}  # file -> chunks counted in bytes_done
        self._credited: collections.Counter[int] = collections.Counter()  # file -> bytes counted
        self._queued = 0  # chunk reads asked of the driver, not yet sent
        self._request_count = 0
        self._max_requests = 16
        self._settled = 0  # files with a final answer (HAVE, REFUSED, FileDone)

    def _busy_locally(self) -> bool:
        return self.phase is TransferPhase.PREPARING

    def _set_file(self, index: int, new: SourceFileState) -> None:
        old = self.files[index]
        if new not in _SOURCE_FILE_MOVES.get(old, frozenset()):
            raise self._violation(f"file {index}: {old.value} -> {new.value} breaks the protocol")
        self.files[index] = new
        if new in (SourceFileState.SENT, SourceFileState.FAILED, SourceFileState.HAVE,
                   SourceFileState.REFUSED):
            self._settled += 1
            self.files_done += 1

    # -- starting ------------------------------------------------------------
    def offer(self, entries: Sequence[FileEntry], now: float, *, inline: bool = False) -> None:
        """The manifest is ready (send_files, or a fetch once ``Resolve`` was answered)."""
        if self.phase is not TransferPhase.PREPARING:
            raise IllegalTransition(f"offer() while {self.phase.value}")
        self._local_done(now)
        entries = list(entries)
        if len(entries) > MAX_FILES_PER_TRANSFER:
            self.halt(TransferPhase.FAILED, "too many files")
            raise LocalIOError(f"too many files to share at once ({len(entries)} > "
                               f"{MAX_FILES_PER_TRANSFER})")
        if self._request is not None:
            path, want = self._request
            if not (len(entries) == 1 and entries[0].path == path
                    and (want is None or entries[0].root == want)):
                reason = f"no such file: {path}"
                if len(entries) == 1 and entries[0].path == path:
                    reason = f"{path} has changed since it was announced"
                self._send(Abort("NotFound", clip(reason)), now)
                self.error = reason
                self._set_state(TransferPhase.FAILED)
                return
        self.entries = entries
        self.files = [SourceFileState.OFFERED] * len(entries)
        self.files_total = len(entries)
        self.bytes_total = sum(e.size for e in entries)
        self._max_requests = 16 + REQUEST_SLACK_FACTOR * sum(e.chunks for e in entries)
        self._set_state(TransferPhase.SERVING)
        for msg in offer_batches(self.tid, entries):
            self._send(msg, now)
        self._inline_mode = inline or self._inline_mode
        if self._inline_mode:
            self._inline = inline_indices(entries)
            for index in sorted(self._inline):  # sent unrequested, as if asked for
                self.files[index] = SourceFileState.SENDING
                self._request_count += 1
                self._read(index, 0)

    # -- peer input ----------------------------------------------------------
    def receive(self, msg: Message, now: float) -> None:
        if self.finished:
            return
        try:
            self._receive(msg, now)
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None

    def _receive(self, msg: Message, now: float) -> None:
        self._heard(msg, now)
        if isinstance(msg, Keepalive):
            return
        if self.phase is TransferPhase.AWAITING_REQUEST:
            self._on_fetch(msg)
            return
        if self.phase is not TransferPhase.SERVING:
            raise self._violation(f"unexpected {type(msg).TYPE} while {self.phase.value}")
        if isinstance(msg, ChunkRequest):
            self._on_request(msg)
        elif isinstance(msg, FileStatus):
            self._on_status(msg)
        elif isinstance(msg, FileDone):
            self._on_done(msg)
        elif isinstance(msg, Complete):
            if msg.transfer_id != self.tid:
                raise self._violation("Complete names another transfer")
            if self._settled != len(self.entries):
                raise self._violation("Complete before every file was answered")
            self._set_state(TransferPhase.DONE)
        else:
            raise self._violation(f"unexpected {type(msg).TYPE} during a transfer")

    def _on_fetch(self, msg: Message) -> None:
        if isinstance(msg, FetchManyRequest):
            self.tid = msg.transfer_id
            wanted = msg.wanted()
            for path, _root in wanted:
                self._safe(path)
            self._inline_mode = True
            self._set_state(TransferPhase.PREPARING)
            self._events.append(Resolve(tuple(wanted), True))
        elif isinstance(msg, FetchRequest):
            self.tid = msg.transfer_id
            self._safe(msg.path)
            self._request = (msg.path, msg.root)
            self._set_state(TransferPhase.PREPARING)
            self._events.append(Resolve(((msg.path, msg.root),), False))
        else:
            raise self._violation(f"expected a fetch request, got {type(msg).TYPE}")

    def _safe(self, path: str) -> None:
        """A hostile path never reaches the driver's resolve()."""
        try:
            safe_relpath(path)
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None

    def _entry(self, index: int) -> FileEntry:
        if index >= len(self.entries):
            raise self._violation(f"file index {index} is not in the offer")
        return self.entries[index]

    def _on_status(self, msg: FileStatus) -> None:
        e = self._entry(msg.index)
        try:
            code = FileStatusCode(msg.status)
        except ValueError:
            raise self._violation(f"bad status for file {msg.index}") from None
        state = self.files[msg.index]
        inline_unanswered = (msg.index in self._inline and state is SourceFileState.SENDING)
        if state is not SourceFileState.OFFERED and not (
                inline_unanswered and code is not FileStatusCode.NEED):
            raise self._violation(f"second status for file {msg.index}")
        self.current = e.path
        if inline_unanswered:
            self._inline.discard(msg.index)  # answered: the sink dropped the data we sent
        if code is FileStatusCode.HAVE:
            self._set_file(msg.index, SourceFileState.HAVE)
            self._credit(msg.index, max(0, e.size - self._credited[msg.index]))
        elif code is FileStatusCode.REFUSED:
            self.failures.append((e.path, msg.reason or "refused by the receiver"))
            self._set_file(msg.index, SourceFileState.REFUSED)
        else:
            if msg.missing > e.chunks:
                raise self._violation(f"status for file {msg.index} claims too many chunks")
            self._set_file(msg.index, SourceFileState.SENDING)
            # a first guess (which chunks it has is the sink's business); exact at FileDone
            self._credit(msg.index, e.size - min(e.size, msg.missing * e.chunk_size))

    def _on_done(self, msg: FileDone) -> None:
        e = self._entry(msg.index)
        if self.files[msg.index] is not SourceFileState.SENDING:
            raise self._violation(f"FileDone for file {msg.index} that was not being sent")
        self._inline.discard(msg.index)
        if not msg.ok:
            self.failures.append((e.path, msg.reason or "receiver failed"))
        else:
            self._credit(msg.index, max(0, e.size - self._credited[msg.index]))
        self._set_file(msg.index, SourceFileState.SENT if msg.ok else SourceFileState.FAILED)

    def _on_request(self, msg: ChunkRequest) -> None:
        e = self._entry(msg.index)
        if self.files[msg.index] is not SourceFileState.SENDING:
            raise self._violation(f"chunk request for file {msg.index} that is not being sent")
        if msg.chunk >= e.chunks:
            raise self._violation(f"chunk request {msg.chunk} beyond the end of {e.path}")
        self._request_count += 1
        if self._request_count > self._max_requests:
            raise self._violation("too many chunk requests")
        if self._queued >= MAX_QUEUED_REQUESTS:
            raise self._violation("too many chunk requests in flight")
        self._read(msg.index, msg.chunk)

    def _read(self, index: int, chunk: int) -> None:
        served = self._served.setdefault(index, bytearray(self.entries[index].chunks))
        verify = bool(served[chunk])  # asked again: the sink found it bad, so check it
        served[chunk] = 1
        self._queued += 1
        self._events.append(ReadChunk(index, chunk, verify))

    # -- driver input --------------------------------------------------------
    def chunk_sent(self, index: int, chunk: int, now: float) -> None:
        self._queued -= 1
        self._last_sent = now
        e = self.entries[index]
        self.current = e.path
        counted = self._counted.setdefault(index, bytearray(e.chunks))
        if not counted[chunk]:  # a chunk sent again (it failed verification) counts once
            counted[chunk] = 1
            self._credit(index, e.chunk_len(chunk))

    def _credit(self, index: int, nbytes: int) -> None:
        self._credited[index] += nbytes
        self.bytes_done += nbytes

    def outcomes(self) -> list[FileOutcome]:
        """The files the sink has now (received, or had already)."""
        failed = {path for path, _ in self.failures}
        return [FileOutcome(i, e.path, e.size, e.root.hex(), None)
                for i, e in enumerate(self.entries)
                if self.files[i] in (SourceFileState.SENT, SourceFileState.HAVE)
                and e.path not in failed]


# ---------------------------------------------------------------------------
# sink


class SinkMachine(_Machine):
    """The receiver: takes the offer, plans each file, keeps a window of chunk requests
    in flight, has every chunk verified, commits complete files in batches."""

    _moves = _SINK_MOVES
    expect: tuple[type[Message], ...] = (Offer, ChunkData, Keepalive, Abort)

    def __init__(self, *, peer: str = "", now: float = 0.0,
                 request: FetchRequest | FetchManyRequest | None = None,
                 idle_timeout_s: float | None = None, keepalive_s: float | None = None,
                 commit_batch_files: int | None = None) -> None:
        super().__init__(TransferPhase.AWAITING_OFFER, peer=peer, now=now,
                         idle_timeout_s=idle_timeout_s, keepalive_s=keepalive_s)
        self.commit_batch_files = (COMMIT_BATCH_FILES if commit_batch_files is None
                                   else commit_batch_files)
        self._request = request
        self.expect_one: tuple[str, bytes | None] | None = None
        self.expect_many: dict[str, bytes | None] | None = None
        if isinstance(request, FetchRequest):
            self.tid = request.transfer_id
            self.expect_one = (request.path, request.root)
        elif isinstance(request, FetchManyRequest):
            self.tid = request.transfer_id
            self.expect_many = dict(request.wanted())
        self.entries: list[FileEntry] = []
        self.files: list[SinkFileState] = []
        self.bytes_payload = 0
        self._offer_seq = 0
        self._offer_paths: set[str] = set()
        self._offer_dirs: set[str] = set()
        self._offer_chunks = 0
        self._next_file = 0
        self._planning_next: int | None = None  # the one queued file being planned
        self._planning: set[int] = set()  # every file being planned (queued + inline)
        self._inline_waiting: set[int] = set()  # inline files whose data has not come
        self._inline_data: dict[int, bytes | memoryview] = {}  # data held while it plans
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._in_flight: dict[tuple[int, int], int] = {}
        self._in_flight_bytes = 0
        self._topping_up = False  # requesting until the window is full (REQUEST_BATCH_BYTES)
        self._chunk_failures: collections.Counter[tuple[int, int]] = collections.Counter()
        self._remaining: dict[int, int] = {}  # RECEIVING file -> chunks not yet written
        self._writes: collections.Counter[int] = collections.Counter()  # file -> writes out
        self._writes_total = 0
        self._receiving = 0
        self._to_commit: list[int] = []
        self._committing = False
        self._finals: dict[int, Path] = {}
        self.results: list[FileOutcome] = []

    def start(self, now: float) -> None:
        """A fetch sends its request first; an offer needs nothing."""
        if self._request is not None:
            self._send(self._request, now)
            self._request = None

    def _busy_locally(self) -> bool:
        return bool(self._planning) or self._committing or self._writes_total > 0

    def _set_file(self, index: int, new: SinkFileState) -> None:
        old = self.files[index]
        if new not in _SINK_FILE_MOVES.get(old, frozenset()):
            raise IllegalTransition(f"file {index}: illegal transition {old.value} -> {new.value}")
        self.files[index] = new
        if old is SinkFileState.RECEIVING:
            self._receiving -= 1
        if new is SinkFileState.RECEIVING:
            self._receiving += 1
        if new in (SinkFileState.HAVE, SinkFileState.REFUSED, SinkFileState.DONE,
                   SinkFileState.FAILED):
            self.files_done += 1

    def wants_input(self) -> bool:
        """False while the writer is behind: the driver then reads nothing from the peer
        (memory stays bounded by MAX_PENDING_WRITES chunks)."""
        return not self.finished and self._writes_total < MAX_PENDING_WRITES

    # -- peer input ----------------------------------------------------------
    def receive(self, msg: Message | ChunkView, now: float) -> None:
        if self.finished:
            return
        try:
            self._receive(msg, now)
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None

    def _receive(self, msg: Message | ChunkView, now: float) -> None:
        self._heard(msg, now)
        if isinstance(msg, Keepalive):
            return
        if self.phase is TransferPhase.AWAITING_OFFER:
            if not isinstance(msg, Offer):
                got = msg.TYPE if isinstance(msg, Message) else ChunkData.TYPE
                raise self._violation(f"expected an offer, got {got}")
            self._on_offer(msg, now)
        elif isinstance(msg, (ChunkView, ChunkData)):
            self._on_chunk(msg.index, msg.chunk, msg.data, now)
        else:
            raise self._violation(f"unexpected {type(msg).TYPE} during a transfer")
        self._settle(now)

    def _on_offer(self, msg: Offer, now: float) -> None:
        if self._offer_seq == 0 and not self.tid:
            self.tid = msg.transfer_id
        if msg.transfer_id != self.tid or msg.seq != self._offer_seq:
            raise self._violation("offer contradicts the earlier ones (transfer id or sequence)")
        try:
            offered = msg.files()
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None
        for e in offered:
            rel = safe_relpath(e.path)
            parents = {p.as_posix() for p in rel.parents if p.parts}
            if (e.path in self._offer_paths or e.path in self._offer_dirs
                    or parents & self._offer_paths):
                raise self._violation(f"offer names {e.path[:80]!r} twice or as file and folder")
            self._offer_paths.add(e.path)
            self._offer_dirs |= parents
            self._offer_chunks += e.chunks
            self.entries.append(e)
        if (len(self.entries) > MAX_FILES_PER_TRANSFER
                or self._offer_chunks > MAX_CHUNKS_PER_TRANSFER):
            raise self._violation("offer is larger than the transfer limits")
        self._offer_seq += 1
        if not msg.last:
            return
        if self.expect_one is not None:
            path, root = self.expect_one
            if [e.path for e in self.entries] != [path] or (
                    root is not None and self.entries[0].root != root):
                raise self._violation(f"answered a fetch of {path[:80]!r} with another file")
        self.files = [SinkFileState.QUEUED] * len(self.entries)
        if self.expect_many is not None:
            for e in self.entries:
                if e.path not in self.expect_many:
                    raise self._violation(f"answered a fetch with {e.path[:80]!r}, "
                                          "not asked for")
                want = self.expect_many[e.path]
                if want is not None and e.root != want:
                    raise self._violation(f"answered a fetch of {e.path[:80]!r} with other "
                                          "content")
            for path in self.expect_many.keys() - self._offer_paths:
                self.failures.append((path, f"{self.peer} no longer has it (or it changed)"))
            self._inline_waiting = inline_indices(self.entries)
            for index in self._inline_waiting:
                self.files[index] = SinkFileState.INLINE
        self.files_total = len(self.entries)
        self.bytes_total = sum(e.size for e in self.entries)
        self._set_state(TransferPhase.RECEIVING)

    def _on_chunk(self, index: int, chunk: int, data: bytes | memoryview, now: float) -> None:
        key = (index, chunk)
        clen = self._in_flight.pop(key, -1)
        if clen >= 0:
            self._in_flight_bytes -= clen
        elif chunk == 0 and index in self._inline_waiting:
            self._inline_waiting.discard(index)
            clen = self.entries[index].chunk_len(0)
            if len(data) != clen:
                raise self._violation(f"chunk {chunk} of file {index} has the wrong size")
            self._inline_data[index] = data  # written once the file is planned
            self._plan(index)
            return
        else:
            raise self._violation(f"{self.peer} sent chunk {chunk} of file {index} "
                                  "it was not asked for")
        if len(data) != clen:
            raise self._violation(f"chunk {chunk} of file {index} has the wrong size")
        self._write(index, chunk, data)

    def _write(self, index: int, chunk: int, data: bytes | memoryview) -> None:
        self.bytes_payload += len(data)
        self._writes[index] += 1
        self._writes_total += 1
        self._events.append(WriteChunk(index, chunk, data))

    # -- driver input --------------------------------------------------------
    def file_planned(self, index: int, outcome: PlanOutcome, now: float, *,
                     missing: Sequence[int] = (), final: Path | None = None,
                     reason: str = "") -> None:
        """The driver looked at the disk: the file is there (HAVE, at ``final``), blocked
        (REFUSED, ``reason``), or NEED with the chunks still ``missing``."""
        if self.finished:
            return
        if index not in self._planning:
            raise IllegalTransition(f"file {index} was not being planned")
        self._planning.discard(index)
        if self._planning_next == index:
            self._planning_next = None
        self._local_done(now)
        e = self.entries[index]
        self.current = e.path
        data = self._inline_data.pop(index, None)
        if outcome is PlanOutcome.REFUSED:
            self.failures.append((e.path, reason))
            self._set_file(index, SinkFileState.REFUSED)
            self._send(FileStatus(index, FileStatusCode.REFUSED, 0, clip(reason)), now)
        elif outcome is PlanOutcome.HAVE:
            self.bytes_done += e.size
            self.results.append(FileOutcome(index, e.path, e.size, e.root.hex(), final))
            self._set_file(index, SinkFileState.HAVE)
            self._send(FileStatus(index, FileStatusCode.HAVE, 0, ""), now)
        else:
            missing = sorted(set(missing))
            if any(not 0 <= c < e.chunks for c in missing):
                raise IllegalTransition(f"plan of {e.path} names chunks outside the file")
            if final is not None:
                self._finals[index] = final
            self.bytes_done += e.size - sum(e.chunk_len(c) for c in missing)
            if data is None:  # an inline file's NEED is implied
                self._send(FileStatus(index, FileStatusCode.NEED, len(missing), ""), now)
            if not missing:  # resumed complete (or seeded whole): commit it
                self._set_file(index, SinkFileState.COMMIT_QUEUED)
                self._queue_commit(index)
            else:
                self._set_file(index, SinkFileState.RECEIVING)
                self._remaining[index] = len(missing)
                if data is not None:
                    self._write(index, 0, data)
                else:
                    self._pending.extend((index, c) for c in missing)
        self._settle(now)

    def chunk_written(self, index: int, chunk: int, ok: bool, now: float) -> None:
        """The writer verified (and, when ``ok``, wrote) a chunk."""
        if self.finished:
            return
        if self._writes[index] <= 0:
            raise IllegalTransition(f"chunk {chunk} of file {index} was not being written")
        self._writes[index] -= 1
        self._writes_total -= 1
        self._local_done(now)
        e = self.entries[index]
        key = (index, chunk)
        if not ok:
            self._chunk_failures[key] += 1
            n = self._chunk_failures[key]
            log.warning("chunk %d of %s from %s failed verification (%d)", chunk, e.path,
                        self.peer, n)
            if n >= MAX_CHUNK_FAILURES:
                text = (f"chunk {chunk} of {e.path} from {self.peer} failed verification "
                        f"{n} times; transfer aborted")
                self.error = text
                self._set_state(TransferPhase.FAILED)
                raise IntegrityError(text)
            self._pending.appendleft(key)
        else:
            self.bytes_done += e.chunk_len(chunk)
            self.current = e.path
            self._remaining[index] -= 1
            if self._remaining[index] == 0 and self._writes[index] == 0:
                del self._remaining[index]
                del self._writes[index]
                self._set_file(index, SinkFileState.COMMIT_QUEUED)
                self._queue_commit(index)
        self._settle(now)

    def files_committed(self, outcomes: Sequence[tuple[int, Path | None, str]],
                        now: float) -> None:
        """The last CommitFiles is done: (index, final path, "") or (index, None, reason)."""
        if self.finished:
            return
        if not self._committing:
            raise IllegalTransition("files_committed() without a commit")
        self._committing = False
        self._local_done(now)
        for index, final, reason in outcomes:
            e = self.entries[index]
            if final is None:
                self.failures.append((e.path, reason))
                self._set_file(index, SinkFileState.FAILED)
                self._send(FileDone(index, False, clip(reason)), now)
            else:
                self.results.append(FileOutcome(index, e.path, e.size, e.root.hex(), final))
                self._set_file(index, SinkFileState.DONE)
                self._send(FileDone(index, True, ""), now)
        self._settle(now)

    # -- decisions -----------------------------------------------------------
    def _plan(self, index: int) -> None:
        self._set_file(index, SinkFileState.PLANNING)
        self._planning.add(index)
        self._events.append(PlanFile(index))

    def _queue_commit(self, index: int) -> None:
        self._to_commit.append(index)
        if len(self._to_commit) >= self.commit_batch_files:
            self._start_commit()

    def _start_commit(self) -> None:
        """One commit at a time; files completed meanwhile wait for the next."""
        if not self._to_commit or self._committing:
            return
        batch, self._to_commit = tuple(self._to_commit), []
        for index in batch:
            self._set_file(index, SinkFileState.COMMITTING)
        self._committing = True
        self._events.append(CommitFiles(batch))

    def _pump(self, now: float) -> None:
        """Keep the window full: open the next file when its chunks are all requested."""
        while True:
            if not self._pending:
                if (self._planning_next is not None or self._next_file >= len(self.entries)
                        or (self._receiving >= MAX_OPEN_PARTIALS and self._in_flight)
                        or (len(self._to_commit) >= 2 * self.commit_batch_files
                            and self._committing)):
                    return
                index = self._next_file
                self._next_file += 1
                if self.files[index] is not SinkFileState.QUEUED:
                    continue  # inline: planned when its data arrives (maybe done already)
                self._planning_next = index
                self._plan(index)
                return
            index, c = self._pending[0]
            clen = self.entries[index].chunk_len(c)
            if self._in_flight and self._in_flight_bytes + clen > WINDOW_BYTES:
                self._topping_up = False
                return
            if (self._in_flight and not self._topping_up
                    and WINDOW_BYTES - self._in_flight_bytes < REQUEST_BATCH_BYTES):
                return  # wait until a batch worth of the window is free
            self._topping_up = True
            self._pending.popleft()
            self._in_flight[(index, c)] = clen
            self._in_flight_bytes += clen
            self._send(ChunkRequest(index, c), now)

    def _settle(self, now: float) -> None:
        if self.phase is not TransferPhase.RECEIVING:
            return
        self._pump(now)
        if not self._in_flight:
            self._start_commit()  # nothing to wait for from the peer: commit now
        if (not self._in_flight and not self._pending and not self._planning
                and not self._inline_waiting and self._writes_total == 0
                and self._next_file >= len(self.entries)
                and not self._to_commit and not self._committing):
            self._send(Complete(self.tid), now)
            self._set_state(TransferPhase.DONE)

    def final_path(self, index: int) -> Path | None:
        return self._finals.get(index)


__all__ = [
    "COMMIT_BATCH_FILES",
    "IDLE_TIMEOUT_S",
    "KEEPALIVE_INTERVAL_S",
    "MAX_CHUNK_FAILURES",
    "MAX_OPEN_PARTIALS",
    "MAX_PENDING_WRITES",
    "MAX_QUEUED_REQUESTS",
    "REQUEST_BATCH_BYTES",
    "TERMINAL",
    "WINDOW_BYTES",
    "CommitFiles",
    "Event",
    "FileOutcome",
    "IllegalTransition",
    "PlanFile",
    "PlanOutcome",
    "ReadChunk",
    "Resolve",
    "SendMessage",
    "SinkFileState",
    "SinkMachine",
    "SourceFileState",
    "SourceMachine",
    "TransferPhase",
    "WriteChunk",
]

"""Async transfer sessions over an authenticated channel: source (sender) and sink (receiver).

The channel is duck-typed (node/channel.py's SecureChannel or the in-memory
pair in node/memory_channel.py): ``peer``, ``peer_name``, ``async send(bytes)``,
``async recv() -> bytes`` (ChannelClosed at the end), ``async close()``.
Message flow and types are in protocol.py; disk work is in store.py and
manifest.py and runs in worker threads so the event loop keeps the pipe busy.

Public API (called by the daemon):
    send_files(channel, root, paths, *, progress, cancel, transfer_id) -> TransferResult
    receive_files(channel, store, *, progress, cancel) -> TransferResult
    fetch_file(channel, rel_path, root_hash, store, *, progress, cancel) -> TransferResult
    fetch_files(channel, items, store, *, progress, cancel) -> TransferResult   (one session)
    serve_fetch(channel, resolve, *, progress, cancel) -> TransferResult

Errors raised: ChannelClosed / PeerUnreachable (channel died or peer silent for
IDLE_TIMEOUT_S), IntegrityError (repeated bad chunk; file changed while being
sent), LocalIOError (our disk), Cancelled, ProtocolError (peer broke the
rules), RemoteError (the peer sent Abort; ``.code`` holds its error class name).
The peer is told with Abort whenever the channel still works.

Must not import the daemon, CLI, transports or gossip.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from node.errors import (
    Cancelled,
    ChannelClosed,
    IntegrityError,
    LocalIOError,
    P2PError,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
)
from node.transfer.manifest import FileEntry, SourceFile, build_manifest, hash_chunk
from node.transfer.paths import PathBlocked, safe_relpath, sanitize_label
from node.transfer.protocol import (
    MAX_CHUNKS_PER_TRANSFER,
    MAX_FILES_PER_FETCH,
    MAX_FILES_PER_TRANSFER,
    TO_SINK,
    TO_SOURCE,
    TRANSFER_ID_BYTES,
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
    chunk_header,
    clip,
    decode,
    inline_indices,
    offer_batches,
    parse_chunk_data,
)
from node.transfer.seeds import SeedIndex, seed_partial
from node.transfer.store import PartialBusy, PartialFile, PlanKind, ReceiveStore
from node.wire import Message

log = logging.getLogger(__name__)

WINDOW_BYTES = 16 << 20  # chunk bytes requested and not yet received (pipelining)
MAX_CHUNK_FAILURES = 3  # the same chunk failing verification this often aborts the transfer
IDLE_TIMEOUT_S = 60.0  # no message from the peer for this long: it is unreachable
ABORT_SEND_TIMEOUT_S = 2.0
ABORT_LINGER_S = 0.5  # after an Abort, how long we wait for the peer to close first
PROGRESS_INTERVAL_S = 0.1
KEEPALIVE_INTERVAL_S = 10.0  # while hashing or re-checking locally, tell the peer we are alive
REQUEST_SLACK_FACTOR = 4  # a sink may re-request chunks, but not without bound
MAX_QUEUED_REQUESTS = 1024  # requests the source holds before serving them
MAX_PENDING_WRITES = 2  # received chunks waiting for the writer thread (memory: 2 chunks)
READ_BUFFERS = 2  # frame buffers the source keeps: the one being sent + the one read ahead
SEND_CANCEL_LOSES_FRAME = frozenset({"udp", "quic"})  # see _Session._stop_worker_first
SUPERSEDE_WAIT_S = 5.0  # how long a new session waits for the stale one to let go of a file
# complete files committed together (store.commit_batch: one syncfs, then the renames);
# an fsync per file costs 4.5 ms here one after another
COMMIT_BATCH_FILES = 256
# disk work this small (a small file's plan, a chunk's read or hash + write) runs on the
# loop: a hop to a worker thread costs more CPU than the work itself
SMALL_IO_BYTES = 64 << 10
MAX_OPEN_PARTIALS = 256  # partial files a sink holds open (many small files in the window)


class Superseded(P2PError):
    """A newer session from the same peer took over the file this one was receiving."""


class StopSignal(asyncio.Event):
    """A cancel event that can say why the transfer stops.

    ``set()`` is a user's cancel (Cancelled); ``stop(error)`` ends the transfer
    with ``error`` instead (trust revoked, superseded by a newer session).
    """

    def __init__(self) -> None:
        super().__init__()
        self.error: P2PError | None = None

    def stop(self, error: P2PError) -> None:
        if not self.is_set():
            self.error = error
            self.set()


class TransferState(Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TransferProgress:
    transfer_id: str
    peer: str
    file: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    state: str


class FileResult(NamedTuple):
    rel_path: str
    size: int
    root_hex: str
    path: Path | None  # final path on the receiver; the source path on the sender


@dataclass
class TransferResult:
    transfer_id: str
    files: list[FileResult]
    bytes_sent_on_wire: int
    bytes_received_payload: int
    state: TransferState
    error: str | None = None
    peer: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # (rel_path, reason)


ProgressFn = Callable[[TransferProgress], None]
ResolveFn = Callable[[str, bytes | None], tuple[Path, Path] | None]


def _peer_label(channel: Any) -> str:
    name = getattr(channel, "peer_name", "") or ""
    peer = getattr(channel, "peer", None)
    short = getattr(peer, "short", "") if peer is not None else ""
    return sanitize_label(str(name), str(short))


class _Session:
    """What source and sink share: message I/O with cancel/timeout, progress, Abort."""

    role = "session"

    def __init__(self, channel: Any, progress: ProgressFn | None,
                 cancel: asyncio.Event | None) -> None:
        self.channel = channel
        self.progress_fn = progress
        self.cancel = cancel
        self.peer = _peer_label(channel)
        self.tid = b""
        self.bytes_on_wire = 0
        self.bytes_payload = 0
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0
        self.current = ""
        self.state = TransferState.RUNNING
        self._last_progress = 0.0
        self._cancel_task: asyncio.Task[Any] | None = None
        self._worker: asyncio.Task[None] | None = None

    def _set_state(self, state: TransferState) -> None:
        log.debug("transfer %s %s -> %s", self.tid.hex(), self.state.value, state.value)
        self.state = state
        self._report(force=True)

    def _report(self, *, force: bool = False) -> None:
        if self.progress_fn is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self.progress_fn(TransferProgress(self.tid.hex(), self.peer, self.current, self.bytes_done,
                                          self.bytes_total, self.files_done, self.files_total,
                                          self.state.value))

    async def _send(self, msg: Message) -> None:
        data = msg.encode()
        self.bytes_on_wire += len(data)
        await self._send_raw(data)

    async def _send_raw(self, data: bytes | memoryview) -> None:
        """Send one frame; PeerUnreachable if the peer takes nothing for IDLE_TIMEOUT_S."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                await self.channel.send(data)
        except TimeoutError:
            raise PeerUnreachable(
                f"{self.peer} accepted nothing for {IDLE_TIMEOUT_S:.0f} s; giving up") from None
        except P2PError:
            raise
        except (OSError, ConnectionError) as exc:
            raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None

    async def _recv(self, expect: tuple[type[Message], ...]) -> Message:
        """Next message from the peer, skipping Keepalives (each one resets the idle timeout)."""
        while True:
            msg = await self._recv_one(expect)
            if not isinstance(msg, Keepalive):
                assert isinstance(msg, Message)
                return msg

    async def _recv_chunk_or(self, expect: tuple[type[Message], ...]) -> Message | ChunkView:
        """Like _recv, but a ChunkData comes back as a ChunkView into the frame (no copy)."""
        while True:
            msg = await self._recv_one(expect, chunk_views=True)
            if not isinstance(msg, Keepalive):
                return msg

    async def _recv_one(self, expect: tuple[type[Message], ...], *,
                        chunk_views: bool = False) -> Message | ChunkView:
        """One message; also wakes up for cancel, idle timeout or a dead worker."""
        if self.cancel is not None and self.cancel.is_set():
            raise self._stop_error()
        self._check_worker()
        try:
            if self.cancel is None and self._worker is None:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a task cancel
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    data = await self.channel.recv()
            else:
                waiters: set[asyncio.Future[Any]] = set()
                if self.cancel is not None:
                    if self._cancel_task is None:
                        self._cancel_task = asyncio.ensure_future(self.cancel.wait())
                    waiters.add(self._cancel_task)
                if self._worker is not None:
                    waiters.add(self._worker)
                recv_task = asyncio.ensure_future(self.channel.recv())
                try:
                    done, _ = await asyncio.wait({recv_task, *waiters}, timeout=IDLE_TIMEOUT_S,
                                                 return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    recv_task.cancel()
                    raise
                if recv_task not in done:
                    recv_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, P2PError, OSError):
                        await recv_task
                    self._check_worker()
                    if self._cancel_task is not None and self._cancel_task in done:
                        raise self._stop_error()
                    raise TimeoutError
                data = recv_task.result()
        except TimeoutError:
            raise PeerUnreachable(
                f"{self.peer} sent nothing for {IDLE_TIMEOUT_S:.0f} s; giving up") from None
        except P2PError:
            raise
        except (OSError, ConnectionError) as exc:
            raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None
        if chunk_views:
            view = parse_chunk_data(data)
            if view is not None:
                return view
        msg = decode(data, expect)
        if isinstance(msg, Abort):
            err = RemoteError(f"{self.peer} aborted the transfer: {msg.reason}")
            err.code = msg.code  # type: ignore[attr-defined]
            raise err
        return msg

    def _stop_error(self) -> P2PError:
        error = getattr(self.cancel, "error", None)
        return error if isinstance(error, P2PError) else Cancelled("transfer cancelled")

    def _check_worker(self) -> None:
        """Re-raise the failure of a background worker (the source's chunk sender)."""
        w = self._worker
        if w is not None and w.done():
            self._worker = None
            exc = w.exception()
            if exc is not None:
                raise exc
            raise ProtocolError("chunk sender stopped unexpectedly")

    async def _local(self, fn: Callable[..., Any], *args: Any,
                     cleanup: Callable[[Any], None] | None = None) -> Any:
        """Run blocking disk/hash work in a thread, sending Keepalives while it lasts.

        If we are interrupted (cancel, peer gone) the thread still finishes; its
        result is then handed to `cleanup` so nothing it opened leaks.
        """
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=KEEPALIVE_INTERVAL_S)
                if done:
                    return fut.result()
                await self._send(Keepalive("busy"))
        except BaseException:
            if cleanup is not None:
                def after(f: asyncio.Future[Any]) -> None:
                    if not f.cancelled() and f.exception() is None:
                        cleanup(f.result())
                fut.add_done_callback(after)
            else:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def _abort(self, code: str, reason: str, *, linger: bool = False) -> None:
        """Tell the peer why we stop; best effort, bounded in time.

        With `linger`, wait (up to ABORT_LINGER_S) for the peer to close after it read
        the Abort, discarding what it still sends: closing a TCP socket with unread
        data resets it, and the reset would throw away the Abort queued behind our
        last chunks, so the peer would see "connection lost" instead of the reason.
        """
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send(Abort(clip(code, 32), clip(reason))),
                                   ABORT_SEND_TIMEOUT_S)
        if linger:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ABORT_LINGER_S):
                    while True:
                        await self.channel.recv()

    async def _guard(self, body: Callable[[], Any]) -> Any:
        """Run the session body; on failure tell the peer and re-raise a node.errors type."""
        try:
            return await body()
        except asyncio.CancelledError:
            self.state = TransferState.CANCELLED
            raise
        except Cancelled as exc:
            await self._stop_worker_first()
            await self._abort("Cancelled", "cancelled by the user", linger=True)
            self._set_state(TransferState.CANCELLED)
            raise Cancelled(str(exc) or "transfer cancelled") from None
        except (RemoteError, ChannelClosed, PeerUnreachable):
            self._set_state(TransferState.FAILED)
            raise
        except ProtocolError as exc:
            log.warning("cutting off %s: %s", self.peer, exc)
            await self._stop_worker_first()
            await self._abort("ProtocolError", str(exc))
            self._set_state(TransferState.FAILED)
            raise ProtocolError(f"{self.peer} broke the transfer protocol: {exc}") from None
        except P2PError as exc:
            await self._stop_worker_first()
            await self._abort(type(exc).__name__, str(exc), linger=True)
            self._set_state(TransferState.FAILED)
            raise
        finally:
            await self._stop_worker()
            if self._cancel_task is not None:
                self._cancel_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._cancel_task
                self._cancel_task = None

    async def _stop_worker_first(self) -> None:
        """Before an Abort: stop the chunk sender, so the Abort is not held back while it
        waits on a full pipe with the channel's send lock (a revocation must reach the
        peer at once). Only where a cancelled send loses nothing: over tcp a frame is
        queued before the wait; over udp and quic it is sealed first and queued after
        the wait, so cancelling there would leave a gap the peer rejects."""
        if getattr(self.channel, "transport", "") not in SEND_CANCEL_LOSES_FRAME:
            await self._stop_worker()

    async def _stop_worker(self) -> None:
        """Cancel the source's chunk sender (it may wait on a full pipe while holding the
        channel's send lock, which would hold an Abort back behind it)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(BaseException):
                await worker

    def _result(self, files: list[FileResult], failures: list[tuple[str, str]],
                sent: int, received: int) -> TransferResult:
        error = None
        if failures:
            first = failures[0]
            error = clip(f"{len(failures)} of {self.files_total} files failed; "
                         f"{first[0]}: {first[1]}", 500)
            self._set_state(TransferState.FAILED)
        else:
            self._set_state(TransferState.DONE)
        return TransferResult(self.tid.hex(), files, sent, received, self.state, error,
                              self.peer, failures)


# ---------------------------------------------------------------------------
# source


class _Source(_Session):
    role = "source"

    def __init__(self, channel: Any, tid: bytes, files: list[SourceFile],
                 progress: ProgressFn | None, cancel: asyncio.Event | None,
                 prepare: tuple[Path, list[Path]] | None = None, inline: bool = False) -> None:
        super().__init__(channel, progress, cancel)
        self.tid = tid
        self._prepare = prepare
        self._inline_mode = inline  # a fetch-many session: small files go inline
        self._inline: set[int] = set()
        self._inline_answered: set[int] = set()
        self._set_files(files)
        # the worker thread reads through one open file at a time
        self._fd = -1
        self._fd_index = -1
        self._fd_ctime_ns = 0
        self._fd_lock = threading.Lock()
        self._status: dict[int, FileStatusCode] = {}
        self._finished: set[int] = set()
        self._failures: list[tuple[str, str]] = []
        self._requests: asyncio.Queue[ChunkRequest | None] = asyncio.Queue()
        self._request_count = 0
        self._served: dict[int, bytearray] = {}  # file -> chunks sent once (a repeat is checked)
        self._buffers: list[bytearray] = []  # frame buffers for reuse (read-ahead needs two)

    def _set_files(self, files: list[SourceFile]) -> None:
        self.files = files
        self.files_total = len(files)
        self.bytes_total = sum(f.entry.size for f in files)
        self._max_requests = 16 + REQUEST_SLACK_FACTOR * sum(f.entry.chunks for f in files)

    async def run(self) -> TransferResult:
        try:
            return await self._guard(self._run)
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._fd_index = -1, -1

    async def _run(self) -> TransferResult:
        if self._prepare is not None:
            root, paths = self._prepare
            files = await self._local(build_manifest, root, paths)
            if len(files) > MAX_FILES_PER_TRANSFER:
                raise LocalIOError(f"too many files to share at once ({len(files)} > "
                                   f"{MAX_FILES_PER_TRANSFER})")
            self._set_files(files)
        self._report(force=True)
        for offer in offer_batches(self.tid, [f.entry for f in self.files]):
            await self._send(offer)
        if self._inline_mode:
            self._inline = inline_indices([f.entry for f in self.files])
            for index in sorted(self._inline):  # sent unrequested, as if asked for
                self._status[index] = FileStatusCode.NEED
                self._request_count += 1
                self._requests.put_nowait(ChunkRequest(index, 0))
        # requests are read here and served by a worker, so neither side ever waits
        # on a full pipe for the other (and disk reads overlap with sending)
        self._worker = asyncio.ensure_future(self._serve_requests())
        while True:
            msg = await self._recv(TO_SOURCE)
            if isinstance(msg, ChunkRequest):
                self._on_request(msg)
            elif isinstance(msg, FileStatus):
                self._on_status(msg)
            elif isinstance(msg, FileDone):
                self._on_done(msg)
            elif isinstance(msg, Complete):
                if msg.transfer_id != self.tid:
                    raise ProtocolError("Complete names another transfer")
                if len(self._finished) != len(self.files):
                    raise ProtocolError("Complete before every file was answered")
                break
            else:
                raise ProtocolError(f"unexpected {type(msg).TYPE} during a transfer")
        worker, self._worker = self._worker, None
        self._requests.put_nowait(None)
        await worker
        failed = {path for path, _ in self._failures}
        results = [FileResult(f.entry.path, f.entry.size, f.entry.root.hex(), f.abspath)
                   for i, f in enumerate(self.files)
                   if i in self._finished and f.entry.path not in failed]
        return self._result(results, self._failures, self.bytes_on_wire, 0)

    def _file(self, index: int) -> SourceFile:
        if index >= len(self.files):
            raise ProtocolError(f"file index {index} is not in the offer")
        return self.files[index]

    def _on_status(self, msg: FileStatus) -> None:
        sf = self._file(msg.index)
        code = FileStatusCode(msg.status)
        if (msg.index in self._inline and msg.index not in self._inline_answered
                and msg.index not in self._finished and code != FileStatusCode.NEED):
            # an inline file the sink already has (or refuses): it drops the data we sent
            self._inline_answered.add(msg.index)
            del self._status[msg.index]
        if msg.index in self._status:
            raise ProtocolError(f"second status for file {msg.index}")
        self._status[msg.index] = code
        self.current = sf.entry.path
        if code == FileStatusCode.HAVE:
            self._finish(msg.index)
            self.bytes_done += sf.entry.size
        elif code == FileStatusCode.REFUSED:
            self._failures.append((sf.entry.path, msg.reason or "refused by the receiver"))
            self._finish(msg.index)
        else:
            if msg.missing > sf.entry.chunks:
                raise ProtocolError(f"status for file {msg.index} claims too many chunks")
            self.bytes_done += sf.entry.size - min(sf.entry.size,
                                                   msg.missing * sf.entry.chunk_size)
        self._report()

    def _finish(self, index: int) -> None:
        self._finished.add(index)
        self.files_done += 1

    def _on_done(self, msg: FileDone) -> None:
        sf = self._file(msg.index)
        if self._status.get(msg.index) != FileStatusCode.NEED or msg.index in self._finished:
            raise ProtocolError(f"FileDone for file {msg.index} that was not being sent")
        if not msg.ok:
            self._failures.append((sf.entry.path, msg.reason or "receiver failed"))
        self._finish(msg.index)
        self._report(force=True)

    def _on_request(self, msg: ChunkRequest) -> None:
        sf = self._file(msg.index)
        if self._status.get(msg.index) != FileStatusCode.NEED or msg.index in self._finished:
            raise ProtocolError(f"chunk request for file {msg.index} that is not being sent")
        if msg.chunk >= sf.entry.chunks:
            raise ProtocolError(f"chunk request {msg.chunk} beyond the end of {sf.entry.path}")
        self._request_count += 1
        if self._request_count > self._max_requests:
            raise ProtocolError("too many chunk requests")
        if self._requests.qsize() >= MAX_QUEUED_REQUESTS:
            raise ProtocolError("too many chunk requests in flight")
        self._requests.put_nowait(msg)

    async def _serve_requests(self) -> None:
        """Send requested chunks in order, reading the next one from disk while one is sent."""
        reading: tuple[ChunkRequest, asyncio.Future[memoryview]] | None = None
        try:
            while True:
                if reading is None:
                    req = await self._requests.get()
                    if req is None:
                        return
                    reading = (req, self._start_read(req))
                req, fut = reading
                frame = await fut
                reading = None
                if not self._requests.empty():
                    # read ahead: the next chunk comes off the disk while this one is sent
                    nxt = self._requests.get_nowait()
                    if nxt is None:
                        self._requests.put_nowait(None)
                    else:
                        reading = (nxt, self._start_read(nxt))
                sf = self.files[req.index]
                self.current = sf.entry.path
                self.bytes_on_wire += len(frame)
                await self._send_raw(frame)
                self._release_buffer(frame)
                self.bytes_done += sf.entry.chunk_len(req.chunk)
                self._report()
        finally:
            if reading is not None:
                # its thread still finishes; collect the outcome so nothing is left dangling
                reading[1].add_done_callback(lambda f: f.cancelled() or f.exception())

    def _start_read(self, req: ChunkRequest) -> asyncio.Future[memoryview]:
        served = self._served.setdefault(req.index, bytearray(self.files[req.index].entry.chunks))
        verify = bool(served[req.chunk])  # asked again: the sink found it bad, so check it
        served[req.chunk] = 1
        buf = self._buffers.pop() if self._buffers else None
        if self.files[req.index].entry.chunk_len(req.chunk) <= SMALL_IO_BYTES:
            done: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
            try:
                done.set_result(self._read_chunk(req.index, req.chunk, verify, buf))
            except P2PError as exc:
                done.set_exception(exc)
            return done
        return asyncio.ensure_future(
            asyncio.to_thread(self._read_chunk, req.index, req.chunk, verify, buf))

    def _release_buffer(self, frame: memoryview) -> None:
        """Keep a sent frame's buffer for the next read (a channel is done with it once
        send() returned: it seals, i.e. copies, or queues a copy)."""
        buf = frame.obj
        try:
            frame.release()
        except BufferError:
            return  # someone still holds a view of it: let it go
        if isinstance(buf, bytearray) and len(self._buffers) < READ_BUFFERS:
            self._buffers.append(buf)

    def _changed(self, sf: SourceFile) -> IntegrityError:
        return IntegrityError(f"{sf.entry.path} changed while being sent; share it again")

    def _read_chunk(self, index: int, chunk: int, verify: bool,
                    buf: bytearray | None) -> memoryview:
        """One ChunkData frame, the chunk read from disk right behind its header.

        The file must look unchanged (size, mtime, inode) before and after the
        read. The chunk is not hashed here: the sink verifies every chunk, and
        when it asks for one again (``verify``), the chunk is hashed before it
        goes out, so a file changed in place is reported as such.
        """
        sf = self.files[index]
        e = sf.entry
        want = e.chunk_len(chunk)
        header = chunk_header(index, chunk, want)
        total = len(header) + want
        if buf is None or len(buf) < total:
            buf = bytearray(max(total, len(header) + e.chunk_size))
        view = memoryview(buf)[:total]
        view[:len(header)] = header
        payload = view[len(header):]
        with self._fd_lock:
            try:
                if self._fd_index != index:
                    if self._fd >= 0:
                        os.close(self._fd)
                        self._fd, self._fd_index = -1, -1
                    self._fd = os.open(sf.abspath, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                                       | getattr(os, "O_NOFOLLOW", 0))
                    self._fd_index = index
                    self._fd_ctime_ns = os.fstat(self._fd).st_ctime_ns
                if not self._unchanged(sf, os.fstat(self._fd)):
                    raise self._changed(sf)
                got = 0
                while got < want:
                    n = os.preadv(self._fd, [payload[got:]], chunk * e.chunk_size + got)
                    if n <= 0:
                        break
                    got += n
                if not self._unchanged(sf, os.fstat(self._fd)) or got != want:
                    raise self._changed(sf)
            except FileNotFoundError:
                raise IntegrityError(f"{e.path} was deleted while being sent") from None
            except OSError as exc:
                raise LocalIOError(f"cannot read {sf.abspath}: {exc.strerror}") from None
        if verify and hash_chunk(payload) != e.chunk_hash(chunk):
            raise self._changed(sf)
        payload.release()
        return view

    def _unchanged(self, sf: SourceFile, st: os.stat_result) -> bool:
        """Same file as in the manifest, and not written since we opened it (ctime
        moves on every write, even when someone puts the mtime back)."""
        return (st.st_ino == sf.inode and st.st_size == sf.entry.size
                and st.st_mtime_ns == sf.entry.mtime_ns and st.st_ctime_ns == self._fd_ctime_ns)


# ---------------------------------------------------------------------------
# sink


class _Sink(_Session):
    role = "sink"

    def __init__(self, channel: Any, store: ReceiveStore, progress: ProgressFn | None,
                 cancel: asyncio.Event | None, seeds: Sequence[Path] = ()) -> None:
        # a sink can always be stopped: a newer session for the same file supersedes it
        super().__init__(channel, progress, cancel if cancel is not None else StopSignal())
        self.store = store
        self.seeds = SeedIndex(seeds)  # local files whose chunks are copied, not fetched
        self._ended = asyncio.Event()  # set once every partial file is released
        self.entries: list[FileEntry] = []
        self._partials: dict[int, PartialFile] = {}
        self._results: list[FileResult] = []
        self._failures: list[tuple[str, str]] = []
        self.expect: tuple[str, bytes | None] | None = None  # fetch: the one file we asked for
        # fetch of a batch: the files we asked for (the offer may leave some out)
        self.expect_many: dict[str, bytes | None] | None = None
        self._finalizer: concurrent.futures.ThreadPoolExecutor | None = None
        self._finishing: list[asyncio.Task[None]] = []  # the commit in progress
        self._to_commit: list[tuple[int, PartialFile]] = []  # complete, not yet committed
        self._inline_waiting: set[int] = set()  # fetch-many: small files coming unrequested
        # chunks handed to the writer thread (hash + pwrite), settled in order by the loop
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writes: collections.deque[
            tuple[tuple[int, int], int, concurrent.futures.Future[bool]]] = collections.deque()
        self._file_writes: collections.Counter[int] = collections.Counter()

    async def run(self, first: Callable[[], Any] | None = None) -> TransferResult:
        async def body() -> TransferResult:
            if first is not None:
                await first()
            await self._collect_offers()
            return await self._transfer()

        try:
            return await self._guard(body)
        finally:
            try:
                await self._stop_writer()
                await self._stop_finalizer()
            finally:
                for partial in self._partials.values():
                    self.store.release(partial)  # saves resume state; waits for a busy writer
                self._partials.clear()
                for _index, partial in self._to_commit:
                    self.store.release(partial)  # complete, not renamed: resume finds it so
                self._to_commit = []
                self._ended.set()

    async def supersede(self, by: _Sink) -> bool:
        """Stop this session because `by` (same peer, same file) replaces it; True once
        it let go of its partial files (their verified chunks are saved for `by`)."""
        # the sender is told (Abort): an old sender still alive gives up instead of retrying
        error = Superseded(f"superseded: a newer transfer of the same file from {self.peer} "
                           "replaced this one")
        if isinstance(self.cancel, StopSignal):
            self.cancel.stop(error)
        elif self.cancel is not None:
            self.cancel.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUPERSEDE_WAIT_S):
                await self._ended.wait()
        return self._ended.is_set()

    async def _plan(self, folder: Path, entry: FileEntry) -> Any:
        """store.plan; a stale session of the same peer holding the file is superseded.

        A sender that crashed and restarted looks alive to us until the transport's
        idle timeout (30 s over udp and quic): its new session for the same file,
        from the same authenticated peer, takes over the partial file and resumes.
        """
        try:
            if entry.size <= SMALL_IO_BYTES and not self.seeds:
                return self._plan_blocking(folder, entry)
            return await self._local(self._plan_blocking, folder, entry,
                                     cleanup=self._release_plan)
        except PartialBusy as exc:
            holder = exc.holder
            if (not isinstance(holder, _Sink) or holder is self
                    or holder.channel.peer != self.channel.peer):
                raise
            log.info("a new transfer from %s supersedes the one still receiving %s",
                     self.peer, entry.path)
            if not await holder.supersede(self):
                raise
        return await self._local(self._plan_blocking, folder, entry,
                                 cleanup=self._release_plan)

    def _plan_blocking(self, folder: Path, entry: FileEntry) -> Any:
        """store.plan, then the chunks the seeds hold copied in (blocking)."""
        plan = self.store.plan(folder, entry, self)
        if plan.partial is not None and self.seeds:
            try:
                seed_partial(plan.partial, self.seeds)
            except BaseException:
                self.store.release(plan.partial)
                raise
        return plan

    async def _collect_offers(self) -> None:
        files: set[str] = set()
        dirs: set[str] = set()
        chunks = 0
        seq = 0
        while True:
            msg = await self._recv(TO_SINK)
            if not isinstance(msg, Offer):
                raise ProtocolError(f"expected an offer, got {type(msg).TYPE}")
            if seq == 0 and not self.tid:
                self.tid = msg.transfer_id
            if msg.transfer_id != self.tid or msg.seq != seq:
                raise ProtocolError("offer contradicts the earlier ones (transfer id or sequence)")
            for e in msg.files():
                rel = safe_relpath(e.path)
                parents = {p.as_posix() for p in rel.parents if p.parts}
                if e.path in files or e.path in dirs or parents & files:
                    raise ProtocolError(f"offer names {e.path[:80]!r} twice or as file and folder")
                files.add(e.path)
                dirs |= parents
                chunks += e.chunks
                self.entries.append(e)
            if len(self.entries) > MAX_FILES_PER_TRANSFER or chunks > MAX_CHUNKS_PER_TRANSFER:
                raise ProtocolError("offer is larger than the transfer limits")
            seq += 1
            if msg.last:
                break
        if self.expect is not None:
            path, root = self.expect
            if [e.path for e in self.entries] != [path] or (
                    root is not None and self.entries[0].root != root):
                raise ProtocolError(f"answered a fetch of {path[:80]!r} with another file")
        if self.expect_many is not None:
            for e in self.entries:
                if e.path not in self.expect_many:
                    raise ProtocolError(f"answered a fetch with {e.path[:80]!r}, not asked for")
                want = self.expect_many[e.path]
                if want is not None and e.root != want:
                    raise ProtocolError(f"answered a fetch of {e.path[:80]!r} with other content")
            for path in self.expect_many.keys() - files:
                self._failures.append((path, f"{self.peer} no longer has it (or it changed)"))
            self._inline_waiting = inline_indices(self.entries)
        self.files_total = len(self.entries)
        self.bytes_total = sum(e.size for e in self.entries)

    async def _transfer(self) -> TransferResult:
        folder = await asyncio.to_thread(self.store.folder, self.peer)
        pending: collections.deque[tuple[int, int]] = collections.deque()
        in_flight: dict[tuple[int, int], int] = {}
        in_flight_bytes = 0
        failures: collections.Counter[tuple[int, int]] = collections.Counter()
        next_file = 0
        self._report(force=True)
        while True:
            # keep the window full: open the next file when its chunks are all requested
            self._reap_finished()
            while True:
                if not pending:
                    if next_file >= len(self.entries) or (
                            len(self._partials) >= MAX_OPEN_PARTIALS and in_flight):
                        break
                    index = next_file
                    next_file += 1
                    if index in self._inline_waiting:
                        continue  # opened when its data arrives
                    pending.extend((index, c) for c in await self._open_file(folder, index))
                    continue
                index, c = pending[0]
                clen = self.entries[index].chunk_len(c)
                if in_flight and in_flight_bytes + clen > WINDOW_BYTES:
                    break
                pending.popleft()
                in_flight[(index, c)] = clen
                in_flight_bytes += clen
                await self._send(ChunkRequest(index, c))
            if not in_flight and not self._writes and not self._inline_waiting:
                if next_file < len(self.entries) or pending:
                    continue  # the open-partials bound held the next files back
                break
            if not in_flight:
                self._start_commit()  # nothing to wait for from the peer: commit now
            if self._writes and (len(self._writes) >= MAX_PENDING_WRITES or not in_flight
                                 or self._writes[0][2].done()):
                await self._settle_write(pending, failures)
                continue
            msg = await self._recv_chunk_or(TO_SINK)
            if isinstance(msg, Message) and not isinstance(msg, ChunkData):
                raise ProtocolError(f"unexpected {type(msg).TYPE} during a transfer")
            key = (msg.index, msg.chunk)
            clen = in_flight.pop(key, -1)
            if clen >= 0:
                in_flight_bytes -= clen
            elif msg.chunk == 0 and msg.index in self._inline_waiting:
                self._inline_waiting.discard(msg.index)
                if not await self._open_inline(folder, msg.index):
                    continue  # we have it already, or cannot take it: the data is dropped
                clen = self.entries[msg.index].chunk_len(0)
            else:
                raise ProtocolError(f"{self.peer} sent chunk {msg.chunk} of file {msg.index} "
                                    "it was not asked for")
            if len(msg.data) != clen:
                raise ProtocolError(f"chunk {msg.chunk} of file {msg.index} has the wrong size")
            self.bytes_payload += clen
            partial = self._partials[msg.index]
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="p2pfs-write")
            fut: concurrent.futures.Future[bool]
            if clen <= SMALL_IO_BYTES:
                fut = concurrent.futures.Future()
                try:
                    fut.set_result(partial.write_chunk(msg.chunk, msg.data))
                except P2PError as exc:
                    fut.set_exception(exc)
            else:
                # hash + pwrite release the GIL: the loop decrypts the next frame meanwhile
                fut = self._writer.submit(partial.write_chunk, msg.chunk, msg.data)
            self._writes.append((key, clen, fut))
            self._file_writes[msg.index] += 1
        while self._finishing or self._to_commit:
            self._start_commit()
            await asyncio.wait(self._finishing, return_when=asyncio.FIRST_COMPLETED)
            self._reap_finished()
        await self._send(Complete(self.tid))
        return self._result(self._results, self._failures, self.bytes_on_wire,
                            self.bytes_payload)

    async def _settle_write(self, pending: collections.deque[tuple[int, int]],
                            failures: collections.Counter[tuple[int, int]]) -> None:
        """Take the oldest chunk write's outcome: count it, re-request it, or finish its file."""
        key, clen, fut = self._writes.popleft()
        index, chunk = key
        self._file_writes[index] -= 1
        ok = await asyncio.wrap_future(fut)
        entry = self.entries[index]
        if not ok:
            failures[key] += 1
            log.warning("chunk %d of %s from %s failed verification (%d)", chunk,
                        entry.path, self.peer, failures[key])
            if failures[key] >= MAX_CHUNK_FAILURES:
                raise IntegrityError(
                    f"chunk {chunk} of {entry.path} from {self.peer} failed verification "
                    f"{failures[key]} times; transfer aborted")
            pending.appendleft(key)
            return
        self.bytes_done += clen
        self.current = entry.path
        partial = self._partials[index]
        if partial.complete and self._file_writes[index] == 0:
            del self._file_writes[index]
            await self._finish_file(index)
        else:
            self._report()

    async def _stop_writer(self) -> None:
        """Let queued chunk writes finish (a few chunks at most), then stop the thread."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        futs = [asyncio.wrap_future(f) for _, _, f in self._writes]
        self._writes.clear()
        try:
            if futs:
                await asyncio.wait(futs)
        finally:
            writer.shutdown(wait=False, cancel_futures=True)
            for f in futs:
                if f.done() and not f.cancelled():
                    f.exception()  # collected: a failed write after the failure that stopped us

    async def _open_file(self, folder: Path, index: int) -> list[int]:
        """Plan one file, tell the source, return the chunks still needed."""
        entry = self.entries[index]
        self.current = entry.path
        try:
            plan = await self._plan(folder, entry)
        except PathBlocked as exc:
            self._failures.append((entry.path, str(exc)))
            self.files_done += 1
            await self._send(FileStatus(index, FileStatusCode.REFUSED, 0, clip(str(exc))))
            return []
        if plan.kind == PlanKind.HAVE:
            self.files_done += 1
            self.bytes_done += entry.size
            self._results.append(FileResult(entry.path, entry.size, entry.root.hex(), plan.final))
            await self._send(FileStatus(index, FileStatusCode.HAVE, 0, ""))
            self._report()
            return []
        assert plan.partial is not None
        self._partials[index] = plan.partial
        missing = plan.missing
        self.bytes_done += entry.size - sum(entry.chunk_len(c) for c in missing)
        await self._send(FileStatus(index, FileStatusCode.NEED, len(missing), ""))
        if not missing:
            await self._finish_file(index)
        return missing

    async def _open_inline(self, folder: Path, index: int) -> bool:
        """An inline file's data arrived: plan it; True when the data is to be written.
        Only HAVE and REFUSED are told to the source (NEED is implied for inline files)."""
        entry = self.entries[index]
        self.current = entry.path
        try:
            plan = await self._plan(folder, entry)
        except PathBlocked as exc:
            self._failures.append((entry.path, str(exc)))
            self.files_done += 1
            await self._send(FileStatus(index, FileStatusCode.REFUSED, 0, clip(str(exc))))
            return False
        if plan.kind == PlanKind.HAVE:
            self.files_done += 1
            self.bytes_done += entry.size
            self._results.append(FileResult(entry.path, entry.size, entry.root.hex(), plan.final))
            await self._send(FileStatus(index, FileStatusCode.HAVE, 0, ""))
            return False
        assert plan.partial is not None
        self._partials[index] = plan.partial
        if not plan.missing:  # resumed complete: commit it, drop the data
            self.bytes_done += entry.size
            await self._finish_file(index)
            return False
        return True

    def _release_plan(self, plan: Any) -> None:
        if plan.partial is not None:
            self.store.release(plan.partial)

    async def _finish_file(self, index: int) -> None:
        """A file is complete: queue it for the next commit (one sync for many files)."""
        self._to_commit.append((index, self._partials.pop(index)))
        if len(self._to_commit) >= COMMIT_BATCH_FILES:
            # bounded: complete files wait (each an open file) behind one running commit
            while len(self._to_commit) >= 2 * COMMIT_BATCH_FILES and self._finishing:
                await asyncio.wait(self._finishing)
                self._reap_finished()
            self._start_commit()

    def _start_commit(self) -> None:
        """Finalize the queued files in the background (store.commit_batch); FileDone for
        each follows once they are renamed into place. One commit runs at a time."""
        if not self._to_commit or any(not t.done() for t in self._finishing):
            return
        batch, self._to_commit = self._to_commit, []
        if self._finalizer is None:
            self._finalizer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="p2pfs-commit")
        fut = asyncio.wrap_future(self._finalizer.submit(
            self.store.commit_batch, [p for _i, p in batch]))
        self._finishing.append(asyncio.ensure_future(self._committed(batch, fut)))

    async def _committed(self, batch: list[tuple[int, PartialFile]],
                         fut: asyncio.Future[list[Path | PathBlocked]]) -> None:
        try:
            outcomes = await fut
        finally:
            for _index, partial in batch:
                self.store.release(partial)  # keeps resume state if the commit failed
        for (index, _partial), got in zip(batch, outcomes, strict=True):
            entry = self.entries[index]
            if isinstance(got, PathBlocked):
                self._failures.append((entry.path, str(got)))
                await self._send(FileDone(index, False, clip(str(got))))
            else:
                self._results.append(FileResult(entry.path, entry.size, entry.root.hex(), got))
                await self._send(FileDone(index, True, ""))
            self.files_done += 1
        self._report(force=True)

    def _reap_finished(self) -> None:
        """Raise the failure of a finished finalize task (disk error, channel gone)."""
        still: list[asyncio.Task[None]] = []
        for task in self._finishing:
            if task.done():
                task.result()
            else:
                still.append(task)
        self._finishing = still

    async def _stop_finalizer(self) -> None:
        """Let finalizes in progress end (their threads cannot be stopped), then the pool."""
        tasks, self._finishing = self._finishing, []
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # collected: a failure after the one that stopped us
        pool, self._finalizer = self._finalizer, None
        if pool is not None:
            pool.shutdown(wait=False)


# ---------------------------------------------------------------------------
# public API


async def send_files(channel: Any, root: Path, paths: list[Path], *,
                     progress: ProgressFn | None = None, cancel: asyncio.Event | None = None,
                     transfer_id: bytes | None = None) -> TransferResult:
    """Offer `paths` (files or folders, named relative to `root`) and serve the sink's requests."""
    tid = transfer_id if transfer_id is not None else os.urandom(TRANSFER_ID_BYTES)
    if len(tid) != TRANSFER_ID_BYTES:
        raise ValueError(f"transfer_id must be {TRANSFER_ID_BYTES} bytes")
    return await _Source(channel, tid, [], progress, cancel,
                         prepare=(Path(root), [Path(p) for p in paths])).run()


async def receive_files(channel: Any, store: ReceiveStore, *, progress: ProgressFn | None = None,
                        cancel: asyncio.Event | None = None) -> TransferResult:
    """Receive what the peer offers into ``store``, under the peer's label."""
    return await _Sink(channel, store, progress, cancel).run()


async def fetch_file(channel: Any, rel_path: str, root_hash: bytes | None, store: ReceiveStore, *,
                     progress: ProgressFn | None = None,
                     cancel: asyncio.Event | None = None,
                     seeds: Sequence[Path] = ()) -> TransferResult:
    """Ask the peer for one file it announced, then receive it like an offer.

    ``seeds``: local files whose chunk-aligned chunks are copied (and verified) instead
    of fetched when their BLAKE3 equals a chunk of the manifest (node/transfer/seeds.py).
    """
    safe_relpath(rel_path)
    if root_hash is not None and len(root_hash) != 32:
        raise ValueError("root_hash must be 32 bytes")
    sink = _Sink(channel, store, progress, cancel, seeds)
    sink.tid = os.urandom(TRANSFER_ID_BYTES)
    sink.expect = (rel_path, root_hash)

    async def ask() -> None:
        await sink._send(FetchRequest(sink.tid, rel_path, root_hash))

    return await sink.run(ask)


async def fetch_files(channel: Any, items: list[tuple[str, bytes | None]], store: ReceiveStore,
                      *, progress: ProgressFn | None = None,
                      cancel: asyncio.Event | None = None,
                      seeds: Sequence[Path] = ()) -> TransferResult:
    """Ask the peer for several announced files (at most MAX_FILES_PER_FETCH) in one session.

    ``seeds`` as for fetch_file: chunks any of them holds are copied, not fetched.

    The result lists the files received; ``failures`` names each one that was not
    (the peer no longer has it, a local error, ...), so the caller can retry per file.
    A peer with the older protocol aborts with code "ProtocolError" before any offer.
    """
    if not 0 < len(items) <= MAX_FILES_PER_FETCH:
        raise ValueError(f"fetch_files takes 1 to {MAX_FILES_PER_FETCH} files")
    for rel_path, root_hash in items:
        safe_relpath(rel_path)
        if root_hash is not None and len(root_hash) != 32:
            raise ValueError("root_hash must be 32 bytes")
    request = FetchManyRequest(os.urandom(TRANSFER_ID_BYTES),
                               tuple([path, root] for path, root in items))
    request.validate()  # duplicates are the caller's bug: refuse before anything is sent
    sink = _Sink(channel, store, progress, cancel, seeds)
    sink.tid = request.transfer_id
    sink.expect_many = dict(items)

    async def ask() -> None:
        await sink._send(request)

    return await sink.run(ask)


def _manifests_for(found: list[tuple[str, bytes | None, Path, Path]]) -> list[SourceFile]:
    """One manifest entry per resolved (path, root, folder root, file); a file that vanished,
    was renamed or changed since it was announced is left out of the offer (blocking)."""
    out: list[SourceFile] = []
    for path, want, root, file in found:
        try:
            files = build_manifest(root, [file])
        except P2PError:
            continue
        if (len(files) == 1 and files[0].entry.path == path
                and (want is None or files[0].entry.root == want)):
            out.append(files[0])
    return out


async def serve_fetch(channel: Any, resolve: ResolveFn, *, progress: ProgressFn | None = None,
                      cancel: asyncio.Event | None = None) -> TransferResult:
    """Answer one FetchRequest or FetchManyRequest: resolve(rel_path, root_hash) ->
    (root, file) or None."""
    session = _Session(channel, progress, cancel)
    inline = [False]

    async def first() -> TransferResult | list[SourceFile]:
        msg = await session._recv((FetchRequest, FetchManyRequest, Abort))
        if isinstance(msg, FetchManyRequest):
            session.tid = msg.transfer_id
            hits: list[tuple[str, bytes | None, Path, Path]] = []
            for wanted_path, want in msg.wanted():
                safe_relpath(wanted_path)  # a hostile path never reaches resolve()
                hit = resolve(wanted_path, want)
                if hit is not None:
                    hits.append((wanted_path, want, hit[0], hit[1]))
            offered: list[SourceFile] = (await session._local(_manifests_for, hits)
                                         if hits else [])
            inline[0] = True
            return offered
        assert isinstance(msg, FetchRequest)
        session.tid = msg.transfer_id
        safe_relpath(msg.path)  # a hostile path never reaches resolve()
        found = resolve(msg.path, msg.root)
        files: list[SourceFile] = []
        if found is not None:
            root, path = found
            files = await session._local(build_manifest, root, [path])
        if (len(files) == 1 and files[0].entry.path == msg.path
                and (msg.root is None or files[0].entry.root == msg.root)):
            return files
        reason = f"no such file: {msg.path}"
        if len(files) == 1 and files[0].entry.path == msg.path:
            reason = f"{msg.path} has changed since it was announced"
        await session._abort("NotFound", clip(reason))
        session._set_state(TransferState.FAILED)
        return TransferResult(session.tid.hex(), [], session.bytes_on_wire, 0,
                              session.state, reason, session.peer)

    outcome = await session._guard(first)
    if isinstance(outcome, TransferResult):
        return outcome
    return await _Source(channel, session.tid, outcome, progress, cancel,
                         inline=inline[0]).run()


__all__ = [
    "FileResult",
    "StopSignal",
    "Superseded",
    "TransferProgress",
    "TransferResult",
    "TransferState",
    "fetch_file",
    "fetch_files",
    "receive_files",
    "send_files",
    "serve_fetch",
]

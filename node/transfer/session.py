"""Async transfer sessions over an authenticated channel: the thin driver of the machines.

The protocol itself (what to send, what to expect, every limit and decision) is
the pure ``SourceMachine`` / ``SinkMachine`` in machine.py. This module only
drives them: it owns the channel (send/recv with cancel and send timeouts), the
clock (``time.monotonic`` fed in as ``now``, the machine's timer awaited), the
worker threads (hashing, chunk reads, verify + write, commits) and the file
objects (the store's partial files, the source's open file), and it turns what
the machine asks for into I/O and the I/O's outcome back into machine input.

The channel is duck-typed (node/channel.py's SecureChannel or the in-memory
pair in node/memory_channel.py): ``peer``, ``peer_name``, ``async send(bytes)``,
``async recv() -> bytes`` (ChannelClosed at the end), ``async close()``.
Message flow and types are in protocol.py; disk work is in store.py,
manifest.py and seeds.py.

Public API (called by the daemon):
    send_files(channel, root, paths, *, progress, cancel, transfer_id) -> TransferResult
    receive_files(channel, store, *, progress, cancel) -> TransferResult
    fetch_file(channel, rel_path, root_hash, store, *, progress, cancel, seeds) -> TransferResult
    fetch_files(channel, items, store, *, progress, cancel, seeds) -> TransferResult
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
import errno
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
from node.transfer import machine as mach
from node.transfer.machine import (
    MAX_PENDING_WRITES,  # noqa: F401  (tests read the bound from here)
    CommitFiles,
    PlanFile,
    PlanOutcome,
    ReadChunk,
    Resolve,
    SendMessage,
    SinkMachine,
    SourceMachine,
    TransferPhase,
    WriteChunk,
)
from node.transfer.manifest import FileEntry, SourceFile, build_manifest, hash_chunk
from node.transfer.paths import PathBlocked, safe_relpath, sanitize_label
from node.transfer.protocol import (
    MAX_FILES_PER_FETCH,
    TRANSFER_ID_BYTES,
    Abort,
    FetchManyRequest,
    FetchRequest,
    Keepalive,
    chunk_header,
    clip,
    decode,
    parse_chunk_data,
)
from node.transfer.seeds import SeedIndex, seed_partial
from node.transfer.store import PartialBusy, PartialFile, PlanKind, ReceiveStore
from node.transfer.worker import WorkerThread, wait_first
from node.wire import Message

log = logging.getLogger(__name__)

# the machine's limits, read from here when a session starts (tests shrink them)
IDLE_TIMEOUT_S = mach.IDLE_TIMEOUT_S
KEEPALIVE_INTERVAL_S = mach.KEEPALIVE_INTERVAL_S
COMMIT_BATCH_FILES = mach.COMMIT_BATCH_FILES
ABORT_SEND_TIMEOUT_S = 2.0
ABORT_LINGER_S = 0.5  # after an Abort, how long we wait for the peer to close first
PROGRESS_INTERVAL_S = 0.1
READ_BUFFERS = 2  # frame buffers the source keeps: the one being sent + the one read ahead
SEND_CANCEL_LOSES_FRAME = frozenset({"udp", "quic"})  # see _Session._stop_worker_first
SUPERSEDE_WAIT_S = 5.0  # how long a new session waits for the stale one to let go of a file
# disk work this small (a small file's plan, a chunk's read or hash + write) runs on the
# loop: a hop to a worker thread costs more CPU than the work itself
SMALL_IO_BYTES = 64 << 10
# messages the driver sends together in one write at most (chunk requests, statuses)
SEND_BATCH_MAX_BYTES = 64 << 10
# how often the source's send watchdog looks at the chunk send under way (at most; a
# quarter of the idle timeout when that is shorter)
SEND_WATCH_INTERVAL_S = 1.0
# preadv flag: fail with EAGAIN instead of waiting for the disk (Linux >= 4.14); 0 where
# unknown, and then every large read goes to a thread
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# what a file system without no-wait reads answers (tmpfs gives EOPNOTSUPP)
_NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})

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
    """What both drivers share: the loop that feeds a machine (_drive), message I/O with
    cancel and send timeouts, progress, the Abort on failure (_guard)."""

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
        self.machine: SourceMachine | SinkMachine | None = None
        self._recv_task: asyncio.Future[bytes] | None = None
        # local work in progress (threads, supersede waits) -> what feeds its outcome back
        self._jobs: dict[asyncio.Future[Any], Callable[[asyncio.Future[Any]], None]] = {}

    def _set_state(self, state: TransferState) -> None:
        log.debug("transfer %s %s -> %s", self.tid.hex(), self.state.value, state.value)
        self.state = state
        m = self.machine
        if m is not None and not m.finished and state in _HALT:
            m.halt(_HALT[state])
        self._report(force=True)

    def _sync(self) -> None:
        """Copy the machine's counters (what progress and the result show)."""
        m = self.machine
        if m is None:
            return
        self.tid = m.tid or self.tid
        self.bytes_done, self.bytes_total = m.bytes_done, m.bytes_total
        self.files_done, self.files_total = m.files_done, m.files_total
        self.current = m.current

    def _report(self, *, force: bool = False) -> None:
        if self.progress_fn is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self._sync()
        self.progress_fn(TransferProgress(self.tid.hex(), self.peer, self.current, self.bytes_done,
                                          self.bytes_total, self.files_done, self.files_total,
                                          self.state.value))

    async def _send(self, msg: Message) -> None:
        data = msg.encode()
        self.bytes_on_wire += len(data)
        await self._send_raw(data)

    async def _send_raw(self, data: Any,
                        send: Callable[[Any], Any] | None = None) -> None:
        """Send one frame (or, with ``send``, hand it that); PeerUnreachable if the peer
        takes nothing for IDLE_TIMEOUT_S."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                await (send or self.channel.send)(data)
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

    async def _recv_one(self, expect: tuple[type[Message], ...]) -> Message:
        """One message outside a machine (a peer emulated in tests, a one-off read); also
        wakes up for cancel, idle timeout or a dead worker."""
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
        """Run blocking disk/hash work in a thread (the machine sends the Keepalives
        while it lasts: it is busy locally until the outcome is fed back).

        If we are interrupted (cancel, peer gone) the thread still finishes; its
        result is then handed to `cleanup` so nothing it opened leaks.
        """
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            await asyncio.wait({fut})
            return fut.result()
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
            await self._stop_recv()
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



    # -- driving a machine ------------------------------------------------------
    def _wants_input(self) -> bool:
        return True

    def _decode(self, data: bytes) -> Any:
        assert self.machine is not None
        return decode(data, self.machine.expect)

    def _handle(self, event: Any) -> Any:
        """Carry out one machine event; a coroutine when it has to wait (a send)."""
        raise NotImplementedError

    def _job(self, fut: asyncio.Future[Any], done: Callable[[asyncio.Future[Any]], None]) -> None:
        self._jobs[fut] = done

    async def _flush(self) -> None:
        """Do what the machine asks, in order; messages it asks for back to back (a batch
        of chunk requests) go out together: one write where the channel can."""
        m = self.machine
        assert m is not None
        batch: list[Message] = []
        while (event := m.next_event()) is not None:
            if isinstance(event, SendMessage):
                batch.append(event.message)
                continue
            if batch:
                await self._send_batch(batch)
                batch = []
            pending = self._handle(event)
            if pending is not None:
                await pending
        if batch:
            await self._send_batch(batch)

    async def _send_batch(self, batch: list[Message]) -> None:
        send_many = getattr(self.channel, "send_many", None)
        if len(batch) == 1 or send_many is None:
            for msg in batch:
                await self._send(msg)
            return
        datas = [msg.encode() for msg in batch]
        if sum(len(d) for d in datas) > SEND_BATCH_MAX_BYTES:
            for data in datas:
                self.bytes_on_wire += len(data)
                await self._send_raw(data)
            return
        self.bytes_on_wire += sum(len(d) for d in datas)
        await self._send_raw(datas, send_many)

    async def _drive(self) -> None:
        """Feed the machine what the peer, the threads and the clock say, and do what it
        asks, until it is finished. Decides nothing itself."""
        m = self.machine
        assert m is not None
        recv_nowait = getattr(self.channel, "recv_nowait", None)
        while True:
            await self._flush()
            self._report()
            if m.finished:
                return
            if self._ready_input(recv_nowait):
                continue
            waiters: set[asyncio.Future[Any]] = set(self._jobs)
            if self._worker is not None:
                waiters.add(self._worker)
            if self._wants_input():
                if self._recv_task is None:
                    self._recv_task = asyncio.ensure_future(self.channel.recv())
                waiters.add(self._recv_task)
            if self.cancel is not None:
                if self._cancel_task is None:
                    self._cancel_task = asyncio.ensure_future(self.cancel.wait())
                waiters.add(self._cancel_task)
            timer = m.get_timer()
            timeout = None if timer is None else max(0.0, timer - time.monotonic())
            if not waiters and timeout is None:
                raise LocalIOError("transfer stalled: nothing to wait for")
            await wait_first(waiters, timeout)
            now = time.monotonic()
            if self._cancel_task is not None and self._cancel_task.done():
                raise self._stop_error()
            self._check_worker()
            for fut in [f for f in self._jobs if f.done()]:  # in the order they were started
                self._jobs.pop(fut)(fut)
            if self._recv_task is not None and self._recv_task.done():
                task, self._recv_task = self._recv_task, None
                m.receive(self._decode(self._received(task)), now)
            if timer is not None and now >= timer:
                m.handle_timer(now)

    def _ready_input(self, recv_nowait: Callable[[], bytes | None] | None) -> bool:
        """Feed the machine what is ready without waiting (finished jobs, a message the
        channel already holds, a due timer), in the order the waiting path uses; True if
        anything was fed. A transfer in full flow takes chunk after chunk this way, with
        no task, no asyncio.wait and no wake-up per message."""
        m = self.machine
        assert m is not None
        if self.cancel is not None and self.cancel.is_set():
            raise self._stop_error()
        self._check_worker()
        now = time.monotonic()
        fed = False
        for fut in [f for f in self._jobs if f.done()]:
            self._jobs.pop(fut)(fut)
            fed = True
        if (recv_nowait is not None and self._recv_task is None and not m.finished
                and self._wants_input()):  # a finished machine takes nothing more
            try:
                data = recv_nowait()
            except P2PError:
                raise
            except (OSError, ConnectionError) as exc:
                raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None
            if data is not None:
                m.receive(self._decode(data), now)
                fed = True
        timer = m.get_timer()
        if timer is not None and now >= timer and not m.finished:
            m.handle_timer(now)
            fed = True
        return fed

    def _received(self, task: asyncio.Future[bytes]) -> bytes:
        try:
            return task.result()
        except P2PError:
            raise
        except (OSError, ConnectionError) as exc:
            raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None

    async def _stop_recv(self) -> None:
        task, self._recv_task = self._recv_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


_HALT = {TransferState.FAILED: TransferPhase.FAILED,
         TransferState.CANCELLED: TransferPhase.CANCELLED}


# ---------------------------------------------------------------------------
# source


class _Source(_Session):
    """Drives a SourceMachine: hashes the files, reads the chunks it asks for and sends
    them (a worker task, reading the next chunk while one is sent)."""

    role = "source"

    def __init__(self, channel: Any, tid: bytes, files: list[SourceFile],
                 progress: ProgressFn | None, cancel: asyncio.Event | None,
                 prepare: tuple[Path, list[Path]] | None = None, inline: bool = False,
                 serve: Callable[[str, bytes | None], tuple[Path, Path] | None] | None = None
                 ) -> None:
        super().__init__(channel, progress, cancel)
        self.tid = tid
        self._prepare = prepare
        self._serve = serve
        self._inline_mode = inline
        self.files = files
        self.machine = SourceMachine(tid, peer=self.peer, now=time.monotonic(),
                                     serve_request=serve is not None,
                                     idle_timeout_s=IDLE_TIMEOUT_S,
                                     keepalive_s=KEEPALIVE_INTERVAL_S)
        # the worker thread reads through one open file at a time
        self._fd = -1
        self._fd_index = -1
        self._fd_ctime_ns = 0
        self._fd_lock = threading.Lock()
        # False once the file system refused RWF_NOWAIT (tmpfs, NFS, FUSE...): every
        # read then goes to the thread, as before no-wait reads existed
        self._nowait_reads = bool(_RWF_NOWAIT)
        self._requests: asyncio.Queue[ReadChunk | None] = asyncio.Queue()
        self._buffers: list[bytearray] = []  # frame buffers for reuse (read-ahead needs two)
        self._read_cold = False  # the last large chunk had to be read in a thread
        # the chunk loop's send timeout: not one asyncio timer per chunk (a timer armed
        # and cancelled per 1 MiB frame cost ~5% of the sender's CPU) but one watchdog
        # that looks at the send in progress now and then
        self._send_since: float | None = None  # monotonic start of the chunk send under way
        self._send_stuck = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None  # the chunk sender the watchdog bounds

    async def run(self) -> TransferResult:
        try:
            return await self._guard(self._run)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._sender = None
            self._close_fd()

    def _watch_sends(self) -> None:
        """Stop the chunk sender when the peer has taken nothing of a frame for
        IDLE_TIMEOUT_S (the worker then fails with PeerUnreachable); else look again."""
        # the sender task itself, not self._worker: _run clears that before it waits for
        # the last sends, and those must stay bounded too
        since, worker = self._send_since, self._sender
        if worker is None or worker.done():
            self._watchdog = None
            return
        if since is not None and time.monotonic() - since >= IDLE_TIMEOUT_S:
            self._send_stuck = True
            self._watchdog = None
            worker.cancel()
            return
        self._watchdog = asyncio.get_running_loop().call_later(
            min(SEND_WATCH_INTERVAL_S, IDLE_TIMEOUT_S / 4), self._watch_sends)

    async def _send_chunk(self, frame: memoryview) -> None:
        """One chunk frame to the channel; the watchdog bounds how long this may wait."""
        self._send_since = time.monotonic()
        try:
            await self.channel.send(frame)
        except P2PError:
            raise
        except (OSError, ConnectionError) as exc:
            raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None
        finally:
            self._send_since = None

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._fd_index = -1, -1

    async def _run(self) -> TransferResult:
        m = self.machine
        assert isinstance(m, SourceMachine)
        if self._prepare is not None:
            root, paths = self._prepare
            self._job(asyncio.ensure_future(self._local(build_manifest, root, paths)),
                      self._prepared)
        elif self._serve is None:
            m.offer([f.entry for f in self.files], time.monotonic(), inline=self._inline_mode)
        self._report(force=True)
        # requests are read by the driver and served by a worker, so neither side ever
        # waits on a full pipe for the other (and disk reads overlap with sending)
        self._worker = self._sender = asyncio.ensure_future(self._serve_requests())
        self._watch_sends()
        await self._drive()
        self._sync()
        if m.phase is TransferPhase.FAILED:  # a fetch of a file we do not have (told)
            self._set_state(TransferState.FAILED)
            return TransferResult(self.tid.hex(), [], self.bytes_on_wire, 0, self.state,
                                  m.error, self.peer)
        worker, self._worker = self._worker, None
        self._requests.put_nowait(None)
        await worker
        results = [FileResult(o.rel_path, o.size, o.root_hex, self.files[o.index].abspath)
                   for o in m.outcomes()]
        return self._result(results, m.failures, self.bytes_on_wire, 0)

    def _prepared(self, fut: asyncio.Future[list[SourceFile]]) -> None:
        self.files = fut.result()
        assert isinstance(self.machine, SourceMachine)
        self.machine.offer([f.entry for f in self.files], time.monotonic())

    def _handle(self, event: Any) -> Any:
        if isinstance(event, ReadChunk):
            self._requests.put_nowait(event)
        elif isinstance(event, Resolve):
            self._resolve(event)
        else:
            raise LocalIOError(f"source cannot do {type(event).__name__}")
        return None

    def _resolve(self, event: Resolve) -> None:
        assert self._serve is not None
        hits: list[tuple[str, bytes | None, Path, Path]] = []
        for path, want in event.wanted:
            hit = self._serve(path, want)
            if hit is not None:
                hits.append((path, want, hit[0], hit[1]))
        fn = _manifests_for if event.many else _manifest_of
        self._job(asyncio.ensure_future(self._local(fn, hits)), self._resolved)

    def _resolved(self, fut: asyncio.Future[list[SourceFile]]) -> None:
        self.files = fut.result()
        assert isinstance(self.machine, SourceMachine)
        self.machine.offer([f.entry for f in self.files], time.monotonic())

    async def _serve_requests(self) -> None:
        """Send requested chunks in order, reading the next one from disk while one is sent."""
        m = self.machine
        assert isinstance(m, SourceMachine)
        reading: tuple[ReadChunk, asyncio.Future[memoryview]] | None = None
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
                if self._read_cold and not self._requests.empty():
                    # read ahead: the next chunk comes off the disk while this one is sent
                    # (a chunk the page cache holds is read after the send instead: the
                    # read is a copy on the loop, and the frame sent meanwhile has left
                    # the pipe's buffer, so one frame buffer fewer is in use)
                    nxt = self._requests.get_nowait()
                    if nxt is None:
                        self._requests.put_nowait(None)
                    else:
                        reading = (nxt, self._start_read(nxt))
                self.bytes_on_wire += len(frame)
                await self._send_chunk(frame)
                self._release_buffer(frame)
                m.chunk_sent(req.index, req.chunk, time.monotonic())
                self._report()
        except asyncio.CancelledError:
            if self._send_stuck:
                raise PeerUnreachable(f"{self.peer} accepted nothing for "
                                      f"{IDLE_TIMEOUT_S:.0f} s; giving up") from None
            raise
        finally:
            if reading is not None:
                # its thread still finishes; collect the outcome so nothing is left dangling
                reading[1].add_done_callback(lambda f: f.cancelled() or f.exception())

    def _start_read(self, req: ReadChunk) -> asyncio.Future[memoryview]:
        """Read a chunk on the loop when that cannot block (a small one, or one the page
        cache holds: RWF_NOWAIT), else in a thread. A share of a file just hashed for its
        manifest reads every chunk from the cache: no thread hop per chunk."""
        buf = self._buffers.pop() if self._buffers else None
        small = self.files[req.index].entry.chunk_len(req.chunk) <= SMALL_IO_BYTES
        if small or (self._nowait_reads and not req.verify):
            done: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
            try:
                view = self._read_chunk(req.index, req.chunk, req.verify, buf, nowait=not small)
            except P2PError as exc:
                done.set_exception(exc)
                return done
            if view is not None:
                if not small:
                    self._read_cold = False
                done.set_result(view)
                return done
        self._read_cold = True  # not in the page cache: read ahead, in a thread
        return asyncio.ensure_future(
            asyncio.to_thread(self._read_chunk, req.index, req.chunk, req.verify, buf))
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
                    buf: bytearray | None, *, nowait: bool = False) -> Any:
        """One ChunkData frame, the chunk read from disk right behind its header.

        With ``nowait``, None (nothing read, `buf` kept for the next try) when the
        chunk is not all in the page cache: reading it would wait for the disk.

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
        if not self._fd_lock.acquire(blocking=not nowait):  # a thread reads: never wait
            payload.release()
            view.release()
            return None
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
            if nowait:
                try:
                    got = os.preadv(self._fd, [payload], chunk * e.chunk_size,
                                    _RWF_NOWAIT)
                except BlockingIOError:
                    got = 0
                except OSError as exc:
                    if exc.errno not in _NOWAIT_UNSUPPORTED:
                        raise
                    self._nowait_reads = False  # this file system has no no-wait reads
                    got = 0
                if got != want:  # not cached (or cut short): the thread reads it
                    payload.release()
                    view.release()
                    return None
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
        finally:
            self._fd_lock.release()
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
    """Drives a SinkMachine: plans files against the store (seeding them), verifies and
    writes chunks in a writer thread, commits complete files in a commit thread."""

    role = "sink"

    def __init__(self, channel: Any, store: ReceiveStore, progress: ProgressFn | None,
                 cancel: asyncio.Event | None, seeds: Sequence[Path] = (),
                 request: FetchRequest | FetchManyRequest | None = None) -> None:
        # a sink can always be stopped: a newer session for the same file supersedes it
        super().__init__(channel, progress, cancel if cancel is not None else StopSignal())
        self.store = store
        self.seeds = SeedIndex(seeds)  # local files whose chunks are copied, not fetched
        self.machine = SinkMachine(peer=self.peer, now=time.monotonic(), request=request,
                                   idle_timeout_s=IDLE_TIMEOUT_S,
                                   keepalive_s=KEEPALIVE_INTERVAL_S,
                                   commit_batch_files=COMMIT_BATCH_FILES)
        self.tid = self.machine.tid
        self._ended = asyncio.Event()  # set once every partial file is released
        self._folder: Path | None = None
        self._partials: dict[int, PartialFile] = {}
        self._finalizer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer: WorkerThread | None = None
        self._writes: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._plan_tasks: set[asyncio.Future[Any]] = set()

    @property
    def entries(self) -> list[FileEntry]:
        assert isinstance(self.machine, SinkMachine)
        return self.machine.entries

    def _wants_input(self) -> bool:
        assert isinstance(self.machine, SinkMachine)
        return self.machine.wants_input()

    def _decode(self, data: bytes) -> Any:
        view = parse_chunk_data(data)
        return view if view is not None else super()._decode(data)

    async def run(self) -> TransferResult:
        m = self.machine
        assert isinstance(m, SinkMachine)

        async def body() -> TransferResult:
            m.start(time.monotonic())
            await self._drive()
            self._sync()
            results = [FileResult(o.rel_path, o.size, o.root_hex, o.path) for o in m.results]
            return self._result(results, m.failures, self.bytes_on_wire, m.bytes_payload)

        try:
            return await self._guard(body)
        finally:
            try:
                await self._stop_jobs()
                await self._stop_writer()
                await self._stop_finalizer()
            finally:
                for partial in self._partials.values():
                    self.store.release(partial)  # saves resume state; waits for a busy writer
                self._partials.clear()
                self._ended.set()

    def _result(self, files: list[FileResult], failures: list[tuple[str, str]],
                sent: int, received: int) -> TransferResult:
        self.bytes_payload = received
        return super()._result(files, failures, sent, received)

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

    # -- what the machine asks for -------------------------------------------------
    def _handle(self, event: Any) -> Any:
        if isinstance(event, WriteChunk):
            self._write(event)
        elif isinstance(event, PlanFile):
            self._start_plan(event.index)
        elif isinstance(event, CommitFiles):
            self._commit(event.indices)
        else:
            raise LocalIOError(f"sink cannot do {type(event).__name__}")
        return None

    def _write(self, event: WriteChunk) -> None:
        m = self.machine
        assert isinstance(m, SinkMachine)
        partial = self._partials[event.index]
        # a small chunk is written on the loop, unless the writer thread is busy: then it
        # may hold this file's lock for a large (O_DIRECT) write the loop would wait for
        if len(event.data) <= SMALL_IO_BYTES and not self._writes:
            ok = partial.write_chunk(event.chunk, event.data)
            m.chunk_written(event.index, event.chunk, ok, time.monotonic())
            return
        if self._writer is None:
            self._writer = WorkerThread("p2pfs-write")
        # hash + pwrite release the GIL: the loop decrypts the next frame meanwhile
        fut: asyncio.Future[bool] = self._writer.submit(partial.write_chunk, event.chunk,
                                                        event.data)
        self._writes.append(fut)
        index, chunk = event.index, event.chunk
        self._job(fut, lambda f: self._write_done(f, index, chunk))

    def _write_done(self, fut: asyncio.Future[bool], index: int, chunk: int) -> None:
        self._writes.remove(fut)
        assert isinstance(self.machine, SinkMachine)
        self.machine.chunk_written(index, chunk, fut.result(), time.monotonic())

    def _start_plan(self, index: int) -> None:
        entry = self.entries[index]
        if entry.size <= SMALL_IO_BYTES and not self.seeds:
            try:
                plan = self._plan_blocking(entry)
            except PartialBusy:
                pass  # maybe a stale session of the same peer: the slow path supersedes it
            except PathBlocked as exc:
                self._planned(index, exc)
                return
            else:
                self._planned(index, plan)
                return
        fut = asyncio.ensure_future(self._plan(entry))
        self._plan_tasks.add(fut)

        def planned(f: asyncio.Future[Any]) -> None:
            self._plan_tasks.discard(f)
            self._planned(index, _outcome(f))
        self._job(fut, planned)

    def _planned(self, index: int, plan: Any) -> None:
        m = self.machine
        assert isinstance(m, SinkMachine)
        now = time.monotonic()
        if isinstance(plan, PathBlocked):
            m.file_planned(index, PlanOutcome.REFUSED, now, reason=str(plan))
        elif plan.kind == PlanKind.HAVE:
            m.file_planned(index, PlanOutcome.HAVE, now, final=plan.final)
        else:
            assert plan.partial is not None
            self._partials[index] = plan.partial
            m.file_planned(index, PlanOutcome.NEED, now, missing=plan.missing,
                           final=plan.final)

    def _commit(self, indices: tuple[int, ...]) -> None:
        """Finalize complete files in the background (store.commit_batch: one sync)."""
        if self._finalizer is None:
            self._finalizer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="p2pfs-commit")
        partials = [self._partials[i] for i in indices]
        fut = asyncio.wrap_future(self._finalizer.submit(self.store.commit_batch, partials))
        self._job(fut, lambda f: self._committed(indices, f))

    def _committed(self, indices: tuple[int, ...],
                   fut: asyncio.Future[list[Path | PathBlocked]]) -> None:
        try:
            outcomes = fut.result()
        finally:
            for index in indices:
                self.store.release(self._partials.pop(index))  # keeps resume state on failure
        assert isinstance(self.machine, SinkMachine)
        self.machine.files_committed(
            [(i, got, "") if isinstance(got, Path) else (i, None, str(got))
             for i, got in zip(indices, outcomes, strict=True)], time.monotonic())
        self._report(force=True)

    # -- the store ------------------------------------------------------------------
    def _plan_blocking(self, entry: FileEntry) -> Any:
        """store.plan, then the chunks the seeds hold copied in (blocking)."""
        if self._folder is None:
            self._folder = self.store.folder(self.peer)
        plan = self.store.plan(self._folder, entry, self)
        if plan.partial is not None and self.seeds:
            try:
                seed_partial(plan.partial, self.seeds)
            except BaseException:
                self.store.release(plan.partial)
                raise
        return plan

    async def _plan(self, entry: FileEntry) -> Any:
        """store.plan; a stale session of the same peer holding the file is superseded.

        A sender that crashed and restarted looks alive to us until the transport's
        idle timeout (30 s over udp and quic): its new session for the same file,
        from the same authenticated peer, takes over the partial file and resumes.
        """
        try:
            return await self._local(self._plan_blocking, entry, cleanup=self._release_plan)
        except PartialBusy as exc:
            holder = exc.holder
            if (not isinstance(holder, _Sink) or holder is self
                    or holder.channel.peer != self.channel.peer):
                raise
            log.info("a new transfer from %s supersedes the one still receiving %s",
                     self.peer, entry.path)
            if not await holder.supersede(self):
                raise
        return await self._local(self._plan_blocking, entry, cleanup=self._release_plan)

    def _release_plan(self, plan: Any) -> None:
        if plan.partial is not None:
            self.store.release(plan.partial)

    async def _stop_jobs(self) -> None:
        """Let writes and commits in progress end (their threads cannot be stopped), stop
        plans (what their thread opens is released when it ends), release what a finished
        plan opened that the machine never heard of."""
        jobs, self._jobs = self._jobs, {}
        plans, self._plan_tasks = self._plan_tasks, set()
        for fut in plans:
            fut.cancel()
        if jobs:
            await asyncio.wait(jobs)
        for fut in jobs:
            if fut.cancelled():
                continue
            exc = fut.exception()  # collected: a failure after the one that stopped us
            if exc is None and fut in plans:
                self._release_plan(fut.result())

    async def _stop_writer(self) -> None:
        """Queued chunk writes finish (a few chunks at most), then the thread stops."""
        writer, self._writer = self._writer, None
        self._writes.clear()
        if writer is not None:
            writer.shutdown()

    async def _stop_finalizer(self) -> None:
        pool, self._finalizer = self._finalizer, None
        if pool is not None:
            pool.shutdown(wait=False)


def _outcome(fut: asyncio.Future[Any]) -> Any:
    """A plan's result, or the PathBlocked that refuses the file (other errors raise)."""
    try:
        return fut.result()
    except PathBlocked as exc:
        return exc


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
    request = FetchRequest(os.urandom(TRANSFER_ID_BYTES), rel_path, root_hash)
    return await _Sink(channel, store, progress, cancel, seeds, request).run()


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
    return await _Sink(channel, store, progress, cancel, seeds, request).run()


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


def _manifest_of(found: list[tuple[str, bytes | None, Path, Path]]) -> list[SourceFile]:
    """The manifest of the one file a FetchRequest names (the machine checks it is that
    file, unchanged); nothing when it was not found."""
    if not found:
        return []
    _path, _want, root, file = found[0]
    return build_manifest(root, [file])


async def serve_fetch(channel: Any, resolve: ResolveFn, *, progress: ProgressFn | None = None,
                      cancel: asyncio.Event | None = None) -> TransferResult:
    """Answer one FetchRequest or FetchManyRequest: resolve(rel_path, root_hash) ->
    (root, file) or None."""
    return await _Source(channel, b"", [], progress, cancel, serve=resolve).run()


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

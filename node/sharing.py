"""Sharing: the daemon's transfer service — `node share`, incoming files, fetches, retries.

Wraps node/transfer's session functions with what a user needs around them:
a table of transfers in progress and recent ones (`node transfers`), cancel
(`node cancel`), retries with backoff when a peer drops mid-transfer (resume
makes a retry cheap), progress events for the CLI, and a notification for
every file received and every transfer that failed.

Received files land in ``<received dir>/<label>/...`` where label is the
local alias the user gave the sender, else its short id: a name the sender
chose for itself is never used as a folder name, so two peers that call
themselves "alice" cannot write into each other's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import (
    Cancelled,
    ChannelClosed,
    LocalIOError,
    P2PError,
    PeerUnreachable,
    RemoteError,
    UnknownPeer,
)
from node.identity import PeerId
from node.notifications import FileReceived, Notice, TransferFailed
from node.peering import Peering
from node.transfer.protocol import MAX_FILES_PER_FETCH
from node.transfer.session import (
    StopSignal,
    TransferProgress,
    TransferResult,
    TransferState,
    fetch_file,
    fetch_files,
    receive_files,
    send_files,
    serve_fetch,
)
from node.transfer.store import ReceiveStore

log = logging.getLogger("p2pfs.sharing")

MAX_RECENT_TRANSFERS = 200
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 1.0
RETRYABLE = (PeerUnreachable, ChannelClosed, asyncio.TimeoutError, ConnectionError)
PROGRESS_MIN_INTERVAL_S = 0.2

Notify = Callable[[Notice], Any]
Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Transfer:
    id: str
    direction: str  # "send" | "receive" | "fetch" | "serve"
    peer: PeerId
    label: str
    paths: list[str]
    transport: str = ""
    state: str = "running"
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    current_file: str = ""
    error: str = ""
    attempts: int = 0
    bytes_on_wire: int = 0
    started_at: float = field(default_factory=time.time)
    ended_at: float = 0.0
    # set() is the user's cancel; stop(error) ends it for another reason (trust revoked)
    cancel: StopSignal = field(default_factory=StopSignal, repr=False)

    def to_json(self) -> dict[str, Any]:
        elapsed = (self.ended_at or time.time()) - self.started_at
        return {
            "id": self.id, "direction": self.direction, "peer_id": str(self.peer),
            "peer": self.label, "paths": self.paths, "transport": self.transport,
            "state": self.state, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "files_done": self.files_done, "files_total": self.files_total,
            "file": self.current_file, "error": self.error, "attempts": self.attempts,
            "bytes_on_wire": self.bytes_on_wire, "started_at": self.started_at,
            "ended_at": self.ended_at or None,
            "rate_bps": self.bytes_done / elapsed if elapsed > 0 else 0.0,
        }


class ShareService:
    def __init__(self, peering: Peering, received_dir: Path, *, notify: Notify,
                 label_for: Callable[[PeerId], str],
                 resolve_shared: Callable[[str, bytes | None],
                                          tuple[Path, Path] | None] | None = None,
                 default_transport: str, targets: Callable[[], list[PeerId]],
                 on_received: Callable[[PeerId, TransferResult], Awaitable[None]] | None = None,
                 resolve_for: Callable[[PeerId, str, bytes | None],
                                       tuple[Path, Path] | None] | None = None
                 ) -> None:
        self.peering = peering
        self.store = ReceiveStore(received_dir)
        self._notify = notify
        self._label_for = label_for
        self._resolve_shared = resolve_shared
        # what a fetch may reach, given who asks (shared folders are per peer)
        self._resolve_for = resolve_for
        self._default_transport = default_transport
        self._targets = targets
        self._on_received = on_received
        self.transfers: OrderedDict[str, Transfer] = OrderedDict()
        peering.register("transfer", self.handle_transfer)
        peering.register("fetch", self.handle_fetch)
        peering.on_revoke(self.revoke)

    # -- bookkeeping ---------------------------------------------------------------
    def _new(self, direction: str, peer: PeerId, paths: list[str], transport: str = "") -> Transfer:
        t = Transfer(os.urandom(6).hex(), direction, peer, self._label_for(peer), paths, transport)
        self.transfers[t.id] = t
        while len(self.transfers) > MAX_RECENT_TRANSFERS:
            oldest = next(iter(self.transfers.values()))
            if oldest.state == "running":
                break
            self.transfers.popitem(last=False)
        return t

    def _progress_fn(self, t: Transfer, emit: Emit | None) -> Callable[[TransferProgress], None]:
        last = [0.0]

        def on_progress(p: TransferProgress) -> None:
            t.bytes_done, t.bytes_total = p.bytes_done, p.bytes_total
            t.files_done, t.files_total, t.current_file = p.files_done, p.files_total, p.file
            now = time.monotonic()
            if emit is not None and (now - last[0] >= PROGRESS_MIN_INTERVAL_S
                                     or p.bytes_done == p.bytes_total):
                last[0] = now
                asyncio.ensure_future(_emit_quietly(emit, {"type": "progress", **t.to_json()}))

        return on_progress

    def _finish(self, t: Transfer, result: TransferResult | None, error: BaseException | None
                ) -> None:
        t.ended_at = time.time()
        finished = error is None and result is not None and result.state is TransferState.DONE
        if t.cancel.error is not None and not finished:
            # stopped on purpose: whatever broke next (a closed channel) is not the reason
            error = t.cancel.error
        if result is not None:
            t.bytes_on_wire += result.bytes_sent_on_wire or result.bytes_received_payload
        if error is None and result is not None and result.state is TransferState.DONE:
            t.state = "done"
            if t.bytes_total == 0:
                t.bytes_total = t.bytes_done = sum(f.size for f in result.files)
            return
        t.state = "cancelled" if isinstance(error, Cancelled) or (
            result is not None and result.state is TransferState.CANCELLED) else "failed"
        t.error = str(error) if error is not None else (result.error if result else "") or ""
        self._notify(TransferFailed(peer_id=str(t.peer), direction=t.direction,
                                    error=t.error or t.state, paths=tuple(t.paths),
                                    state=t.state, transfer_id=t.id))
        log.warning("%s transfer %s with %s %s: %s", t.direction, t.id, t.label, t.state,
                    t.error)

    def list(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in reversed(self.transfers.values())]

    def revoke(self, peer: PeerId, error: P2PError) -> None:
        """Trust in `peer` ended: its running transfers fail with `error`; the peer is told
        (Abort), partial files are kept as partials."""
        for t in self.transfers.values():
            if t.peer == peer and t.state == "running":
                t.cancel.stop(error)

    def cancel(self, transfer_id: str) -> dict[str, Any]:
        matches = [t for t in self.transfers.values() if t.id.startswith(transfer_id)]
        if len(matches) != 1:
            raise UnknownPeer(f"no single transfer matches {transfer_id!r}")
        t = matches[0]
        if t.state != "running":
            raise P2PError(f"transfer {t.id} is already {t.state}")
        t.cancel.set()
        return t.to_json()

    # -- sending ---------------------------------------------------------------------
    async def share(self, paths: list[Path], to: list[PeerId] | None, *, transport: str | None,
                    emit: Emit | None = None) -> list[dict[str, Any]]:
        """Send files/folders to peers (all trusted online peers when `to` is None).

        Returns one result per peer; raises the first peer's error when every peer failed.
        """
        resolved = [p.expanduser().resolve() for p in paths]
        for p in resolved:
            if not p.exists():
                raise LocalIOError(f"{p} does not exist")
            if not (p.is_file() or p.is_dir()):
                raise LocalIOError(f"{p} is not a regular file or folder")
        targets = list(to) if to else self._targets()
        if not targets:
            raise PeerUnreachable("no trusted peer is online to share with; "
                                  "name one with --to, or trust a peer first")
        transfers = [self._new("send", peer, [str(p) for p in resolved],
                               transport or self._default_transport) for peer in targets]
        if emit is not None:
            for t in transfers:
                await emit({"type": "started", **t.to_json()})
        outcomes = await asyncio.gather(*(self._send_with_retries(t, resolved, emit)
                                          for t in transfers), return_exceptions=True)
        results = []
        for t in transfers:
            results.append(t.to_json())
            if emit is not None:
                await _emit_quietly(emit, {"type": "finished", **t.to_json()})
        if all(isinstance(o, BaseException) for o in outcomes):
            first = outcomes[0]
            assert isinstance(first, BaseException)
            if isinstance(first, P2PError):
                raise type(first)(f"{transfers[0].label}: {first}")
            raise first
        return results

    async def _send_with_retries(self, t: Transfer, paths: list[Path], emit: Emit | None) -> None:
        # every file is named relative to its own parent folder, so `share a/b/x.txt`
        # arrives as x.txt and `share photos/` as photos/...
        roots = {p.parent for p in paths}
        delay = RETRY_BACKOFF_S
        last_error: BaseException | None = None
        transfer_id = os.urandom(16)
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            t.attempts = attempt
            result: TransferResult | None = None
            try:
                channel = await self.peering.connect(t.peer, "transfer", transport=t.transport)
                t.transport = channel.transport
                try:
                    for root in sorted(roots):
                        group = [p for p in paths if p.parent == root]
                        result = await send_files(channel, root, group,
                                                  progress=self._progress_fn(t, emit),
                                                  cancel=t.cancel, transfer_id=transfer_id)
                        if result.state is not TransferState.DONE:
                            break
                finally:
                    await channel.close()
                self._finish(t, result, None)
                if t.state != "done":
                    raise _result_error(result)
                return
            except RETRYABLE as exc:
                last_error = exc
                if t.cancel.is_set() or attempt == RETRY_ATTEMPTS:
                    break
                log.info("transfer %s to %s: %s; retrying in %.0f s (attempt %d/%d)", t.id,
                         t.label, exc, delay, attempt + 1, RETRY_ATTEMPTS)
                if emit is not None:
                    # the retry's reason must not be overwritten by the (still empty) error field
                    await _emit_quietly(emit, {**t.to_json(), "type": "retry",
                                               "error": str(exc)})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(t.cancel.wait(), delay)
                delay *= 2
            except P2PError as exc:
                if t.state == "running":
                    self._finish(t, result, exc)
                raise
        error = (t.cancel.error or Cancelled("cancelled")) if t.cancel.is_set() else last_error
        self._finish(t, None, error)
        assert error is not None
        raise error

    # -- receiving ---------------------------------------------------------------------
    async def handle_transfer(self, channel: Any) -> None:
        """A trusted peer pushes files to us (service "transfer")."""
        t = self._new("receive", channel.peer, [], channel.transport)
        channel.peer_name = t.label
        result: TransferResult | None = None
        try:
            result = await receive_files(channel, self.store, progress=self._progress_fn(t, None),
                                         cancel=t.cancel)
        except P2PError as exc:
            self._finish(t, result, exc)
            return
        t.paths = [f.rel_path for f in result.files]
        self._finish(t, result, None)
        await self._received(channel.peer, t, result)

    async def _received(self, peer: PeerId, t: Transfer, result: TransferResult) -> None:
        if result.state is not TransferState.DONE:
            return
        for f in result.files:
            self._notify(FileReceived(peer_id=str(peer), path=f.rel_path, size=f.size,
                                      hash=f.root_hex, saved_as=str(f.path) if f.path else "",
                                      transfer_id=t.id))
            log.info("received %s (%s) from %s", f.rel_path, _human(f.size), t.label)
        if self._on_received is not None:
            await self._on_received(peer, result)

    async def handle_fetch(self, channel: Any) -> None:
        """A trusted peer asks for a file we announced (service "fetch")."""
        t = self._new("serve", channel.peer, [], channel.transport)
        result: TransferResult | None = None

        def resolve(rel_path: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
            t.paths = [rel_path]  # what was asked for, so a failure can name it
            if self._resolve_for is not None:
                return self._resolve_for(channel.peer, rel_path, root_hash)
            if self._resolve_shared is None:
                return None  # nothing is served without a resolver
            return self._resolve_shared(rel_path, root_hash)

        try:
            result = await serve_fetch(channel, resolve,
                                       progress=self._progress_fn(t, None), cancel=t.cancel)
        except P2PError as exc:
            self._finish(t, result, exc)
            return
        t.paths = [f.rel_path for f in result.files] or t.paths
        self._finish(t, result, None)

    async def fetch(self, peer: PeerId, rel_path: str, root_hash: bytes | None, *,
                    store: ReceiveStore | None = None, transport: str | None = None,
                    seeds: Sequence[Path] = ()) -> TransferResult:
        """Pull one announced file from `peer` (used by folder sync).

        ``seeds``: local files (the old version, other files of the folder) whose
        chunk-aligned chunks are copied instead of fetched when their BLAKE3 equals a
        chunk of the manifest; each copied chunk is verified like a fetched one.
        """
        t = self._new("fetch", peer, [rel_path], transport or self._default_transport)
        result: TransferResult | None = None
        try:
            channel = await self.peering.connect(peer, "fetch", transport=t.transport)
            try:
                channel.peer_name = t.label
                result = await fetch_file(channel, rel_path, root_hash, store or self.store,
                                          progress=self._progress_fn(t, None), cancel=t.cancel,
                                          seeds=seeds)
            finally:
                await channel.close()
        except P2PError as exc:
            self._finish(t, result, exc)
            raise
        self._finish(t, result, None)
        if t.state != "done":
            raise _result_error(result)
        return result


    async def fetch_many(self, peer: PeerId, rel_paths: list[str], *,
                         store: ReceiveStore | None = None, transport: str | None = None,
                         seeds: Sequence[Path] = ()) -> dict[str, Path | P2PError]:
        """Pull several announced files from `peer`, MAX_FILES_PER_FETCH per session over
        one channel (folder sync of many small files). Path -> final file, or its error.
        ``seeds`` as for fetch: chunks any of them holds are copied, not fetched.

        A peer with the older protocol (no xfer.fetchmany) is asked one file at a time.
        """
        out: dict[str, Path | P2PError] = {}
        target = store or self.store
        for i in range(0, len(rel_paths), MAX_FILES_PER_FETCH):
            batch = list(dict.fromkeys(rel_paths[i:i + MAX_FILES_PER_FETCH]))
            t = self._new("fetch", peer, batch, transport or self._default_transport)
            result: TransferResult | None = None
            try:
                channel = await self.peering.connect(peer, "fetch", transport=t.transport)
                try:
                    channel.peer_name = t.label
                    t.transport = channel.transport
                    result = await fetch_files(channel, [(p, None) for p in batch], target,
                                               progress=self._progress_fn(t, None),
                                               cancel=t.cancel, seeds=seeds)
                finally:
                    await channel.close()
            except RemoteError as exc:
                if getattr(exc, "code", "") == "ProtocolError" and "fetchmany" in str(exc):
                    log.info("%s runs an older transfer protocol (no batched fetch); "
                             "fetching %d files one at a time", t.label, len(batch))
                    self._finish(t, None, exc)
                    out.update(await self._fetch_each(peer, batch, target, transport, seeds))
                    continue
                self._finish(t, result, exc)
                out.update({p: exc for p in batch})
                continue
            except P2PError as exc:
                self._finish(t, result, exc)
                out.update({p: exc for p in batch})
                continue
            self._finish(t, result, None)
            for f in result.files:
                if f.path is not None:
                    out[f.rel_path] = f.path
            for path, reason in result.failures:
                out.setdefault(path, P2PError(f"fetching {path} from {t.label}: {reason}"))
            for path in batch:
                out.setdefault(path, P2PError(f"fetching {path} from {t.label} gave no file"))
        return out

    async def _fetch_each(self, peer: PeerId, paths: list[str], store: ReceiveStore,
                          transport: str | None, seeds: Sequence[Path] = ()
                          ) -> dict[str, Path | P2PError]:
        out: dict[str, Path | P2PError] = {}
        for path in paths:
            try:
                result = await self.fetch(peer, path, None, store=store, transport=transport,
                                          seeds=seeds)
            except P2PError as exc:
                out[path] = exc
                continue
            final = result.files[0].path if result.files else None
            out[path] = final if final is not None else P2PError(
                f"fetching {path} gave no file")
        return out


def _result_error(result: TransferResult | None) -> P2PError:
    if result is not None and result.state is TransferState.CANCELLED:
        return Cancelled(result.error or "cancelled")
    return P2PError((result.error if result else None) or "transfer failed")


async def _emit_quietly(emit: Emit, event: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, P2PError, RuntimeError):
        await emit(event)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"

"""Sync: apply a trusted peer's change event to our copy of its shared folder.

Copies live under ``<received dir>/<origin label>/<folder>/<path>``.

* created / modified / shared: if the target already holds the content
  (same BLAKE3), nothing happens. Else, if any file we know holds that content
  (our shared folders' index via ``local_lookup``, or a file we received
  earlier), it is copied locally, no transfer. Otherwise the injected
  ``fetch(origin, folder, path, hash)`` pulls it through the transfer layer.
  The result is checked against the event's hash before it is shown.
* deleted: our copy moves to ``<received>/<origin>/.p2pfs-versions/<folder>/<path>~<time>``;
  nothing is destroyed.
* moved: our copy is renamed (no transfer); if we had no copy, the new path is
  filled as for a creation.
* A previous copy that is about to be replaced is moved into the versions folder first.
* Events for a path older (lower seq from the same origin) than the last one
  applied are ignored (this memory is per process; the seq order of the log
  makes replays after a restart converge to the newest state).

Every write goes through ``suppress(path, hash)`` first, so a watcher on the
received dir does not announce our own writes (no echo loops). Paths pass
``node.pathrules`` (no symlinks followed, no escape from the target).

Imports node.gossip.events/log, node.pathrules, node.fileindex (FileIndex,
hash_file), identity and errors; it must not import transports or the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath

from node.errors import IntegrityError, LocalIOError, P2PError
from node.fileindex import FileIndex, hash_file
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.identity import PeerId
from node.notifications import FileReceived
from node.pathrules import (
    PARTIAL_SUFFIX,
    VERSIONS_DIR_NAME,
    ensure_dirs,
    local_io_error,
    resolve_under,
    safe_relpath,
    sanitize_label,
)

log = logging.getLogger(__name__)

FetchFn = Callable[[PeerId, str, str, bytes], Awaitable[Path]]
# (origin, folder, [(path, hash)]) -> path -> the fetched file, or why it was not fetched
FetchManyFn = Callable[[PeerId, str, list[tuple[str, bytes]]],
                       Awaitable[dict[str, "Path | P2PError"]]]
# content events of one origin whose fetches go out as one batch (one transfer session)
MAX_FETCH_BATCH = 512
SYNC_INDEX_NAME = ".p2pfs-sync.p2pfs-index"


class SyncOutcome(enum.Enum):
    FETCHED = "fetched"
    COPIED = "copied"  # same content found locally: no transfer
    MOVED = "moved"
    VERSIONED = "versioned"  # a deletion: our copy went to the versions folder
    UNCHANGED = "unchanged"
    STALE = "stale"  # an older event than one already applied for this path
    SKIPPED = "skipped"  # our own event


class SyncEngine:
    """See the module docstring."""

    def __init__(self, received_dir: Path, *, self_id: PeerId, fetch: FetchFn,
                 origin_label: Callable[[PeerId], str] | None = None,
                 suppress: Callable[[Path, bytes], None] | None = None,
                 local_lookup: Callable[[bytes], Path | None] | None = None,
                 log: EventLog | None = None, index_path: Path | None = None,
                 fetch_many: FetchManyFn | None = None) -> None:
        self.root = Path(received_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.self_id = self_id
        self._fetch = fetch
        self._fetch_many = fetch_many
        self._label = origin_label or (lambda p: p.short)
        self._suppress = suppress or (lambda _p, _h: None)
        self._local_lookup = local_lookup or (lambda _h: None)
        self._log = log
        self.index = FileIndex(index_path or self.root / SYNC_INDEX_NAME)
        self._applied: dict[tuple[bytes, str, str], int] = {}
        self._labels: dict[PeerId, str] | None = None  # memo while a batch is applied
        self._dirs_made: set[Path] | None = None  # folders ensured while a batch is applied

    def close(self) -> None:
        self.index.close()

    # -- paths ---------------------------------------------------------------
    def label_for(self, origin: PeerId) -> str:
        labels = self._labels
        if labels is not None and origin in labels:
            return labels[origin]
        label = sanitize_label(self._label(origin), origin.short)
        if labels is not None:
            labels[origin] = label
        return label

    def rel_for(self, event: ChangeEvent, path: str) -> PurePosixPath:
        return PurePosixPath(self.label_for(event.origin), event.folder) / safe_relpath(path)

    def target_for(self, event: ChangeEvent, path: str | None = None) -> Path:
        return resolve_under(self.root, self.rel_for(event, event.path if path is None
                                                     else path))

    # -- entry point -----------------------------------------------------------------
    async def apply(self, event: ChangeEvent) -> SyncOutcome:
        """Apply one verified event from a trusted origin. Raises P2PError subclasses."""
        if event.origin == self.self_id:
            return SyncOutcome.SKIPPED
        key = (event.origin.key, event.folder, event.path)
        if self._applied.get(key, 0) >= event.seq:
            return SyncOutcome.STALE
        try:
            if event.kind == "deleted":
                outcome = self._delete(event)
            elif event.kind == "moved":
                outcome = await self._move(event)
            else:
                outcome = await self._ensure_content(event, self.target_for(event))
        except OSError as exc:
            raise local_io_error(exc, f"cannot apply {event.kind} of {event.path}") from None
        self._applied_ok(event, outcome)
        return outcome

    async def apply_batch(self, events: list[ChangeEvent]
                          ) -> list[tuple[ChangeEvent, SyncOutcome | P2PError]]:
        """Apply events in order, with the fetches of consecutive content events going
        out together (one ``fetch_many`` per origin and folder, not one session per file).

        Each event gets its own outcome or error (one failed file does not fail the
        rest). Deletions and moves first wait for the fetches queued before them, and a
        second event for a path with a fetch pending does too, so the order of events
        per path is kept. Without ``fetch_many`` this is ``apply`` per event.
        """
        self._labels = {}  # an alias renamed meanwhile applies from the next batch on
        self._dirs_made = set()
        try:
            return await self._apply_batch(events)
        finally:
            self._labels = None
            self._dirs_made = None

    async def _apply_batch(self, events: list[ChangeEvent]
                           ) -> list[tuple[ChangeEvent, SyncOutcome | P2PError]]:
        out: list[tuple[ChangeEvent, SyncOutcome | P2PError]] = []
        pending: dict[tuple[bytes, str, str], tuple[ChangeEvent, Path]] = {}

        async def flush() -> None:
            if pending:
                items = list(pending.values())
                pending.clear()
                out.extend(await self._fetch_pending(items))

        for event in events:
            key = (event.origin.key, event.folder, event.path)
            content = event.kind not in ("deleted", "moved")
            if (self._fetch_many is None or not content or key in pending
                    or len(pending) >= MAX_FETCH_BATCH):
                await flush()
            if self._fetch_many is None or not content:
                try:
                    out.append((event, await self.apply(event)))
                except P2PError as exc:
                    out.append((event, exc))
                continue
            if event.origin == self.self_id:
                out.append((event, SyncOutcome.SKIPPED))
                continue
            if self._applied.get(key, 0) >= event.seq:
                out.append((event, SyncOutcome.STALE))
                continue
            try:
                target = self.target_for(event)
                ready = await self._prepare_content(event, target)
            except P2PError as exc:
                out.append((event, exc))
                continue
            except OSError as exc:
                out.append((event, local_io_error(exc, f"cannot apply {event.kind} of "
                                                       f"{event.path}")))
                continue
            if ready is not None:
                self._applied_ok(event, ready, target)
                out.append((event, ready))
            else:
                pending[key] = (event, target)
        await flush()
        return out

    async def _fetch_pending(self, items: list[tuple[ChangeEvent, Path]]
                             ) -> list[tuple[ChangeEvent, SyncOutcome | P2PError]]:
        assert self._fetch_many is not None
        groups: dict[tuple[PeerId, str], list[tuple[ChangeEvent, Path]]] = {}
        for event, target in items:
            groups.setdefault((event.origin, event.folder), []).append((event, target))
        results: dict[int, SyncOutcome | P2PError] = {}
        for (origin, folder), group in groups.items():
            try:
                fetched = await self._fetch_many(origin, folder,
                                                 [(e.path, e.hash) for e, _t in group])
            except P2PError as exc:
                fetched = {e.path: exc for e, _t in group}
            got_paths: list[Path | None] = []
            for event, _target in group:
                got = fetched.get(event.path)
                if got is None:
                    got = P2PError(f"fetching {event.folder}/{event.path} from "
                                   f"{origin.short} gave no file")
                if isinstance(got, P2PError):
                    results[id(event)] = got
                    got_paths.append(None)
                else:
                    got_paths.append(Path(got))
            # every fetched file checked against its event's hash in one thread hop
            digests = await asyncio.to_thread(_hash_each, got_paths)
            with self.index.transaction(), self._log_batch():
                for (event, target), got_path, digest in zip(group, got_paths, digests,
                                                             strict=True):
                    if got_path is None or digest is None:
                        continue
                    try:
                        outcome = self._show_fetched(event, target, got_path, digest)
                    except P2PError as exc:
                        results[id(event)] = exc
                        continue
                    except OSError as exc:
                        results[id(event)] = local_io_error(
                            exc, f"cannot apply {event.kind} of {event.path}")
                        continue
                    self._applied_ok(event, outcome, target)
                    results[id(event)] = outcome
        return [(event, results[id(event)]) for event, _t in items]

    def _applied_ok(self, event: ChangeEvent, outcome: SyncOutcome,
                    target: Path | None = None) -> None:
        key = (event.origin.key, event.folder, event.path)
        self._applied[key] = event.seq
        if event.kind == "moved":
            self._applied[(event.origin.key, event.folder, event.old_path)] = event.seq
        if self._log is not None and outcome in (SyncOutcome.FETCHED, SyncOutcome.COPIED):
            self._log.emit(FileReceived(
                peer_id=str(event.origin), path=event.path, size=event.size,
                hash=event.hash.hex(), saved_as=str(target or self.target_for(event)),
                folder=event.folder, event_id=event.id.hex(), how=outcome.value))

    # -- kinds ------------------------------------------------------------------------
    def _delete(self, event: ChangeEvent) -> SyncOutcome:
        target = self.target_for(event)
        if not target.is_file():
            return SyncOutcome.UNCHANGED
        self._version(event, event.path, target)
        return SyncOutcome.VERSIONED

    async def _move(self, event: ChangeEvent) -> SyncOutcome:
        old = self.target_for(event, event.old_path)
        new = self.target_for(event)
        if not old.is_file():
            return await self._ensure_content(event, new)
        entry = self.index.get(self._index_key(old))
        if entry is None or entry.hash != event.hash:
            _size, _m, digest = await asyncio.to_thread(hash_file, old)
        else:
            digest = entry.hash
        if digest != event.hash:
            # our old copy is not what was moved: keep it as a version, fetch the new one
            self._version(event, event.old_path, old)
            return await self._ensure_content(event, new)
        if new.is_file():
            self._version(event, event.path, new)
        ensure_dirs(self.root, self.rel_for(event, event.path).parent)
        self._suppress(old, b"")
        self._suppress(new, event.hash)
        os.replace(old, new)
        self.index.remove(self._index_key(old))
        self._record(new, event.hash)
        return SyncOutcome.MOVED

    async def _ensure_content(self, event: ChangeEvent, target: Path) -> SyncOutcome:
        ready = await self._prepare_content(event, target)
        if ready is not None:
            return ready
        fetched = await self._fetch(event.origin, event.folder, event.path, event.hash)
        return await self._finish_fetch(event, target, Path(fetched))

    async def _prepare_content(self, event: ChangeEvent, target: Path) -> SyncOutcome | None:
        """UNCHANGED / COPIED when no transfer is needed; None when the caller must fetch
        (the copy being replaced is already in the versions folder, the write suppressed)."""
        if target.is_file():
            entry = self.index.get(self._index_key(target))
            st = target.stat()
            if entry and entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
                digest = entry.hash
            else:
                digest = (await asyncio.to_thread(hash_file, target))[2]
            if digest == event.hash:
                self._record(target, digest)
                return SyncOutcome.UNCHANGED
        made = self._dirs_made
        if made is None or target.parent not in made:
            ensure_dirs(self.root, PurePosixPath(*target.relative_to(self.root).parent.parts))
            if made is not None:
                made.add(target.parent)
        source = await self._find_local(event.hash, exclude=target)
        if source is not None:
            partial = target.with_name("." + target.name + PARTIAL_SUFFIX)
            await asyncio.to_thread(shutil.copyfile, source, partial)
            if (await asyncio.to_thread(hash_file, partial))[2] != event.hash:
                partial.unlink(missing_ok=True)  # changed under us; fall back to a fetch
            else:
                self._replace(event, target, partial)
                return SyncOutcome.COPIED
        if target.is_file():
            # keep the copy we are replacing (also if the fetch fails: nothing lost)
            self._version(event, event.path, target)
        # the transfer layer writes straight to `target`: a watcher on the received dir
        # (it may be shared too) must not announce that write as our own change
        self._suppress(target, event.hash)
        return None

    async def _finish_fetch(self, event: ChangeEvent, target: Path, fetched: Path
                            ) -> SyncOutcome:
        """Check what the transfer wrote against the event's hash, then show it."""
        digest = (await asyncio.to_thread(hash_file, fetched))[2]
        return self._show_fetched(event, target, fetched, digest)

    def _log_batch(self) -> contextlib.AbstractContextManager[None]:
        return self._log.batch() if self._log is not None else contextlib.nullcontext()

    def _show_fetched(self, event: ChangeEvent, target: Path, fetched: Path,
                      digest: bytes | OSError) -> SyncOutcome:
        if isinstance(digest, OSError):
            raise digest
        if digest != event.hash:
            raise IntegrityError(f"{event.path} from {event.origin.short} does not match the "
                                 "hash its change event announced")
        if Path(fetched) != target:
            self._replace(event, target, Path(fetched))
        else:
            self._record(target, digest)
        return SyncOutcome.FETCHED

    # -- helpers ----------------------------------------------------------------------
    async def _find_local(self, digest: bytes, exclude: Path) -> Path | None:
        candidates: list[Path] = []
        local = self._local_lookup(digest)
        if local is not None:
            candidates.append(Path(local))
        candidates += [self.root / rel for rel in self.index.find_by_hash(digest)]
        for cand in candidates:
            if cand == exclude or not cand.is_file() or cand.is_symlink():
                continue
            try:
                if (await asyncio.to_thread(hash_file, cand))[2] == digest:
                    return cand
            except OSError:
                continue
        return None

    def _replace(self, event: ChangeEvent, target: Path, source: Path) -> None:
        if target.is_file():
            self._version(event, event.path, target)
        self._suppress(target, event.hash)
        os.replace(source, target)
        self._record(target, event.hash)

    def _version(self, event: ChangeEvent, path: str, current: Path) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"
        rel = PurePosixPath(self.label_for(event.origin), VERSIONS_DIR_NAME, event.folder,
                            *safe_relpath(path).parts)
        rel = rel.with_name(f"{rel.name}~{stamp}")
        ensure_dirs(self.root, rel.parent)
        dest = self.root.joinpath(*rel.parts)
        self._suppress(current, b"")
        os.replace(current, dest)
        self.index.remove(self._index_key(current))
        return dest

    def _index_key(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            raise LocalIOError(f"{path} is outside the received dir") from None

    def _record(self, path: Path, digest: bytes) -> None:
        st = path.stat()
        self.index.put(self._index_key(path), st.st_size, st.st_mtime_ns, digest)


def _hash_each(paths: list[Path | None]) -> list[bytes | OSError | None]:
    """BLAKE3 of each file (blocking); an OSError in place of a file that cannot be read."""
    out: list[bytes | OSError | None] = []
    for p in paths:
        if p is None:
            out.append(None)
            continue
        try:
            out.append(hash_file(p)[2])
        except OSError as exc:
            out.append(exc)
    return out


def check_event_path(event: ChangeEvent) -> None:
    """The stricter received-path rules of the transfer layer (internal names etc.)."""
    safe_relpath(event.path)
    if event.old_path:
        safe_relpath(event.old_path)


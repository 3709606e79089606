"""The --share mirror's driver: watchers, gossip, the received copies, fetches.

``MirrorService`` is what the daemon builds for ``--share DIR``. It owns

* one ``FolderWatcher`` per --share folder (its index ``<home>/index-<label>.db``),
  whose local changes it signs and publishes as gossip change events;
* a ``ReceivedMirror``, which applies the accepted events of trusted origins to
  ``<received dir>/<origin label>/<folder label>/`` (the decisions are the pure
  functions of node/folders/mirror.py; this does the file system and the fetches);
* the fetches (``<folder>/<path>`` from the origin, through the transfer layer)
  and the other side of them: what a peer may fetch from our --share folders.

Every write into the received dir is first ``suppress``-ed on the watchers, so a
received dir that is also shared does not announce our own writes (no echo
loops). A file whose content we already hold (in a --share folder or received
earlier) is copied, not fetched. Paths pass node.pathrules (no symlinks
followed, no escape from the target).

Imports node.folders.mirror, node.watcher, node.fileindex, node.pathrules,
node.statefiles, node.gossip (event and log types) and errors; the daemon
passes gossip and the transfer layer in (``Publisher``, ``Fetcher``), so this
never imports peering, sharing or transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from node.errors import LocalIOError, P2PError
from node.fileindex import FileIndex, hash_file
from node.folders.mirror import (
    SYNC_INDEX_NAME,
    MirrorOutcome,
    Step,
    applied_keys,
    brings_content,
    check_content,
    content_step,
    delete_step,
    event_key,
    failed_note,
    fetch_groups,
    fetch_rel,
    is_content,
    is_one_off,
    mirror_rel,
    move_step,
    must_flush,
    received_note,
    screen,
    shared_target,
    version_rel,
    version_stamp,
)
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.identity import PeerId
from node.pathrules import (
    PARTIAL_SUFFIX,
    ensure_dirs,
    local_io_error,
    resolve_under,
    sanitize_label,
)
from node.statefiles import is_state_name

if TYPE_CHECKING:  # node.watcher (and watchdog) load only when there is a folder to watch
    from node.watcher import FolderWatcher, LocalChange

log = logging.getLogger("p2pfs.mirror")

FetchFn = Callable[[PeerId, str, str, bytes], Awaitable[Path]]
# (origin, folder, [(path, hash)]) -> path -> the fetched file, or why it was not fetched
FetchManyFn = Callable[[PeerId, str, list[tuple[str, bytes]]],
                       Awaitable[dict[str, "Path | P2PError"]]]
Outcomes = list[tuple[ChangeEvent, "MirrorOutcome | P2PError"]]


class Publisher(Protocol):
    """What the mirror needs of gossip (node/gossip/service.py GossipService)."""

    async def publish_local(self, kind: str, folder: str, path: str, size: int, hash: bytes,
                            old_path: str = "") -> Any: ...

    async def publish_local_many(self, folder: str,
                                 changes: list[tuple[str, str, int, bytes, str]]) -> Any: ...


class Fetcher(Protocol):
    """What the mirror needs of the transfer layer (node/sharing.py ShareService)."""

    async def fetch(self, peer: PeerId, rel_path: str, root_hash: bytes | None) -> Any: ...

    async def fetch_many(self, peer: PeerId, rel_paths: list[str]
                         ) -> dict[str, Path | P2PError]: ...


class ReceivedMirror:
    """Applies trusted peers' change events to our copies of their shared folders."""

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

    def target_for(self, event: ChangeEvent, path: str | None = None) -> Path:
        return resolve_under(self.root, mirror_rel(self.label_for(event.origin), event.folder,
                                                   event.path if path is None else path))

    # -- entry points ----------------------------------------------------------------
    async def apply(self, event: ChangeEvent) -> MirrorOutcome:
        """Apply one verified event from a trusted origin. Raises P2PError subclasses."""
        early = screen(event, self_id=self.self_id,
                       last_seq=self._applied.get(event_key(event), 0))
        if early is not None:
            return early
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

    async def apply_batch(self, events: list[ChangeEvent]) -> Outcomes:
        """Apply events in order, with the fetches of consecutive content events going
        out together (one ``fetch_many`` per origin and folder, not one session per file).

        Each event gets its own outcome or error (one failed file does not fail the
        rest); the order of events per path is kept (mirror.must_flush). Without
        ``fetch_many`` this is ``apply`` per event.
        """
        self._labels = {}  # an alias renamed meanwhile applies from the next batch on
        self._dirs_made = set()
        try:
            return await self._apply_batch(events)
        finally:
            self._labels = None
            self._dirs_made = None

    async def _apply_batch(self, events: list[ChangeEvent]) -> Outcomes:
        out: Outcomes = []
        pending: dict[tuple[bytes, str, str], tuple[ChangeEvent, Path]] = {}
        batching = self._fetch_many is not None

        async def flush() -> None:
            if pending:
                items = list(pending.values())
                pending.clear()
                out.extend(await self._fetch_pending(items))

        for event in events:
            if must_flush(event, pending.keys(), batching=batching):
                await flush()
            if not batching or not is_content(event):
                try:
                    out.append((event, await self.apply(event)))
                except P2PError as exc:
                    out.append((event, exc))
                continue
            key = event_key(event)
            early = screen(event, self_id=self.self_id, last_seq=self._applied.get(key, 0))
            if early is not None:
                out.append((event, early))
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

    async def _fetch_pending(self, items: list[tuple[ChangeEvent, Path]]) -> Outcomes:
        assert self._fetch_many is not None
        results: dict[int, MirrorOutcome | P2PError] = {}
        for (origin, folder), group in fetch_groups(items).items():
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

    def _applied_ok(self, event: ChangeEvent, outcome: MirrorOutcome,
                    target: Path | None = None) -> None:
        for key in applied_keys(event):
            self._applied[key] = event.seq
        if self._log is not None and brings_content(outcome):
            note = received_note(event, outcome, str(target or self.target_for(event)))
            if note is not None:
                self._log.emit(note)

    # -- kinds ------------------------------------------------------------------------
    def _delete(self, event: ChangeEvent) -> MirrorOutcome:
        target = self.target_for(event)
        if delete_step(target.is_file()) is Step.ABSENT:
            return MirrorOutcome.UNCHANGED
        self._version(event, event.path, target)
        return MirrorOutcome.VERSIONED

    async def _move(self, event: ChangeEvent) -> MirrorOutcome:
        old = self.target_for(event, event.old_path)
        new = self.target_for(event)
        old_held = await self._held_moved(old, event.hash) if old.is_file() else None
        step = move_step(event.hash, old_held)
        if step is Step.REPLACE_OLD:
            self._version(event, event.old_path, old)
        if step is not Step.RENAME:
            return await self._ensure_content(event, new)
        if new.is_file():
            self._version(event, event.path, new)
        ensure_dirs(self.root, mirror_rel(self.label_for(event.origin), event.folder,
                                          event.path).parent)
        self._suppress(old, b"")
        self._suppress(new, event.hash)
        os.replace(old, new)
        self.index.remove(self._index_key(old))
        self._record(new, event.hash)
        return MirrorOutcome.MOVED

    async def _held_moved(self, old: Path, want: bytes) -> bytes:
        """The content of our old copy (the index's word when it names the moved hash)."""
        entry = self.index.get(self._index_key(old))
        if entry is not None and entry.hash == want:
            return entry.hash
        return (await asyncio.to_thread(hash_file, old))[2]

    async def _held(self, target: Path) -> bytes:
        """The content of the file at `target` (the index's word when size and mtime agree)."""
        entry = self.index.get(self._index_key(target))
        st = target.stat()
        if entry and entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
            return entry.hash
        return (await asyncio.to_thread(hash_file, target))[2]

    async def _ensure_content(self, event: ChangeEvent, target: Path) -> MirrorOutcome:
        ready = await self._prepare_content(event, target)
        if ready is not None:
            return ready
        fetched = await self._fetch(event.origin, event.folder, event.path, event.hash)
        digest = (await asyncio.to_thread(hash_file, Path(fetched)))[2]
        return self._show_fetched(event, target, Path(fetched), digest)

    async def _prepare_content(self, event: ChangeEvent, target: Path
                               ) -> MirrorOutcome | None:
        """UNCHANGED / COPIED when no transfer is needed; None when the caller must fetch
        (the copy being replaced is already in the versions folder, the write suppressed)."""
        held = await self._held(target) if target.is_file() else None
        if content_step(event.hash, held) is Step.KEEP:
            self._record(target, event.hash)
            return MirrorOutcome.UNCHANGED
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
                return MirrorOutcome.COPIED
        if target.is_file():
            # keep the copy we are replacing (also if the fetch fails: nothing lost)
            self._version(event, event.path, target)
        # the transfer layer writes straight to `target`: a watcher on the received dir
        # (it may be shared too) must not announce that write as our own change
        self._suppress(target, event.hash)
        return None

    def _log_batch(self) -> contextlib.AbstractContextManager[None]:
        return self._log.batch() if self._log is not None else contextlib.nullcontext()

    def _show_fetched(self, event: ChangeEvent, target: Path, fetched: Path,
                      digest: bytes | OSError) -> MirrorOutcome:
        if isinstance(digest, OSError):
            raise digest
        check_content(event, digest)
        if Path(fetched) != target:
            self._replace(event, target, Path(fetched))
        else:
            self._record(target, digest)
        return MirrorOutcome.FETCHED

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
        rel = version_rel(self.label_for(event.origin), event.folder, path,
                          version_stamp(time.time(), time.time_ns()))
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


class MirrorService:
    """See the module docstring. ``start`` watches the --share folders; ``stop`` ends
    the watchers; ``close`` (after gossip has stopped) closes the received index."""

    def __init__(self, shared: Mapping[str, Path], received: Path, *, self_id: PeerId,
                 home: Path, gossip: Publisher, transfers: Fetcher, events: EventLog,
                 label_for: Callable[[PeerId], str]) -> None:
        self.shared = dict(shared)  # folder label -> path (node.daemon.shared_folders)
        self.home = home
        self._gossip = gossip
        self._transfers = transfers
        self._events = events
        self._label_for = label_for
        self.watchers: list[FolderWatcher] = []
        self.received = ReceivedMirror(received, self_id=self_id, fetch=self._fetch,
                                       origin_label=label_for, suppress=self._suppress,
                                       local_lookup=self._local_lookup, log=events,
                                       fetch_many=self._fetch_many)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Watch every --share folder, announcing what changed while we were stopped."""
        if not self.shared:
            return
        from node.watcher import FolderWatcher

        for label, folder in self.shared.items():
            watcher = FolderWatcher(folder, label, index_path=self.home / f"index-{label}.db",
                                    on_change=functools.partial(self._local_change, label),
                                    on_changes=functools.partial(self._local_changes, label))
            self.watchers.append(watcher)
            changes = await watcher.start(scan=True)
            log.info("sharing folder %s as %r (%d change(s) since last run)", folder, label,
                     len(changes))

    async def stop(self) -> None:
        watchers, self.watchers = self.watchers, []
        results = await asyncio.gather(*(w.stop() for w in reversed(watchers)),
                                       return_exceptions=True)
        for watcher, result in zip(reversed(watchers), results, strict=True):
            if isinstance(result, Exception):
                log.warning("watcher of %s did not stop cleanly: %r", watcher.folder, result)

    def close(self) -> None:
        self.received.close()

    # -- our --share folders -> gossip ---------------------------------------------
    async def _local_change(self, label: str, change: LocalChange) -> None:
        await self._gossip.publish_local(change.kind, label, change.path, change.size,
                                         change.hash, change.old_path)

    async def _local_changes(self, label: str, changes: list[LocalChange]) -> None:
        await self._gossip.publish_local_many(label, [
            (c.kind, c.path, c.size, c.hash, c.old_path) for c in changes])

    def _suppress(self, path: Path, digest: bytes) -> None:
        for watcher in self.watchers:
            watcher.suppress(path, digest)

    def _local_lookup(self, digest: bytes) -> Path | None:
        for watcher in self.watchers:
            found = watcher.find_by_hash(digest)
            if found is not None:
                return found
        return None

    # -- accepted events of trusted origins -> the received copies ------------------
    async def apply_events(self, events: list[ChangeEvent]) -> None:
        """A batch of accepted events: content fetches go out together."""
        events = [e for e in events if not is_one_off(e)]
        for event, outcome in await self.received.apply_batch(events):
            if isinstance(outcome, P2PError):
                self._failed(event, outcome)
            else:
                log.debug("applied %s %s/%s from %s: %s", event.kind, event.folder,
                          event.path, self._label_for(event.origin), outcome.value)

    async def apply_event(self, event: ChangeEvent) -> None:
        if is_one_off(event):
            return
        try:
            outcome = await self.received.apply(event)
        except P2PError as exc:
            self._failed(event, exc)
            return
        log.info("applied %s %s/%s from %s: %s", event.kind, event.folder, event.path,
                 self._label_for(event.origin), outcome.value)

    def _failed(self, event: ChangeEvent, exc: P2PError) -> None:
        log.warning("could not apply %s of %s/%s from %s: %s", event.kind, event.folder,
                    event.path, self._label_for(event.origin), exc)
        self._events.emit(failed_note(event, str(exc)))

    # -- fetches, both ways ----------------------------------------------------------
    async def _fetch(self, origin: PeerId, folder: str, path: str, digest: bytes) -> Path:
        result = await self._transfers.fetch(origin, fetch_rel(folder, path), None)
        final = result.files[0].path if result.files else None
        if final is None:
            raise P2PError(f"fetching {folder}/{path} from {origin.short} gave no file")
        return Path(final)

    async def _fetch_many(self, origin: PeerId, folder: str, items: list[tuple[str, bytes]]
                          ) -> dict[str, Path | P2PError]:
        got = await self._transfers.fetch_many(origin, [fetch_rel(folder, p) for p, _h in items])
        out: dict[str, Path | P2PError] = {}
        for path, _h in items:
            found = got.get(fetch_rel(folder, path))
            if found is not None:
                out[path] = found
        return out

    def resolve_fetch(self, rel: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        """A peer fetches ``<folder label>/<path>`` of one of our --share folders: (the
        root the transfer names paths from, the file), or None when it may not."""
        named = shared_target(self.shared, rel)
        if named is None:
            return None
        folder = self.shared[named[0]]
        try:
            target = resolve_under(folder, named[1])
        except (P2PError, OSError):
            return None
        if is_state_name(target.name):
            return None  # never served, even if it somehow got announced
        return (folder.parent, target) if target.is_file() else None

    # -- status ----------------------------------------------------------------------
    def folders_json(self) -> list[dict[str, Any]]:
        """The --share folders for the dashboard: one-way, send-only, watched."""
        out = []
        for watcher in self.watchers:
            files, size = watcher.index.totals()  # one COUNT on an indexed table
            out.append({"label": watcher.label, "path": str(watcher.folder), "kind": "share",
                        "mode": "send-only", "state": "watching" if watcher.running
                        else "stopped", "files": files, "bytes": size})
        return out

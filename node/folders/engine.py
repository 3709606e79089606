"""The folder driver: runs every configured folder and implements ``FolderHost``.

``FolderSync`` owns one ``FolderRunner`` per folder in ``folders.json`` and one
"folders" channel per peer (node/folders/protocol.py). A runner loops:

1. scan the folder when the watcher saw something, on ``rescan()`` and every
   ``rescan_interval_s``; each new local FileInfo (our counter bumped) is stored,
   signed as a ``FolderChange`` and pushed to the peers of the folder;
2. plan (node/folders/planner.py) from the local index and every device's index;
3. apply the actions: fetch (from the online devices announcing that content,
   verified against the hash, then placed with what it replaces archived),
   conflict copies, removals into the versions folder, directories, symlinks,
   metadata; whatever we now hold is announced too (so other devices can fetch
   it from us). A failed fetch is retried with backoff; after a restart the
   indexes still say what we lack, so it is fetched again, and its partial file
   (kept in the home under ``folder-staging/<id>``) resumes.

Modes: send-only applies nothing (``override()`` pushes ours over the global
version); receive-only keeps local edits unannounced and reported as locally
changed (``revert()`` restores the global version, the local edit archived).

Channels: each side sends ``Hello`` with the folder ids it shares with the
other; only ids both list flow (an id from a trusted peer we do not share with
it raises one ``folder_offered`` notification). Changes are accepted from a
peer only for such a folder, and only of origins that are devices of that
folder (or relayed by one).

Imports the folder modules, node.notifications, node.errors, node.identity,
node.watcher (TreeWatcher) and node.transfer.store; the daemon passes the
network in as callables (``open_channel``, ``fetch``), so this never imports
peering, sharing or transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import blake3

from node.errors import ChannelClosed, P2PError, ProtocolError
from node.fileindex import hash_file
from node.folders import CONFIG_POLL_S, FETCH_PREFIX, disk
from node.folders import SERVICE as SERVICE  # the daemon's name for it, re-exported
from node.folders.config import FolderConfig, FolderConfigError, FolderMode, FolderStore
from node.folders.db import FolderDB
from node.folders.ignore import MARKER_FILE_NAME, IgnoreRules
from node.folders.model import FileInfo, FileKind
from node.folders.planner import (
    Adopt,
    Fetch,
    KeepConflict,
    MakeDir,
    MakeSymlink,
    Plan,
    Remove,
    SetMeta,
    override_infos,
    plan,
)
from node.folders.protocol import (
    CHANGES_BATCH_MAX,
    FOLDER_MESSAGES,
    Changes,
    Digest,
    FolderChange,
    Hello,
)
from node.folders.status import STATUS_NAMES_MAX, FolderState, FolderStatus
from node.folders.vector import Vector, device_key
from node.identity import Identity, PeerId
from node.notifications import (
    MAX_PATHS,
    FileReceived,
    FolderConflict,
    FolderLocallyChanged,
    FolderOffered,
    Notice,
)
from node.pathrules import resolve_under, safe_relpath
from node.transfer.store import current_umask
from node.wire import Message, decode_message

log = logging.getLogger("p2pfs.folders")

LINKS_DIR_NAME = "folder-links"
STAGING_DIR_NAME = "folder-staging"
TICK_S = 0.5
ANTI_ENTROPY_S = 5.0
CONNECT_BACKOFF_S = 1.0
CONNECT_BACKOFF_MAX_S = 30.0
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 60.0
SCAN_DEBOUNCE_S = 0.2
MAX_FETCH_BATCH = 1024  # files per fetch session (the transfer layer's MAX_FILES_PER_FETCH)
PRUNE_EVERY_S = 3600.0
SEND_TIMEOUT_S = 10.0
# names one device's index may hold in one folder (deletions count: they stay recorded);
# past it, changes for new names from that device are refused (each is at most
# MAX_CHANGE_BYTES, its name at most MAX_PATH_BYTES, so this bounds the index's size)
MAX_INDEX_ENTRIES_PER_DEVICE = 500_000
ABSENT_RECHECK_S = 2.0  # a folder whose path or marker is missing: look again this often
# a folder indexed before markers gets one only if one of its first this many known names
# is on disk (an empty mount point must not look like a folder whose files were deleted)
MARKER_PROBE_NAMES = 64

# (peer, fetch paths, where to stage, seeds) -> path -> staged file, or why not; seeds are
# local files (the old versions) whose chunks the transfer may reuse instead of fetching
FetchFn = Callable[[PeerId, list[str], Path, list[Path]],
                   Awaitable[dict[str, "Path | P2PError"]]]
Notify = Callable[[Notice], Any]


class Channel(Protocol):
    peer: PeerId

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


@dataclass
class _Retry:
    attempts: int = 0
    next_at: float = 0.0
    error: str = ""
    wanted: bytes = b""  # the content hash this retry is for


@dataclass
class _Link:
    peer: PeerId
    channel: Channel | None = None
    theirs: frozenset[str] = frozenset()  # folder ids the peer shares with us
    retry_at: float = 0.0
    backoff_s: float = CONNECT_BACKOFF_S
    connecting: bool = False
    outgoing: bool = False  # the current channel is one we dialled
    offered: set[str] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FolderRunner:
    """One folder: its database, watcher, scans, plans and the actions it applies."""

    def __init__(self, sync: FolderSync, cfg: FolderConfig) -> None:
        self.sync = sync
        self.cfg = cfg
        self.me = device_key(sync.identity.peer_id)
        self.db = FolderDB(sync.home / f"folder-{cfg.id}.db")
        # fetched files and their partials (resumed after a restart), outside the folder
        self.staging = sync.home / STAGING_DIR_NAME / cfg.id
        self._check_path()
        self.ignore = IgnoreRules(cfg.path)
        self.umask = current_umask()
        self._wake = asyncio.Event()
        self._scan_due = True
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None
        self.state = FolderState.IDLE
        self.last_error = ""
        self.last_scan_unix = 0.0
        self._last_plan: Plan | None = None
        self._retries: dict[str, _Retry] = {}
        self._next_scan_at = 0.0
        self._next_prune_at = 0.0
        self._scanned = asyncio.Event()
        self.conflicts_seen = 0
        self.absent = ""  # why the folder is not there (path or marker missing), or ""
        self.refused_entries = 0  # changes refused: their device's index was full
        self._full: set[bytes] = set()  # devices whose full index was logged
        self.index_error = ""

    def _check_path(self) -> None:
        """An index made for another path (the folder removed and added elsewhere) would
        make every file look deleted: start that index afresh."""
        tag = int.from_bytes(blake3.blake3(str(self.cfg.path).encode()).digest()[:7], "big")
        if self.db.meta("path_tag") not in (0, tag):
            log.info("folder %s moved to %s: indexing it afresh", self.cfg.id, self.cfg.path)
            self.db.clear_local()
            self.db.set_meta("marker", 0)
        self.db.set_meta("path_tag", tag)

    def missing(self) -> str:
        """Why the folder cannot be scanned or synced now, or "" when it can.

        The index knows files but the path is gone, or its marker is (an unmounted disk,
        a path replaced by an empty directory): a scan would announce every file as
        deleted, so nothing is scanned, applied or announced until it is back. A folder
        that knows no files yet (or indexed before markers existed) gets its marker."""
        root = self.cfg.path
        if not root.is_dir():
            return (f"folder path missing: {root} does not exist (an unmounted disk?); "
                    "nothing is synced until it is back")
        if disk.has_marker(root):
            if not self.db.meta("marker"):
                self.db.set_meta("marker", 1)
            return ""
        live = [name for name, i in self.db.local().items() if not i.deleted]
        knows_files = bool(live)
        if knows_files and not self.db.meta("marker") and not any(
                os.path.lexists(root / name) for name in live[:MARKER_PROBE_NAMES]):
            # indexed before markers, and none of the files it knows is there: an
            # unmounted disk at the first start after an upgrade; no marker is written
            return (f"folder path looks empty: none of the files the index knows is in "
                    f"{root} (an unmounted disk?); nothing is synced until they are back "
                    "(to start over on purpose, remove and add the folder)")
        if not knows_files or not self.db.meta("marker"):
            try:
                disk.write_marker(root, self.cfg.id)
            except OSError as exc:
                if knows_files:
                    return f"cannot create the folder marker in {root}: {exc}"
                return ""  # nothing to lose: sync on, the marker made once it can be
            self.db.set_meta("marker", 1)
            return ""
        return (f"folder marker missing: {root / MARKER_FILE_NAME} is gone while the index "
                "knows files (an unmounted disk, or an emptied folder?); nothing is synced "
                "until it is back (to start over on purpose, remove and add the folder)")

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        if not self.cfg.paused:
            await self._start_watcher()
        self._task = asyncio.create_task(self._run(), name=f"folder-{self.cfg.id}")

    async def stop(self) -> None:
        if self._task is not None:
            await _cancel_all([self._task])
        if self._watcher is not None:
            await self._watcher.stop()
        self.db.close()

    def poke_scan(self) -> None:
        self._scan_due = True
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    def _error(self, msg: str) -> None:
        if msg != self.last_error:
            log.warning("folder %s: %s", self.cfg.id, msg)
        self.last_error = msg
        self.state = FolderState.ERROR

    # -- main loop ------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if self.cfg.paused:
                self.state = FolderState.PAUSED
                await self._wake.wait()
                self._wake.clear()
                continue
            now = time.monotonic()
            try:
                why = self.missing()
                if why:
                    self.absent = why
                    self._error(why)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), ABSENT_RECHECK_S)
                    self._wake.clear()
                    continue
                if self.absent:
                    await self._back()
                if self._scan_due or now >= self._next_scan_at:
                    await self.scan_now()
                await self._sync_once()
                if now >= self._next_prune_at:
                    self._next_prune_at = now + PRUNE_EVERY_S
                    await asyncio.to_thread(disk.prune_versions, self.cfg.path,
                                            self.cfg.versions_keep_days,
                                            self.cfg.versions_keep_count)
            except asyncio.CancelledError:
                raise
            except (P2PError, OSError) as exc:
                self._error(str(exc))
            except Exception as exc:  # a bug in one round must not end the folder
                log.exception("folder %s: sync round failed", self.cfg.id)
                self._error(f"internal error: {exc!r}")
            timeout = self._next_wait()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(SCAN_DEBOUNCE_S if self._scan_due else 0)

    async def _back(self) -> None:
        """The folder's path and marker are there again: watch the folder anew (the old
        watch may be on the directory that was mounted over) and scan it."""
        log.info("folder %s: %s is back; syncing again", self.cfg.id, self.cfg.path)
        if self.last_error == self.absent:
            self.last_error = ""
        self.absent = ""
        self.state = FolderState.IDLE
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        await self._start_watcher()
        self._scan_due = True

    async def _start_watcher(self) -> None:
        from node.watcher import TreeWatcher

        try:
            self._watcher = TreeWatcher(self.cfg.path, self.poke_scan,
                                        ignore=lambda rel: rel.split("/", 1)[0]
                                        == disk.VERSIONS_DIR_NAME)
            await self._watcher.start()
        except P2PError as exc:
            self._watcher = None
            self._error(str(exc))

    def _next_wait(self) -> float:
        now = time.monotonic()
        deadline = self._next_scan_at
        pending = [r.next_at for r in self._retries.values()]
        if pending:
            deadline = min(deadline, min(pending))
        return max(0.05, min(deadline - now, 30.0))

    async def scan_now(self) -> int:
        """Scan the folder, store and announce what changed; returns how many changes."""
        self._scan_due = False
        self._next_scan_at = time.monotonic() + self.cfg.rescan_interval_s
        why = self.missing()
        if why:
            raise P2PError(why)
        self.state = FolderState.SCANNING
        self.ignore.reload()
        local = self.db.local()
        clock = self.db.meta("clock")
        changes, clock = await asyncio.to_thread(
            disk.scan, self.cfg.path, local, self.ignore, device=self.me, clock=clock)
        self.last_scan_unix = time.time()
        receive_only = self.cfg.mode is FolderMode.RECEIVE_ONLY
        announce: list[FileInfo] = []
        newly_changed: list[str] = []
        with self.db.tx():
            self.db.set_meta("clock", clock)
            for info in changes:
                old = local.get(info.name)
                if old is not None and info.version == old.version:
                    self.db.put_local(info, changed=self.db.is_changed(info.name))
                    continue  # a touch: remembered, not announced
                if receive_only:
                    # kept as ours, not announced: its version stays the one we had
                    base = replace(info, version=old.version) if old is not None else info
                    if not self.db.is_changed(info.name):
                        newly_changed.append(info.name)
                    self.db.put_local(base, changed=True)
                    continue
                self.db.put_local(info)
                announce.append(info)
        await self.announce(announce)
        if newly_changed:
            log.info("folder %s: %d file(s) changed locally, kept and not sent (receive-only)",
                     self.cfg.id, len(newly_changed))
            self.sync.notify(FolderLocallyChanged(
                folder=self.cfg.id, paths=_some_names(newly_changed),
                count=len(self.db.changed_names())))
        self._scanned.set()
        self.state = FolderState.IDLE
        if changes:
            log.info("folder %s: %d local change(s)", self.cfg.id, len(changes))
        return len(changes)

    async def announce(self, infos: Sequence[FileInfo]) -> None:
        """Sign, store and push our current version of each name."""
        if not infos:
            return
        ident = self.sync.identity
        seq = self.db.meta("seq")
        changes = []
        with self.db.tx():
            for info in infos:
                seq += 1
                ch = FolderChange.create(ident, folder=self.cfg.id, seq=seq,
                                         wall_ms=int(time.time() * 1000), info=info)
                self.db.put_remote(ch)
                changes.append(ch)
            self.db.set_meta("seq", seq)
            self.db.set_mark(ident.peer_id.key, seq)
        await self.sync.push(self.cfg, changes, exclude=None)

    # -- planning and applying ----------------------------------------------------------
    def _remotes(self) -> dict[str, dict[str, FileInfo]]:
        mine = self.sync.identity.peer_id.key
        allowed = {p.key for p in self.cfg.peers if self.sync.trusts(p)}
        return {b.hex()[:16]: index for b, index in self.db.remotes().items()
                if b != mine and b in allowed}

    def current_plan(self) -> Plan:
        self.ignore.reload()  # one stat: a just-written .p2pfsignore counts at once
        return plan(self.db.local(), self._remotes(), mode=self.cfg.mode,
                    ignored=lambda n: self.ignore(n), locally_changed=self.db.changed_names())

    async def _announce_pending(self) -> None:
        """Announce every local version our own index does not carry yet: what a round
        recorded but could not announce (it failed, or the node was killed in between)."""
        own = self.db.remote_index(self.sync.identity.peer_id.key)
        changed = self.db.changed_names()
        pending = [info for name, info in sorted(self.db.local().items())
                   if name not in changed and ((o := own.get(name)) is None
                                               or o.version != info.version
                                               or o.deleted != info.deleted)]
        if pending:
            log.info("folder %s: announcing %d recorded change(s)", self.cfg.id, len(pending))
            await self.announce(pending)

    async def _sync_once(self) -> None:
        await self._announce_pending()
        p = self.current_plan()
        self._last_plan = p
        if not p.actions:
            if not self._retries:
                await asyncio.to_thread(disk.clear_staging, self.staging)
            return
        self.state = FolderState.SYNCING
        fetches = [a for a in p.actions if isinstance(a, Fetch)]
        wanted = {f.name: f.info.hash for f in fetches}
        for name in list(self._retries):
            if wanted.get(name) != self._retries[name].wanted:
                del self._retries[name]  # superseded (or done): no more retries
        local = self.db.local()
        held: list[FileInfo] = []
        # removals last: a renamed file's content is still here to copy (no transfer)
        removals = [a for a in p.actions if isinstance(a, Remove)]
        try:
            for action in p.actions:
                if isinstance(action, (Fetch, Remove)):
                    continue
                got = await self._apply(action, local)
                if got is not None:
                    held.extend(got)
            held.extend(await self._fetch_all(fetches, local))
            for action in removals:
                got = await self._apply(action, local)
                if got is not None:
                    held.extend(got)
        finally:
            await self.announce(held)
        self.state = FolderState.IDLE if not self._retries else FolderState.SYNCING

    async def _apply(self, action: Any, local: dict[str, FileInfo]) -> list[FileInfo] | None:
        """Apply one non-fetch action; the FileInfos we now hold (to record and announce)."""
        root = self.cfg.path
        ours = local.get(action.name)
        try:
            if isinstance(action, Adopt):
                self.db.put_local(replace(action.info, mode=ours.mode, mtime_ns=ours.mtime_ns)
                                  if ours is not None and not action.info.deleted
                                  else action.info)
                return [action.info]
            if not await asyncio.to_thread(disk.untouched, root, action.name, ours):
                self._scan_due = True  # edited since the scan: record that first
                return None
            if isinstance(action, KeepConflict):
                dest = await asyncio.to_thread(disk.rename_conflict, root, action.name,
                                               action.copy_name)
                self.db.drop_local(action.name)
                local.pop(action.name, None)
                st = os.lstat(dest)
                clock = self.db.meta("clock")
                base = local.get(action.copy_name)
                version = (base.version if base is not None else Vector()).bump(self.me, clock)
                self.db.set_meta("clock", version.get(self.me))
                copy = FileInfo(action.copy_name, action.loser.kind, st.st_size,
                                st.st_mtime_ns, disk.mode_of(st), action.loser.hash, False,
                                version, b"", self.me, action.loser.symlink_target)
                self.db.put_local(copy)
                local[copy.name] = copy
                self.conflicts_seen += 1
                self.sync.notify(FolderConflict(folder=self.cfg.id, path=action.name,
                                                copy=action.copy_name,
                                                peer_id=self.sync.author_of(self.cfg,
                                                                            action.loser)))
                return [copy]
            if isinstance(action, Remove):
                await asyncio.to_thread(disk.archive, root, action.name)
                if os.path.lexists(root / action.name):
                    return None  # a folder with unsynced files in it stays
                info = action.info
            elif isinstance(action, MakeDir):
                info = await asyncio.to_thread(disk.make_dir, root, action.info, self.umask)
            elif isinstance(action, MakeSymlink):
                info = await asyncio.to_thread(disk.make_symlink, root, action.info)
            elif isinstance(action, SetMeta):
                info = await asyncio.to_thread(disk.set_meta, root, action.info, self.umask)
            else:
                return None
        except (OSError, P2PError) as exc:
            log.warning("folder %s: cannot apply %s of %s: %s", self.cfg.id,
                        type(action).__name__, action.name, exc)
            self.last_error = f"{action.name}: {exc}"
            return None
        self.db.put_local(info)  # with what the disk now has (mode, mtime)
        local[info.name] = info
        return [action.info]  # announced as the version it is

    async def _fetch_all(self, fetches: list[Fetch], local: dict[str, FileInfo]
                         ) -> list[FileInfo]:
        now = time.monotonic()
        todo = [f for f in fetches
                if (r := self._retries.get(f.name)) is None or r.next_at <= now]
        if not todo:
            return []
        # same content already in the folder (a rename, a copy): no transfer
        done: list[FileInfo] = []
        by_hash: dict[bytes, str] = {i.hash: n for n, i in local.items()
                                     if i.kind is FileKind.FILE and not i.deleted}
        rest: list[Fetch] = []
        for f in todo:
            src = by_hash.get(f.info.hash)
            if src is not None and src != f.name:
                got = await self._copy_local(f, src, local)
                if got is not None:
                    done.append(got)
                    continue
            rest.append(f)
        groups: dict[PeerId, list[Fetch]] = {}
        for f in rest:
            peer = self.sync.pick_source(self.cfg, f.sources)
            if peer is None:
                self._failed(f, "no online device of the folder has this version")
                continue
            groups.setdefault(peer, []).append(f)

        async def from_peer(peer: PeerId, items: list[Fetch]) -> list[FileInfo]:
            got: list[FileInfo] = []
            for i in range(0, len(items), MAX_FETCH_BATCH):
                got.extend(await self._fetch_from(peer, items[i:i + MAX_FETCH_BATCH], local))
            return got

        # one fetch session at a time per source device, the devices in parallel
        results = await asyncio.gather(*(from_peer(p, items) for p, items in groups.items()),
                                       return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome
            done.extend(outcome)
        return done

    async def _copy_local(self, f: Fetch, src: str, local: dict[str, FileInfo]
                          ) -> FileInfo | None:
        import shutil

        root = self.cfg.path
        staging = self.staging / "local"
        try:
            source = resolve_under(root, safe_relpath(src))
            await asyncio.to_thread(os.makedirs, staging, 0o700, True)
            staged = staging / f"{os.urandom(6).hex()}"
            await asyncio.to_thread(shutil.copyfile, source, staged)
            if (await asyncio.to_thread(hash_file, staged))[2] != f.info.hash:
                staged.unlink(missing_ok=True)
                return None
            return await self._place(f, staged, local)
        except (OSError, P2PError) as exc:
            log.info("folder %s: local copy of %s failed: %s", self.cfg.id, f.name, exc)
            return None

    async def _place(self, f: Fetch, staged: Path, local: dict[str, FileInfo]
                     ) -> FileInfo | None:
        root = self.cfg.path
        if not await asyncio.to_thread(disk.untouched, root, f.name, local.get(f.name)):
            self._scan_due = True
            staged.unlink(missing_ok=True)
            return None
        held = await asyncio.to_thread(disk.place, root, f.info, staged, self.umask)
        self.db.put_local(held)
        local[f.name] = held
        self._retries.pop(f.name, None)
        return f.info

    async def _fetch_from(self, peer: PeerId, items: list[Fetch], local: dict[str, FileInfo]
                          ) -> list[FileInfo]:
        paths = {f"{FETCH_PREFIX}/{self.cfg.id}/{f.name}": f for f in items}
        staging = self.staging
        seeds = [self.cfg.path / f.name for f in items
                 if (old := local.get(f.name)) is not None and not old.deleted
                 and old.kind is FileKind.FILE]
        try:
            await asyncio.to_thread(os.makedirs, staging, 0o700, True)
            got = await self.sync.fetch(peer, list(paths), staging, seeds)
        except P2PError as exc:
            got = {p: exc for p in paths}
        fetched: list[tuple[Fetch, Path, FileInfo | None]] = []
        for path, f in paths.items():
            result = got.get(path)
            if result is None or isinstance(result, P2PError):
                self._failed(f, str(result or "no file"))
                continue
            fetched.append((f, Path(result), local.get(f.name)))
        # verify and place the whole batch in one worker-thread call, record it in one
        # transaction (a thread hop and a commit per small file cost more than the file)
        outcomes = await asyncio.to_thread(self._settle_batch, fetched, peer)
        done: list[FileInfo] = []
        with self.db.tx():
            for (f, _staged, _old), outcome in zip(fetched, outcomes, strict=True):
                if isinstance(outcome, str):
                    self._failed(f, outcome)
                elif outcome is None:
                    self._scan_due = True  # edited since the scan: record that first
                else:
                    self.db.put_local(outcome)
                    local[f.name] = outcome
                    self._retries.pop(f.name, None)
                    done.append(f.info)
        for info in done:
            self.sync.notify(FileReceived(
                peer_id=str(peer), path=info.name, size=info.size, hash=info.hash.hex(),
                saved_as=str(self.cfg.path / info.name), folder=self.cfg.id, how="fetched"))
        return done

    def _settle_batch(self, fetched: list[tuple[Fetch, Path, FileInfo | None]], peer: PeerId
                      ) -> list[FileInfo | str | None]:
        """Blocking: for each fetched file, check it is the announced version and that the
        disk still holds what the index says, then place it. Per file: the FileInfo now
        held, None (the disk changed since the scan; the staged file is dropped), or why
        it failed."""
        root = self.cfg.path
        out: list[FileInfo | str | None] = []
        for f, staged, old in fetched:
            try:
                digest = hash_file(staged)[2]
            except OSError as exc:
                out.append(f"cannot read the fetched file: {exc}")
                continue
            if digest != f.info.hash:
                staged.unlink(missing_ok=True)
                out.append(f"{f.name} from {peer.short} does not match its announced hash")
                continue
            try:
                if not disk.untouched(root, f.name, old):
                    staged.unlink(missing_ok=True)
                    out.append(None)
                    continue
                out.append(disk.place(root, f.info, staged, self.umask))
            except (OSError, P2PError) as exc:
                out.append(str(exc))
        return out

    def index_full(self, origin: PeerId, refused: int) -> None:
        """A device's index reached MAX_INDEX_ENTRIES_PER_DEVICE: say so once (log, the
        folder's last error); its changes of names already known still count."""
        self.refused_entries += refused
        msg = (f"device {origin.short} announces more than {MAX_INDEX_ENTRIES_PER_DEVICE:,} "
               f"files in this folder: {self.refused_entries:,} of its entries refused")
        if origin.key not in self._full:
            self._full.add(origin.key)
            log.error("folder %s: %s", self.cfg.id, msg)
        self.index_error = msg  # kept in the status: a fetch error must not hide it
        self.last_error = msg

    def _failed(self, f: Fetch, error: str) -> None:
        r = self._retries.get(f.name)
        if r is None or r.wanted != f.info.hash:
            r = self._retries[f.name] = _Retry(wanted=f.info.hash)
        r.attempts += 1
        r.error = error
        r.next_at = time.monotonic() + min(RETRY_BACKOFF_S * 2 ** (r.attempts - 1),
                                           RETRY_BACKOFF_MAX_S)
        self.last_error = f"{f.name}: {error}"
        log.info("folder %s: fetching %s failed (%s); retry %d in %.0f s", self.cfg.id, f.name,
                 error, r.attempts, r.next_at - time.monotonic())

    # -- FolderHost helpers ---------------------------------------------------------------
    def status(self) -> FolderStatus:
        local = self.db.local()
        p = self.current_plan()
        held = [i for i in local.values() if not i.deleted and i.kind is FileKind.FILE]
        glob = [i for i in p.global_index.values()
                if not i.deleted and i.kind is FileKind.FILE]
        state = FolderState.PAUSED if self.cfg.paused else self.state
        return FolderStatus(
            id=self.cfg.id, state=state, local_files=len(held),
            local_bytes=sum(i.size for i in held), global_files=len(glob),
            global_bytes=sum(i.size for i in glob), need_files=p.need_files,
            need_bytes=p.need_bytes,
            conflicts=sum(1 for i in held if ".sync-conflict-" in PurePosixPath(i.name).name),
            locally_changed=len(p.locally_changed) + len(p.out_of_sync),
            locally_changed_names=tuple(sorted((*p.locally_changed, *p.out_of_sync))
                                        [:STATUS_NAMES_MAX]),
            last_error="; ".join(dict.fromkeys(e for e in (self.index_error, self.last_error)
                                               if e)),
            last_scan_unix=self.last_scan_unix)

    async def override(self) -> int:
        if self.cfg.mode is not FolderMode.SEND_ONLY:
            raise FolderConfigError(f"folder {self.cfg.id} is {self.cfg.mode.value}: only a "
                                    "send-only folder can be overridden")
        await self.scan_now()
        p = self.current_plan()
        clock = self.db.meta("clock")
        infos = override_infos(self.db.local(), p.global_index, device=self.me, clock=clock,
                               now_ns=time.time_ns())
        with self.db.tx():
            for info in infos:
                self.db.put_local(info)
                clock = max(clock, info.version.get(self.me))
            self.db.set_meta("clock", clock)
        await self.announce(infos)
        return len(infos)

    async def revert(self) -> int:
        if self.cfg.mode is not FolderMode.RECEIVE_ONLY:
            raise FolderConfigError(f"folder {self.cfg.id} is {self.cfg.mode.value}: only a "
                                    "receive-only folder can be reverted")
        await self.scan_now()
        names = self.db.changed_names()
        glob = self.current_plan().global_index
        for name in sorted(names, key=lambda n: -n.count("/")):
            await asyncio.to_thread(disk.archive, self.cfg.path, name)
            g = glob.get(name)
            if g is not None and g.deleted:
                self.db.put_local(g)
            else:
                self.db.drop_local(name)
        self.poke()
        return len(names)


class FolderSync:
    """See the module docstring; the daemon's ``self.folders``."""

    def __init__(self, identity: Identity, store: FolderStore, home: Path, *,
                 open_channel: Callable[[PeerId], Awaitable[Channel]],
                 fetch: FetchFn, is_trusted: Callable[[PeerId], bool],
                 notify: Notify | None = None,
                 label_for: Callable[[PeerId], str] | None = None) -> None:
        self.identity = identity
        self.store = store
        self.home = Path(home)
        self._open_channel = open_channel
        self.fetch = fetch
        self._is_trusted = is_trusted
        self._notify = notify
        self._label_for = label_for or (lambda p: p.short)
        self.runners: dict[str, FolderRunner] = {}
        self._links: dict[PeerId, _Link] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._running = True
        await self._apply_config()
        self._ticker = asyncio.create_task(self._tick(), name="folders-tick")

    async def stop(self) -> None:
        self._running = False
        await _cancel_all([t for t in (self._ticker, *self._tasks) if t is not None])
        for link in self._links.values():
            if link.channel is not None:
                await _close_quietly(link.channel)
        self._links.clear()
        for runner in list(self.runners.values()):
            await runner.stop()
        self.runners.clear()

    def trusts(self, peer: PeerId) -> bool:
        return self._is_trusted(peer)

    def notify(self, notice: Notice) -> None:
        if self._notify is not None:
            self._notify(notice)

    # -- FolderHost ---------------------------------------------------------------------
    async def config_changed(self) -> None:
        try:
            self.store.reload()
        except FolderConfigError as exc:
            log.warning("folders.json not applied: %s", exc)
            return
        await self._apply_config()

    def status(self, cfg: FolderConfig) -> FolderStatus:
        runner = self.runners.get(cfg.id)
        if runner is None:
            return FolderStatus(id=cfg.id, state=FolderState.PAUSED if cfg.paused
                                else FolderState.IDLE)
        return runner.status()

    async def rescan(self, folder_id: str) -> None:
        runner = self._runner(folder_id)
        await runner.scan_now()
        runner.poke()

    async def override(self, folder_id: str) -> int:
        return await self._runner(folder_id).override()

    async def revert(self, folder_id: str) -> int:
        return await self._runner(folder_id).revert()

    def _runner(self, folder_id: str) -> FolderRunner:
        runner = self.runners.get(folder_id)
        if runner is None:
            self.store.require(folder_id)  # the clear "no folder with id" error
            raise FolderConfigError(f"folder {folder_id} is not running")
        return runner

    # -- config ---------------------------------------------------------------------------
    async def _apply_config(self) -> None:
        wanted = {cfg.id: cfg for cfg in self.store}
        for fid in list(self.runners):
            runner = self.runners[fid]
            cfg = wanted.get(fid)
            if cfg is None or cfg.path != runner.cfg.path or cfg.paused != runner.cfg.paused:
                await runner.stop()
                del self.runners[fid]
            else:
                runner.cfg = cfg  # peers, mode, retention: read live
                runner.poke()
        for fid, cfg in wanted.items():
            if fid not in self.runners:
                try:
                    self._link_folder(cfg)
                except OSError as exc:
                    log.warning("folder %s: cannot serve it: %s", fid, exc)
                runner = FolderRunner(self, cfg)
                self.runners[fid] = runner
                await runner.start()
        for link in self._links.values():
            if link.channel is not None:
                self._spawn(self._hello(link))

    async def _tick(self) -> None:
        next_ae = 0.0
        next_cfg = time.monotonic() + CONFIG_POLL_S
        while self._running:
            now = time.monotonic()
            if now >= next_cfg:
                next_cfg = now + CONFIG_POLL_S
                if self.store.changed():
                    await self.config_changed()
            for peer in self._folder_peers():
                link = self._link(peer)
                if link.channel is None and not link.connecting and now >= link.retry_at:
                    link.connecting = True
                    self._spawn(self._connect(link))
            if now >= next_ae:
                next_ae = now + ANTI_ENTROPY_S
                for link in self._links.values():
                    if link.channel is not None:
                        self._spawn(self._digests(link))
            await asyncio.sleep(TICK_S)

    def _folder_peers(self) -> set[PeerId]:
        out: set[PeerId] = set()
        for cfg in self.store:
            if not cfg.paused:
                out.update(p for p in cfg.peers if p != self.identity.peer_id)
        return {p for p in out if self._is_trusted(p)}

    def _shared_with(self, peer: PeerId) -> list[FolderConfig]:
        return [c for c in self.store.for_peer(peer) if not c.paused and c.id in self.runners]

    def _agreed(self, link: _Link, folder: str) -> FolderConfig | None:
        cfg = self.store.get(folder)
        if (cfg is None or cfg.paused or folder not in self.runners
                or not cfg.shared_with(link.peer) or folder not in link.theirs):
            return None
        return cfg

    # -- channels -------------------------------------------------------------------------
    def _link(self, peer: PeerId) -> _Link:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link(peer)
        return link

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, link: _Link) -> None:
        try:
            channel = await asyncio.wait_for(self._open_channel(link.peer), 10.0)
        except (TimeoutError, P2PError, OSError) as exc:
            log.debug("folders: cannot reach %s: %s", link.peer.short, exc)
            link.retry_at = time.monotonic() + link.backoff_s
            link.backoff_s = min(link.backoff_s * 2, CONNECT_BACKOFF_MAX_S)
            link.connecting = False
            return
        link.connecting = False
        link.backoff_s = CONNECT_BACKOFF_S
        old = link.channel
        if old is not None:
            # both dialled at once: the channel dialled by the smaller key wins (both sides
            # apply the same rule, so exactly one channel survives)
            if self.identity.peer_id.key > link.peer.key:
                await _close_quietly(channel)
                return
            link.channel = None
            await _close_quietly(old)
        await self._serve(link, channel, outgoing=True)

    async def handle_channel(self, channel: Channel) -> None:
        """The peer opened a "folders" channel to us; returns when it closes."""
        link = self._link(channel.peer)
        old = link.channel
        if old is not None and link.outgoing and self.identity.peer_id.key < channel.peer.key:
            await _close_quietly(channel)  # ours was dialled by the smaller key: it stays
            return
        if old is not None:
            link.channel = None
            await _close_quietly(old)
        await self._serve(link, channel, outgoing=False)

    async def _serve(self, link: _Link, channel: Channel, *, outgoing: bool) -> None:
        link.channel = channel
        link.outgoing = outgoing
        try:
            await self._hello(link)
            while True:
                try:
                    data = await channel.recv()
                except (ChannelClosed, OSError):
                    return
                except ProtocolError as exc:
                    log.warning("folders channel from %s broke the rules: %s",
                                link.peer.short, exc)
                    return
                try:
                    await self._on_message(link, data)
                except ProtocolError as exc:
                    log.warning("bad folders message from %s: %s; closing", link.peer.short,
                                exc)
                    return
        finally:
            if link.channel is channel:
                link.channel = None
                link.theirs = frozenset()
            await _close_quietly(channel)

    async def _send(self, link: _Link, data: bytes) -> None:
        channel = link.channel
        if channel is None:
            return
        async with link.send_lock:
            try:
                await asyncio.wait_for(channel.send(data), SEND_TIMEOUT_S)
            except (TimeoutError, P2PError, OSError) as exc:
                log.info("folders: send to %s failed: %s", link.peer.short, exc)
                if link.channel is channel:
                    link.channel = None
                await _close_quietly(channel)

    async def _hello(self, link: _Link) -> None:
        shared = self._shared_with(link.peer)
        await self._send(link, Hello(tuple(c.id for c in shared),
                                     tuple(c.label for c in shared)).encode())

    async def _digests(self, link: _Link) -> None:
        for cfg in self._shared_with(link.peer):
            if cfg.id in link.theirs:
                runner = self.runners[cfg.id]
                marks = tuple(runner.db.marks().items())[:256]
                await self._send(link, Digest(cfg.id, marks).encode())

    async def _on_message(self, link: _Link, data: bytes) -> None:
        msg: Message = decode_message(data, expect=FOLDER_MESSAGES)
        if isinstance(msg, Hello):
            before = link.theirs
            link.theirs = frozenset(msg.folders)
            for fid in msg.folders:
                cfg = self.store.get(fid)
                if (cfg is None or not cfg.shared_with(link.peer)) and fid not in link.offered:
                    link.offered.add(fid)
                    self.notify(FolderOffered(peer_id=str(link.peer), folder_id=fid,
                                              label=msg.label_of(fid)))
            if link.theirs != before:
                await self._digests(link)
        elif isinstance(msg, Digest):
            cfg = self._agreed(link, msg.folder)
            if cfg is not None:
                await self._answer_digest(link, cfg, msg.as_dict())
        elif isinstance(msg, Changes):
            cfg = self._agreed(link, msg.folder)
            if cfg is not None:
                await self._ingest(link, cfg, msg)

    async def _answer_digest(self, link: _Link, cfg: FolderConfig, theirs: dict[bytes, int]
                             ) -> None:
        runner = self.runners[cfg.id]
        allowed = {p.key for p in cfg.peers} | {self.identity.peer_id.key}
        for origin, mark in runner.db.marks().items():
            if origin not in allowed or origin == link.peer.key:
                continue
            since = theirs.get(origin, 0)
            if since >= mark:
                continue
            while True:
                blobs = runner.db.changes_since(origin, since, CHANGES_BATCH_MAX)
                last = runner.db.seq_of(blobs[-1]) if blobs else mark
                upto = mark if len(blobs) < CHANGES_BATCH_MAX else min(last, mark)
                await self._send(link, Changes(cfg.id, origin, upto, since, False,
                                               tuple(blobs)).encode())
                if len(blobs) < CHANGES_BATCH_MAX or upto >= mark:
                    break
                since = upto

    async def _ingest(self, link: _Link, cfg: FolderConfig, msg: Changes) -> None:
        runner = self.runners[cfg.id]
        allowed = {p.key for p in cfg.peers if self._is_trusted(p)}
        if msg.origin not in allowed:
            return  # not a (trusted) device of this folder for us: neither stored nor relayed
        fresh: list[FolderChange] = []
        count = runner.db.remote_count(msg.origin)
        refused = 0
        with runner.db.tx():
            for blob in msg.changes:
                change = FolderChange.decode(blob)
                if change.origin.key != msg.origin or change.folder != cfg.id:
                    raise ProtocolError("folders changes: a change of another origin or folder")
                known = runner.db.remote_seq(msg.origin, change.info.name)
                if known >= change.seq:
                    continue  # held already (a relay's copy) or older: not stored, so its
                    # signature (most of what a change costs) needs no check
                if not known and count >= MAX_INDEX_ENTRIES_PER_DEVICE:
                    refused += 1  # a new name past the cap: dropped, and (the mark moving
                    continue  # on below) not asked for again
                if runner.db.put_remote(change.verify()):
                    fresh.append(change)
                    count += 0 if known else 1
            if not msg.live and msg.since <= runner.db.mark(msg.origin) < msg.upto:
                runner.db.set_mark(msg.origin, msg.upto)
        if refused:
            runner.index_full(PeerId(msg.origin), refused)
        if fresh:
            runner.poke()
            await self.push(cfg, fresh, exclude=link.peer)

    async def push(self, cfg: FolderConfig, changes: list[FolderChange],
                   exclude: PeerId | None) -> None:
        """Send changes live to every peer the folder is agreed with (relay included)."""
        if not changes:
            return
        by_origin: dict[bytes, list[FolderChange]] = {}
        for ch in changes:
            by_origin.setdefault(ch.origin.key, []).append(ch)
        for link in list(self._links.values()):
            if link.peer == exclude or self._agreed(link, cfg.id) is None:
                continue
            for origin, items in by_origin.items():
                if origin == link.peer.key:
                    continue
                for i in range(0, len(items), CHANGES_BATCH_MAX):
                    batch = items[i:i + CHANGES_BATCH_MAX]
                    await self._send(link, Changes(cfg.id, origin, batch[-1].seq,
                                                   batch[0].seq - 1, True,
                                                   tuple(c.encoded for c in batch)).encode())

    # -- fetch sources and serving ---------------------------------------------------------
    def pick_source(self, cfg: FolderConfig, sources: Sequence[str]) -> PeerId | None:
        """An online device of the folder announcing the content, preferring open links."""
        peers = {device_key(p): p for p in cfg.peers}
        candidates = [peers[s] for s in sources if s in peers]
        online = [p for p in candidates if (link := self._links.get(p)) is not None
                  and link.channel is not None and cfg.id in link.theirs]
        if online:
            return online[hash(time.monotonic()) % len(online)] if len(online) > 1 else online[0]
        return None

    def author_of(self, cfg: FolderConfig, info: FileInfo) -> str:
        for p in cfg.peers:
            if device_key(p) == info.modified_by:
                return str(p)
        return ""

    def resolve_fetch(self, peer: PeerId, rel: str) -> tuple[Path, Path] | None:
        """A peer fetches `.folders/<id>/<name>`: (root, file) when the folder is agreed
        with it and the name is a regular file we hold, reached through no symlink; None
        otherwise. Called once per file of every fetch we serve: string work and one
        lstat per component (no pathlib objects on the way)."""
        if not isinstance(rel, str) or not rel.startswith(FETCH_PREFIX + "/"):
            return None
        try:
            safe_relpath(rel)  # memoized
        except ProtocolError:
            return None
        pieces = rel.split("/", 2)
        if len(pieces) < 3:
            return None
        link = self._links.get(peer)
        cfg = self._agreed(link, pieces[1]) if link is not None else None
        if cfg is None:
            return None
        name = pieces[2]
        if self.runners[cfg.id].ignore(name):
            return None
        if not _regular_file_under(str(cfg.path), name):
            return None
        # the transfer layer names a file by its path under the root it is given: serve it
        # through <home>/folder-links/.folders/<id> (a symlink to the folder) so the name
        # is exactly what was asked for
        link_root = self.links_root
        return link_root, Path(f"{link_root}/{rel}")

    @property
    def links_root(self) -> Path:
        return self.home / LINKS_DIR_NAME

    def _link_folder(self, cfg: FolderConfig) -> None:
        """<home>/folder-links/.folders/<id> -> the folder (see resolve_fetch)."""
        base = self.links_root / FETCH_PREFIX
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        link = base / cfg.id
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(link) == str(cfg.path):
                return
            os.unlink(link)
        os.symlink(cfg.path, link)


NOTICE_NAMES_BYTES_MAX = 4096  # a notification is stored whole (the event log's row cap)


def _some_names(names: Sequence[str]) -> tuple[str, ...]:
    """The first names (sorted) that fit one notification: at most MAX_PATHS of them and
    NOTICE_NAMES_BYTES_MAX bytes in all (a name is up to 4 KB); the count says the rest."""
    out: list[str] = []
    used = 0
    for name in sorted(names)[:MAX_PATHS]:
        used += len(name.encode("utf-8", "surrogatepass"))
        if used > NOTICE_NAMES_BYTES_MAX and out:
            break
        out.append(name if used <= NOTICE_NAMES_BYTES_MAX else name[:256])
    return tuple(out)


def _regular_file_under(root: str, name: str) -> bool:
    """`root/name` (a checked relative name) is a regular file, and every component above
    it a real directory: no symlink anywhere below `root` (as pathrules.resolve_under)."""
    current = root
    parts = name.split("/")
    last = len(parts) - 1
    for i, part in enumerate(parts):
        current = f"{current}/{part}"
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            return False
        if not (stat.S_ISREG(mode) if i == last else stat.S_ISDIR(mode)):
            return False  # a symlink, or something else in the way
    return True


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel until every task is done: on Python 3.11 a task inside asyncio.wait_for can
    swallow one cancellation (when what it waits for completes at that moment)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.5)
    for t in tasks:
        if not t.cancelled():
            with contextlib.suppress(Exception):
                t.result()


async def _close_quietly(channel: Channel) -> None:
    with contextlib.suppress(P2PError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(channel.close(), 2.0)

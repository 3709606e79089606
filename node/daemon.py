"""The node daemon: the composition root, the only module that knows every service.

Start order: lock the home dir -> identity -> trust store, peer cache, peer
book -> transports (listeners) -> DHT -> contact record -> bootstrap
registration loops -> transfers, gossip, watchers -> control API. Stop runs in
reverse, and the whole stop is bounded so SIGINT/SIGTERM end the process
within 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from node.config import Settings, absolute_paths, port_option
from node.contact import ContactRecord
from node.control import ControlServer, Emit, socket_path_for
from node.errors import NodeAlreadyRunning, P2PError, PeerUnreachable, PortUnavailable, UnknownPeer
from node.identity import Identity, PeerId, load_identity
from node.peerbook import PeerBook
from node.peering import Peering
from node.statefiles import (
    check_received_dir,
    check_shared_root,
    is_state_name,
    private_dir,
    write_private,
)
from node.trust import TrustStore, resolve_peer

log = logging.getLogger("p2pfs.daemon")

STOP_BUDGET_S = 1.5
REGISTER_BACKOFF_MAX_S = 60.0
# how often the online list is fetched from each bootstrap server between registrations
PEER_POLL_S = 5.0
DHT_DISCOVER_S = 5.0
DHT_DISCOVER_BATCH = 32
RECORD_TTL_S = 3600
DAEMON_STATE_FILE = "daemon.json"
# `node share` of a file outside the shared folders is announced under this folder label
ONE_OFF_FOLDER = "_shared"
MAX_ANNOUNCED_FILES = 1000
LOCK_FILE = "daemon.lock"
TRUST_WATCH_S = 0.2  # how often the trust store is checked for revocations (one PRAGMA)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise P2PError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class HomeLock:
    """An exclusive flock on the home dir: a second daemon refuses to start."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.path.read_text().strip() or "?"
            raise NodeAlreadyRunning(
                f"a node is already running on {self.path.parent} (pid {pid}); "
                "stop it with `node stop` or use another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(self, settings: Settings, identity: Identity | None = None) -> None:
        settings = absolute_paths(settings)
        self.settings = settings
        self.home = settings.home
        self.identity = identity or load_identity(self.home)
        self.started_at = time.time()
        self._lock = HomeLock(self.home)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._record_seq = 0
        self.record: ContactRecord | None = None
        self.trust = TrustStore.in_home(self.home)
        self.cache: Any = None
        self.book: PeerBook
        self.dht: Any = None
        self.peering: Peering
        self.control = ControlServer(socket_path_for(self.home))
        self._bootstrap_clients: list[Any] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self._shared_folders()  # refuse a bad --share before anything starts (or logs)
        try:
            await self.start()
            log.info("node %s (%s) is up; control socket %s", self.identity.peer_id,
                     self.identity.name or "unnamed", self.control.path)
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        log.info("stopping")
        self._stop.set()

    async def start(self) -> None:
        self._lock.acquire()
        s = self.settings
        self.folders = self._shared_folders()  # a bad --share fails before any bind
        self.received = received_folder(s.received_path)  # so does a bad --received-dir
        from dht.peercache import PeerCache

        self.cache = PeerCache(self.home / "peers.db")
        self.book = PeerBook(self.identity.peer_id, self.cache)
        self.peering = Peering(
            self.identity, self.trust, host=s.listen_host,
            ports={"tcp": s.tcp_port, "udp": s.udp_port, "quic": s.quic_port},
            transports=s.transports, locate=self.locate,
        )
        self._closers.append(self.peering.stop)  # closes what bound if a later port fails

        from dht.node import DhtNode

        self.dht = DhtNode(self.identity, host=s.listen_host, port=s.dht_port, cache=self.cache)
        try:
            ports = await self.peering.start()
            ports["dht"] = await self.dht.start()
        except PortUnavailable as exc:
            raise exc.naming(port_option(exc.service, bad_address=exc.bad_address)) from None
        self._closers.append(self.dht.stop)
        self.ports = ports

        self.record = self._new_record()
        await self._start_services()
        self._register_control()
        await self.control.start()
        self._closers.append(self.control.close)
        self._spawn(self._dht_join())
        self._spawn(self._watch_trust())
        for url in s.bootstrap:
            self._spawn(self._register_loop(url))
        self._write_state()

    def _shared_folders(self) -> dict[str, Path]:
        """The --share folders, refused (ConfigError) when one would publish our own state."""
        folders = shared_folders(self.settings.shared_dirs)
        check_received_dir(self.settings.received_path, home=self.home)
        for folder in folders.values():
            check_shared_root(folder, home=self.home, received=self.settings.received_path)
        return folders

    async def _start_services(self) -> None:
        """Event log, transfers, gossip, sync and folder watchers."""
        from node.gossip.log import EventLog
        from node.gossip.service import GossipService
        from node.gossip.sync import SyncEngine
        from node.sharing import ShareService
        from node.watcher import FolderWatcher

        s = self.settings
        received = self.received
        self.events = EventLog(self.home / "events.db")
        self._closers.append(_async(self.events.close))
        self.sharing = ShareService(
            self.peering, received, notify=self.events.notify, label_for=self.label_for,
            resolve_shared=self._resolve_shared, default_transport=s.transport,
            targets=self._online_trusted,
        )
        self.sync = SyncEngine(received, self_id=self.identity.peer_id, fetch=self._sync_fetch,
                               origin_label=self.label_for, suppress=self._suppress,
                               local_lookup=self._local_lookup, log=self.events,
                               fetch_many=self._sync_fetch_many)
        self._closers.append(_async(self.sync.close))
        self.gossip = GossipService(
            self.identity, self.events, peers=self._gossip_peers,
            open_channel=lambda peer: self.peering.connect(peer, "gossip"),
            is_trusted=self.trust.is_trusted, on_event=self._apply_event,
            on_events=self._apply_events,
        )
        self.peering.register("gossip", self.gossip.handle_channel)
        await self.gossip.start()
        self._closers.append(self.gossip.stop)
        self.watchers = []
        for label, folder in self.folders.items():
            watcher = FolderWatcher(folder, label, index_path=self.home / f"index-{label}.db",
                                    on_change=functools.partial(self._local_change, label),
                                    on_changes=functools.partial(self._local_changes, label))
            self.watchers.append(watcher)
            self._closers.append(watcher.stop)
            changes = await watcher.start(scan=True)
            log.info("sharing folder %s as %r (%d change(s) since last run)", folder, label,
                     len(changes))

    # -- glue between watchers, gossip, sync and transfers ------------------------------
    def label_for(self, peer: PeerId) -> str:
        """Folder name for a peer's files: the local alias, else its short id (never a
        name the peer chose itself, which another peer could copy)."""
        return self.trust.alias_of(peer) or peer.short

    async def _local_change(self, label: str, change: Any) -> None:
        await self.gossip.publish_local(change.kind, label, change.path, change.size,
                                        change.hash, change.old_path)

    async def _local_changes(self, label: str, changes: list[Any]) -> None:
        await self.gossip.publish_local_many(label, [
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

    def _resolve_shared(self, rel: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        """A peer fetches `<folder label>/<path>` from one of our shared folders."""
        from node.errors import ProtocolError
        from node.transfer.paths import resolve_under, safe_relpath

        try:
            relpath = safe_relpath(rel)
        except ProtocolError:
            return None
        folder = self.folders.get(relpath.parts[0]) if len(relpath.parts) > 1 else None
        if folder is None:
            return None
        try:
            target = resolve_under(folder, PurePosixPath(*relpath.parts[1:]))
        except (P2PError, OSError):
            return None
        if is_state_name(target.name):
            return None  # never served, even if it somehow got announced
        return (folder.parent, target) if target.is_file() else None

    async def _sync_fetch(self, origin: PeerId, folder: str, path: str, digest: bytes) -> Path:
        result = await self.sharing.fetch(origin, f"{folder}/{path}", None)
        final = result.files[0].path if result.files else None
        if final is None:
            raise P2PError(f"fetching {folder}/{path} from {origin.short} gave no file")
        return final

    async def _sync_fetch_many(self, origin: PeerId, folder: str,
                               items: list[tuple[str, bytes]]) -> dict[str, Any]:
        got = await self.sharing.fetch_many(origin, [f"{folder}/{path}" for path, _h in items])
        return {path: got.get(f"{folder}/{path}") for path, _h in items}

    async def _apply_events(self, events: list[Any]) -> None:
        """A batch of accepted events: content fetches go out together (SyncEngine)."""
        events = [e for e in events if e.kind != "shared"]  # one-off shares: see below
        for event, outcome in await self.sync.apply_batch(events):
            if isinstance(outcome, P2PError):
                log.warning("could not apply %s of %s/%s from %s: %s", event.kind,
                            event.folder, event.path, self.label_for(event.origin), outcome)
                self.events.notify("transfer_failed", {
                    "peer_id": str(event.origin), "peer": self.label_for(event.origin),
                    "paths": [f"{event.folder}/{event.path}"], "direction": "sync",
                    "error": str(outcome)})
            else:
                log.debug("applied %s %s/%s from %s: %s", event.kind, event.folder,
                          event.path, self.label_for(event.origin), outcome.value)

    async def _apply_event(self, event: Any) -> None:
        if event.kind == "shared":
            return  # a one-off share: the push carries the content, peers are only told
        try:
            outcome = await self.sync.apply(event)
            log.info("applied %s %s/%s from %s: %s", event.kind, event.folder, event.path,
                     self.label_for(event.origin), outcome.value)
        except P2PError as exc:
            log.warning("could not apply %s of %s/%s from %s: %s", event.kind, event.folder,
                        event.path, self.label_for(event.origin), exc)
            self.events.notify("transfer_failed", {
                "peer_id": str(event.origin), "peer": self.label_for(event.origin),
                "paths": [f"{event.folder}/{event.path}"], "direction": "sync",
                "error": str(exc)})

    def _gossip_peers(self) -> list[PeerId]:
        return [t.peer_id for t in self.trust.all() if self.book.get(t.peer_id) is not None]

    def _online_trusted(self) -> list[PeerId]:
        self._refresh_presence()
        out = []
        for pid, entry in self.book.entries().items():
            if self.trust.is_trusted(pid) and entry.to_json()["online"]:
                out.append(pid)
        return out

    def _refresh_presence(self) -> None:
        gossip = getattr(self, "gossip", None)
        if gossip is None:
            return
        online = gossip.online()
        for peer, seen in gossip.presence().items():
            self.book.mark_seen(peer, "gossip", now=seen)
            self.book.set_online(peer, "gossip", online.get(peer, False))

    async def stop(self) -> None:
        deadline = time.monotonic() + STOP_BUDGET_S
        if self._bootstrap_clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._unregister_all(), max(0.1, STOP_BUDGET_S / 3))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for close in reversed(self._closers):
            remaining = max(0.05, deadline - time.monotonic())
            try:
                await asyncio.wait_for(close(), remaining)
            except Exception as exc:  # noqa: BLE001 - stop must finish whatever a step raises
                log.warning("shutdown step %s did not finish cleanly: %r",
                            getattr(close, "__qualname__", close), exc)
        for client in self._bootstrap_clients:
            with contextlib.suppress(Exception):
                await client.close()
        if self.cache is not None:
            self.cache.close()
        self.trust.close()
        with contextlib.suppress(FileNotFoundError):
            (self.home / DAEMON_STATE_FILE).unlink()
        self._lock.release()
        log.info("stopped")

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)
        return task

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "peer_id": str(self.identity.peer_id),
            "name": self.identity.name,
            "ports": self.ports,
            "control_socket": str(self.control.path),
            "started_at": self.started_at,
        }
        write_private(self.home / DAEMON_STATE_FILE, json.dumps(state, indent=2).encode())

    async def _watch_trust(self) -> None:
        """`node untrust` runs in another process: notice it and close the peer's channels."""
        import sqlite3

        version = self.trust.data_version()
        trusted = self.trust.trusted_ids()
        while True:
            await asyncio.sleep(TRUST_WATCH_S)
            try:
                now = self.trust.data_version()
                if now == version:
                    continue
                current = self.trust.trusted_ids()
            except sqlite3.Error as exc:  # busy for a moment: check again next time
                log.debug("trust store not readable right now: %s", exc)
                continue
            version = now
            revoked, trusted = trusted - current, current
            await asyncio.gather(*(self.peering.revoke(peer) for peer in revoked))

    # ------------------------------------------------------------------ records
    def _new_record(self) -> ContactRecord:
        # milliseconds since the epoch: always higher than any record of an earlier run
        self._record_seq = max(self._record_seq + 1, int(time.time() * 1000))
        return ContactRecord.create(self.identity, [self.settings.advertised_host],
                                    self.ports, self._record_seq, ttl_s=RECORD_TTL_S)

    async def locate(self, peer: PeerId) -> ContactRecord | None:
        record = self.book.get(peer)
        if record is not None:
            return record
        if self.dht is not None:
            found = await self.dht.lookup(peer)
            if found is not None:
                self.book.add(found.record, "dht")
                return found.record
        return None

    # ------------------------------------------------------------------ discovery
    async def _dht_join(self) -> None:
        """Join the DHT from manual peers, the cache and bootstrap answers; republish."""
        manual = []
        for text in self.settings.bootstrap_peers:
            try:
                manual.append(parse_hostport(text))
            except P2PError as exc:
                log.warning("ignoring --bootstrap-peer: %s", exc)
        delay = 0.5
        while True:
            addrs = manual + self.cache.dht_addresses() + self._bootstrap_dht_addrs()
            if addrs:
                answered = await self.dht.bootstrap(addrs)
                if answered:
                    stored = await self.dht.set_record(self.record)
                    log.info("joined the DHT through %d contact(s); record stored on %d node(s)",
                             answered, stored)
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        await self._dht_discover_loop()

    async def _dht_discover_loop(self) -> None:
        """Learn the records of the DHT's routing-table contacts, so peers found only
        through the DHT (the bootstrap server gone, or never used) appear in `node peers`."""
        while True:
            known = {pid.dht_id for pid in self.book.entries()}
            unknown = [cid for cid, _ip, _port in self.dht.contact_ids() if cid not in known]
            for cid in unknown[:DHT_DISCOVER_BATCH]:
                with contextlib.suppress(P2PError, OSError, asyncio.TimeoutError):
                    found = await self.dht.lookup_id(cid)
                    if found is not None:
                        self.book.add(found.record, "dht")
            await asyncio.sleep(DHT_DISCOVER_S)

    def _bootstrap_dht_addrs(self) -> list[tuple[str, int]]:
        out = []
        for entry in self.book.entries().values():
            ep = entry.record.endpoint("dht")
            if ep is not None and "bootstrap" in entry.sources:
                out.append(ep)
        return out

    async def _register_loop(self, url: str) -> None:
        """Register (and re-register before the TTL) with one bootstrap server, and poll
        its online list in between so peers that joined after us show up quickly."""
        from bootstrap.client import BootstrapClient

        client = BootstrapClient(url)
        self._bootstrap_clients.append(client)
        backoff = 1.0
        registered_at = 0.0
        while True:
            try:
                assert self.record is not None
                if time.monotonic() - registered_at >= self.settings.register_interval_s:
                    records = await client.register(self.record)
                    registered_at = time.monotonic()
                else:
                    records = [e["record"] for e in await client.list_peers()
                               if e.get("record") is not None
                               and e["record"].peer_id != self.identity.peer_id]
                backoff = 1.0
                self._bootstrap_online(records)
                delay = min(PEER_POLL_S, self.settings.register_interval_s)
            except P2PError as exc:
                log.warning("%s; retrying in %.0f s", exc, backoff)
                self.book.forget_source("bootstrap")
                registered_at = 0.0
                delay = backoff
                backoff = min(backoff * 2, REGISTER_BACKOFF_MAX_S)
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))

    def _bootstrap_online(self, records: list[ContactRecord]) -> None:
        seen = {r.peer_id for r in records}
        for entry_id in list(self.book.entries()):
            self.book.set_online(entry_id, "bootstrap", entry_id in seen)
        for record in records:
            self.book.add(record, "bootstrap")
            self.book.set_online(record.peer_id, "bootstrap", True)

    async def _unregister_all(self) -> None:
        await asyncio.gather(*(c.unregister(self.identity) for c in self._bootstrap_clients),
                             return_exceptions=True)

    # ------------------------------------------------------------------ control API
    def resolve(self, text: str) -> PeerId:
        known: list[tuple[PeerId, list[str]]] = [
            (t.peer_id, [t.alias]) for t in self.trust.all()
        ]
        known += self.book.names()
        return resolve_peer(text, known)

    def _register_control(self) -> None:
        c = self.control
        c.register("status", self._cmd_status)
        c.register("peers", self._cmd_peers)
        c.register("lookup", self._cmd_lookup)
        c.register("ping", self._cmd_ping)
        c.register("resolve", self._cmd_resolve)
        c.register("stop", self._cmd_stop)
        c.register("share", self._cmd_share)
        c.register("transfers", self._cmd_transfers)
        c.register("cancel", self._cmd_cancel)
        c.register("log", self._cmd_log)
        c.register("events", self._cmd_events)

    async def _cmd_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {
            "peer_id": str(self.identity.peer_id),
            "name": self.identity.name,
            "fingerprint": self.identity.peer_id.fingerprint,
            "pid": os.getpid(),
            "home": str(self.home),
            "host": self.settings.advertised_host,
            "ports": self.ports,
            "uptime_s": time.time() - self.started_at,
            "bootstrap": list(self.settings.bootstrap),
            "peers_known": len(self.book.entries()),
            "trusted": len(self.trust.all()),
            "dht_contacts": len(self.dht.contacts()) if self.dht else 0,
            "gossip": self.gossip.stats() if getattr(self, "gossip", None) else {},
        }

    async def _cmd_peers(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        self._refresh_presence()
        out = []
        for pid, entry in sorted(self.book.entries().items(), key=lambda kv: kv[0].key):
            out.append(entry.to_json(alias=self.trust.alias_of(pid),
                                     trusted=self.trust.is_trusted(pid)))
        return out

    async def _cmd_lookup(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        peer = self._peer_arg(args)
        result = await self.dht.lookup(peer)
        if result is None:
            raise PeerUnreachable(f"no valid contact record for {peer.short} in the DHT")
        self.book.add(result.record, "dht")
        return {"record": result.record.to_json(), "hops": result.hops,
                "queries": result.queries, "elapsed_ms": result.elapsed_s * 1000}

    async def _cmd_ping(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        peer = self._peer_arg(args)
        count = int(args.get("count", 3))

        async def on_reply(seq: int, rtt_ms: float) -> None:
            await emit({"seq": seq, "rtt_ms": rtt_ms})

        return await self.peering.ping(peer, transport=args.get("transport") or
                                       self.settings.transport, count=max(1, min(count, 1000)),
                                       on_reply=on_reply)

    async def _cmd_resolve(self, args: dict[str, Any], emit: Emit) -> str:
        return str(self._peer_arg(args))

    async def _cmd_stop(self, args: dict[str, Any], emit: Emit) -> bool:
        asyncio.get_running_loop().call_later(0.05, self.request_stop)
        return True

    async def _cmd_share(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        paths = args.get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise P2PError("share needs at least one path")
        for p in paths:  # never push or announce the node's own home
            check_shared_root(Path(p), home=self.home, received=self.settings.received_path,
                              what="path", may_hold_received=True)
        to = [self.resolve(t) for t in args.get("to") or []]
        for peer in to:
            self.peering.authorize(peer)
        results = await self.sharing.share([Path(p) for p in paths], to or None,
                                           transport=args.get("transport"), emit=emit)
        if to:
            # shared with the named peers only: the push itself tells them, and a gossip
            # event would tell every trusted peer the path, size and hash
            return {"transfers": results, "announced": []}
        # hashing for the announcement costs ~1 s per GiB: do it after answering the CLI
        for p in paths:
            self._spawn(self._announce_share(Path(p)))
        return {"transfers": results, "announced": paths}

    async def _announce_share(self, path: Path) -> None:
        """Emit a signed "shared" event per file so every peer is notified (a share
        without --to, which went to every trusted peer online)."""
        from node.watcher import hash_file, shareable_files

        path = path.expanduser().resolve()
        # regular files only: never a symlink's target, a state file or an unsendable name
        for f, rel in await asyncio.to_thread(shareable_files, path, MAX_ANNOUNCED_FILES):
            try:
                size, _mtime, digest = await asyncio.to_thread(hash_file, f)
                await self.gossip.publish_local("shared", ONE_OFF_FOLDER, rel, size, digest)
            except (OSError, P2PError, ValueError) as exc:  # one bad file never ends the rest
                log.warning("could not announce shared file %s: %s", f, exc)

    async def _cmd_transfers(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        return self.sharing.list()

    async def _cmd_cancel(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        tid = args.get("id")
        if not isinstance(tid, str) or not tid:
            raise P2PError("cancel needs a transfer id")
        return self.sharing.cancel(tid)

    async def _cmd_log(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        from node.gossip.log import ms_from_text

        peer = self._peer_arg(args) if args.get("peer") else None
        since = args.get("since")
        since_ms = ms_from_text(since) if isinstance(since, str) and since else None
        glob = args.get("path") if isinstance(args.get("path"), str) else None
        limit = max(1, min(int(args.get("limit") or 1000), 10000))
        rows = []
        for ev in self.events.query(peer, since_ms, glob, limit):
            row = ev.summary()
            row["origin_label"] = ("me" if ev.origin == self.identity.peer_id
                                   else self.label_for(ev.origin))
            row["trusted"] = ev.origin == self.identity.peer_id or self.trust.is_trusted(
                ev.origin)
            rows.append(row)
        return rows

    async def _cmd_events(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        follow = bool(args.get("follow"))
        since = args.get("since")
        last = self.events.last_notification_id
        if not isinstance(since, int) or since < 0:
            since = max(0, last - (10 if follow else 100))
        sent = since
        while True:
            for note in self.events.notifications(sent, 1000):
                await emit(note.to_json())
                sent = note.id
            if not follow:
                return {"last_id": sent}
            await self.events.wait_for_notification(sent, timeout=30.0)

    def _peer_arg(self, args: dict[str, Any]) -> PeerId:
        text = args.get("peer")
        if not isinstance(text, str):
            raise UnknownPeer("no peer given")
        return self.resolve(text)


def received_folder(path: Path) -> Path:
    """The folder received files go to, created if missing."""
    from node.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the received folder {path} ({exc.strerror}); "
                          "set another with --received-dir (config key received_dir)") from None
    return path


def shared_folders(dirs: list[str]) -> dict[str, Path]:
    """Shared folder label (its directory name) -> path; labels must be unique."""
    from node.errors import ConfigError

    out: dict[str, Path] = {}
    for text in dirs:
        folder = Path(text).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"shared folder {folder} does not exist or is not a folder")
        label = folder.name
        if not label or label.startswith(".") or label == ONE_OFF_FOLDER:
            raise ConfigError(f"shared folder {folder} needs a plain name")
        if label in out:
            raise ConfigError(f"two shared folders are called {label!r} ({out[label]} and "
                              f"{folder}); rename one")
        out[label] = folder
    return out


def _async(fn: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        fn()

    return run


def run_daemon(settings: Settings) -> None:
    """Run the daemon in the foreground until SIGINT/SIGTERM (uvloop where it installs)."""
    daemon = Daemon(settings)
    try:
        import uvloop

        uvloop.run(daemon.run())
    except ImportError:
        asyncio.run(daemon.run())

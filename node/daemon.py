"""The node daemon: the composition root, the only module that knows every service.

Start order: lock the home dir -> identity -> trust store, peer cache, peer
book -> transports (listeners) -> DHT -> contact record -> discovery (DHT join,
bootstrap registration loops, LAN announcements; node/discovery/) -> transfers,
gossip, watchers -> control API. Stop runs in
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
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from node.config import Settings, absolute_paths, port_option
from node.contact import ContactRecord
from node.control import (
    NODE_STOPPING_MESSAGE,
    ControlServer,
    Emit,
    EventsPage,
    LogPage,
    socket_path_for,
)
from node.discovery import addresses
from node.discovery.bootstrap import BootstrapRegistration
from node.discovery.dht import DhtDiscovery
from node.discovery.lan import LanDiscovery, PeerSink, bind_host_for, parse_targets
from node.discovery.observed import ObservedAddresses
from node.discovery.record import REFRESH_CHECK_S, LocalRecord
from node.errors import (
    NodeAlreadyRunning,
    NodeNotRunning,
    P2PError,
    PeerUnreachable,
    PortUnavailable,
    UnknownPeer,
)
from node.identity import Identity, PeerId, load_identity
from node.peerbook import SHARE_TARGET_SEEN_S, PeerBook
from node.peering import Peering
from node.statefiles import (
    check_received_dir,
    check_shared_root,
    private_dir,
    write_private,
)
from node.trust import TrustStore, resolve_peer

log = logging.getLogger("p2pfs.daemon")

STOP_BUDGET_S = 1.5
DAEMON_STATE_FILE = "daemon.json"
# `node share` of a file outside the shared folders is announced under this folder label
ONE_OFF_FOLDER = "_shared"
MAX_ANNOUNCED_FILES = 1000
LOCK_FILE = "daemon.lock"
TRUST_WATCH_S = 0.2  # how often the trust store is checked for revocations (one PRAGMA)
# `node events` without --since shows the newest few; a page is at most EVENTS_PAGE_MAX
EVENTS_RECENT_DEFAULT = 100
EVENTS_FOLLOW_BACKLOG = 10
EVENTS_PAGE_DEFAULT = 1000
EVENTS_PAGE_MAX = 10_000
LOG_LIMIT_DEFAULT = 1000
LOG_LIMIT_MAX = 10_000


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
        self.local_record: LocalRecord | None = None
        self.observed = ObservedAddresses()
        self.lan: LanDiscovery | None = None
        self.registration: BootstrapRegistration | None = None
        self.discovery: DhtDiscovery | None = None
        self.trust = TrustStore.in_home(self.home)
        self.cache: Any = None
        self.book: PeerBook
        self.dht: Any = None
        self.peering: Peering
        self.control = ControlServer(socket_path_for(self.home))
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._trusted_seen: set[PeerId] = set()  # see _watch_trust
        self._stopping = False  # set as stop() begins: no service is started lazily after it
        # started on first use (a node with no folder, no pairing never imports them)
        self.folders: Any = None  # node/folders/engine.py FolderSync
        self._folder_engine_lock = asyncio.Lock()
        self._pairing: Any = None  # node/pairing/service.py PairingService
        self._oneshot: Any = None  # node/pairing/send.py OneShotService
        self._was_up = False  # "stopped" is logged only for a node that said "is up"

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self._shared_folders()  # refuse a bad --share before anything starts (or logs)
        try:
            await self.start()
            self._was_up = True
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
        self.shared = self._shared_folders()  # a bad --share fails before any bind
        self.folder_store = self._folder_store()  # so does a bad folders.json
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

        self._wire_discovery()
        self.peering.enable_punching(self._current_record)  # node/reach/puncher.py
        await self._start_services()
        self._register_control()
        await self.control.start()
        self._closers.append(self.control.close)
        await self._start_gui()
        assert self.discovery is not None and self.registration is not None
        self._spawn(self.discovery.run())
        self._spawn(self._watch_trust())
        self._spawn(self._refresh_record_loop())
        self._start_relay_reservations()
        for url in s.bootstrap:
            self._spawn(self.registration.run(url))
        await self._start_lan()
        self._write_state()

    @property
    def record(self) -> ContactRecord | None:
        return self.local_record.current if self.local_record is not None else None

    def _wire_discovery(self) -> None:
        s = self.settings
        self.local_record = LocalRecord(
            self.identity, ports=self.ports, observed=self.observed,
            hosts=lambda: addresses.advertised_hosts(s.listen_host, s.advertise_host,
                                                     addresses.interfaces()),
            relays=s.relays)
        current = self._current_record
        self.registration = BootstrapRegistration(
            self.identity, self.book, current, interval_s=s.register_interval_s,
            observed=self.observed, on_observed=self._observed_changed)
        self.discovery = DhtDiscovery(
            self.dht, self.book, current, manual_peers=list(s.bootstrap_peers),
            cache=self.cache, bootstrap_addrs=self.registration.dht_addrs,
            observed=self.observed, on_observed=self._observed_changed)
        self.local_record.on_change(self._record_changed)

    def _current_record(self) -> ContactRecord:
        assert self.local_record is not None
        return self.local_record.current

    def _observed_changed(self) -> None:
        assert self.local_record is not None
        self.local_record.refresh()

    def _record_changed(self, record: ContactRecord) -> None:
        """Our record was re-signed: tell the DHT, the bootstrap servers and the LAN."""
        assert self.discovery is not None and self.registration is not None
        self._spawn(self.discovery.publish(record))
        self.registration.reregister_soon()
        if self.lan is not None:
            self.lan.wake()

    async def _refresh_record_loop(self) -> None:
        assert self.local_record is not None
        while True:
            await asyncio.sleep(REFRESH_CHECK_S)
            self.local_record.refresh()

    async def _start_lan(self) -> None:
        """LAN discovery: on unless turned off, or useless (listening on loopback only
        with no explicit targets, as every testnet node does)."""
        s = self.settings
        if not s.lan_discovery:
            return
        targets = parse_targets(s.lan_announce_targets) if s.lan_announce_targets else None
        bind_host = bind_host_for(s.listen_host, targets)
        if bind_host is None:
            log.info("LAN discovery off: the node listens on %s only", s.listen_host)
            return
        sink = PeerSink(add=self._lan_add, seen=self._lan_seen,
                        gone=lambda pid: self.book.set_online(pid, "lan", False))
        lan = LanDiscovery(self.identity.peer_id, self._current_record, sink,
                           port=s.lan_discovery_port, bind_host=bind_host, targets=targets)
        try:
            port = await lan.start()
        except OSError as exc:
            log.warning("LAN discovery off: cannot bind UDP port %d (%s); set another with "
                        "lan_discovery_port", s.lan_discovery_port, exc.strerror or exc)
            return
        self.lan = lan
        self._closers.append(lan.stop)
        self._spawn(lan.run())
        log.info("LAN discovery on UDP port %d", port)

    def _lan_add(self, record: ContactRecord) -> None:
        self.book.add(record, "lan")
        self.book.set_online(record.peer_id, "lan", True)

    def _lan_seen(self, peer: PeerId) -> None:
        self.book.mark_seen(peer, "lan")
        self.book.set_online(peer, "lan", True)

    def _shared_folders(self) -> dict[str, Path]:
        """The --share folders, refused (ConfigError) when one would publish our own state."""
        folders = shared_folders(self.settings.shared_dirs)
        check_received_dir(self.settings.received_path, home=self.home)
        for folder in folders.values():
            check_shared_root(folder, home=self.home, received=self.settings.received_path)
        return folders

    def _folder_store(self) -> Any:
        from node.errors import ConfigError
        from node.folders.config import FolderConfigError, FolderStore

        try:
            return FolderStore.load(self.home)
        except FolderConfigError as exc:
            raise ConfigError(f"{exc}; fix or remove it, or use `node folder remove`") from None

    async def _start_services(self) -> None:
        """Event log, transfers, gossip, the --share mirror and the shared folders."""
        from node.folders.mirror_service import MirrorService
        from node.gossip.log import EventLog
        from node.gossip.service import GossipService
        from node.sharing import ShareService

        s = self.settings
        self.events = EventLog(self.home / "events.db")
        self._closers.append(_async(self.events.close))
        self.sharing = ShareService(
            self.peering, self.received, notify=self.events.emit, label_for=self.label_for,
            default_transport=s.transport, targets=self._online_trusted,
            resolve_for=self._resolve_for_peer,
        )
        self.gossip = GossipService(
            self.identity, self.events, peers=self._gossip_peers,
            open_channel=lambda peer: self.peering.connect(peer, "gossip"),
            is_trusted=self.trust.is_trusted, heartbeat_s=s.heartbeat_s,
        )
        self.mirror = MirrorService(
            self.shared, self.received, self_id=self.identity.peer_id, home=self.home,
            gossip=self.gossip, transfers=self.sharing, events=self.events,
            label_for=self.label_for)
        self._closers.append(_async(self.mirror.close))  # after gossip stops applying
        self.gossip.on_accepted(self.mirror.apply_event, self.mirror.apply_events)
        self.peering.register("gossip", self.gossip.handle_channel)
        await self.gossip.start()
        self._closers.append(self.gossip.stop)
        await self._start_folders()
        self._closers.append(self.mirror.stop)
        await self.mirror.start()  # watches the --share folders

    async def _start_folders(self) -> None:
        """Shared folders (node/folders): the engine every folder command talks to, started
        now when folders.json lists a folder, else at first use (``start_folder_engine``):
        a folder added, a "folders" channel from a peer, folders.json edited by hand."""
        from node.folders import SERVICE

        self._folder_stores: dict[Path, Any] = {}
        self.peering.register(SERVICE, self._folders_channel)
        if len(self.folder_store):
            await self.start_folder_engine()
        else:
            self._spawn(self._watch_folder_config())

    async def start_folder_engine(self) -> Any:
        """The folder engine, started if it is not running yet; None once the node stops."""
        async with self._folder_engine_lock:
            if self.folders is None and not self._stopping:
                from node.folders.engine import SERVICE, FolderSync

                engine = FolderSync(
                    self.identity, self.folder_store, self.home,
                    open_channel=lambda peer: self.peering.connect(peer, SERVICE),
                    fetch=self._folder_fetch, is_trusted=self.trust.is_trusted,
                    notify=self.events.emit, label_for=self.label_for)
                try:
                    await engine.start()
                except BaseException:
                    await engine.stop()
                    raise
                self._closers.append(engine.stop)
                self.folders = engine
        return self.folders

    async def _folders_channel(self, channel: Any) -> None:
        """A trusted peer opened a "folders" channel: the engine (started now if need be)
        serves it."""
        engine = await self.start_folder_engine()
        if engine is None:  # stopping
            await channel.close()
            return
        await engine.handle_channel(channel)

    async def _watch_folder_config(self) -> None:
        """No folder configured: start the engine once folders.json gains one by other means
        than a folder command (edited by hand); the engine then watches the file itself."""
        from node.folders import CONFIG_POLL_S
        from node.folders.config import FolderConfigError

        store = self.folder_store
        while self.folders is None:
            await asyncio.sleep(CONFIG_POLL_S)
            if not store.changed():
                continue
            try:
                store.reload()
                if len(store):
                    await self.start_folder_engine()
            except FolderConfigError as exc:
                log.warning("folders.json not applied: %s", exc)
            except (P2PError, OSError) as exc:
                log.warning("the folder engine did not start: %s", exc)

    async def _folder_fetch(self, peer: PeerId, paths: list[str], staging: Path,
                            seeds: list[Path]) -> dict[str, Any]:
        """Fetch folder files from `peer` into `staging` (one ReceiveStore per staging dir,
        so an interrupted fetch resumes from its partial file). `seeds` are the old
        versions, whose matching chunks the transfer layer copies instead of fetching."""
        from node.transfer.store import ReceiveStore

        store = self._folder_stores.get(staging)
        if store is None:
            store = self._folder_stores[staging] = ReceiveStore(staging)
        return await self.sharing.fetch_many(peer, paths, store=store, seeds=seeds)

    def _resolve_for_peer(self, peer: PeerId, rel: str, root_hash: bytes | None
                          ) -> tuple[Path, Path] | None:
        """What `peer` may fetch: a file of a folder shared with it, or of a --share."""
        from node.folders import FETCH_PREFIX

        if rel.startswith(FETCH_PREFIX + "/"):  # none without a running folder engine
            return self.folders.resolve_fetch(peer, rel) if self.folders is not None else None
        return self.mirror.resolve_fetch(rel, root_hash)

    @property
    def pairing(self) -> Any:
        """`node invite` / `node accept`: SPAKE2 codes through the bootstrap mailbox
        (node/pairing/service.py, built at its first use)."""
        if self._pairing is None:
            from node.pairing.service import PairingService

            self._pairing = PairingService(
                self.identity, self.trust, record=lambda: self.record,
                add_record=lambda record: self.book.add(record, "manual"),
                rendezvous=list(self.settings.bootstrap))
        return self._pairing

    @property
    def oneshot(self) -> Any:
        """`node send` / `node receive` (node/pairing/send.py, built at its first use; it
        then serves the "oneshot" channels itself)."""
        if self._oneshot is None:
            from node.pairing.send import OneShotService

            self._oneshot = OneShotService(
                self.pairing, self.peering, received_dir=self.settings.received_path,
                check_path=self._check_send_path, notify=self.events.emit)
        return self._oneshot

    def _register_pairing(self) -> None:
        """The pairing commands and the "oneshot" service, without loading node/pairing's
        services (nor spake2) before one is used."""
        from node.pairing import ONESHOT_COMMANDS, ONESHOT_SERVICE

        c = self.control
        c.register("invite", self._cmd_invite)
        c.register("accept", self._cmd_accept)
        for name in ONESHOT_COMMANDS:  # send, receive_offer, receive_accept
            c.register(name, functools.partial(self._cmd_oneshot, name))
        self.peering.register(ONESHOT_SERVICE, self._oneshot_channel)

    async def _cmd_oneshot(self, name: str, args: dict[str, Any], emit: Emit) -> Any:
        return await self.oneshot.commands()[name](args, emit)

    async def _oneshot_channel(self, channel: Any) -> None:
        """Only a peer granted "oneshot" by a live send (or a trusted one) gets here."""
        await self.oneshot.handle_channel(channel)

    def _check_send_path(self, path: Path, what: str) -> None:
        check_shared_root(path, home=self.home, received=self.settings.received_path,
                          what=what, may_hold_received=True)

    # -- names and presence shared by the services ------------------------------------
    def label_for(self, peer: PeerId) -> str:
        """Folder name for a peer's files: the local alias, else its short id (never a
        name the peer chose itself, which another peer could copy)."""
        return self.trust.alias_of(peer) or peer.short

    def _gossip_peers(self) -> list[PeerId]:
        return [t.peer_id for t in self.trust.all() if self.book.get(t.peer_id) is not None]

    def _online_trusted(self) -> list[PeerId]:
        self._refresh_presence()
        out = []
        for pid, entry in self.book.entries().items():
            if self.trust.is_trusted(pid) and entry.seen_within(SHARE_TARGET_SEEN_S):
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
        self._stopping = True
        deadline = time.monotonic() + STOP_BUDGET_S
        if self.registration is not None and self.registration.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.registration.unregister_all(),
                                       max(0.1, STOP_BUDGET_S / 3))
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
        if self.registration is not None:
            await self.registration.close()
        if self.cache is not None:
            self.cache.close()
        self.trust.close()
        with contextlib.suppress(FileNotFoundError):
            (self.home / DAEMON_STATE_FILE).unlink()
        self._lock.release()
        if self._was_up:
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
        # what the last check saw; the dashboard's trust/untrust (our own connection, so
        # no data_version change) keep it current too
        self._trusted_seen = self.trust.trusted_ids()
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
            revoked, self._trusted_seen = self._trusted_seen - current, current
            await asyncio.gather(*(self.peering.revoke(peer) for peer in revoked))

    def _start_relay_reservations(self) -> None:
        from node.reach.relay_client import RelayReservation

        self.reservations = [RelayReservation(self.identity, addr, self.peering.accept_pipe)
                             for addr in self.settings.relays]
        for reservation in self.reservations:
            self._spawn(reservation.run())

    async def locate(self, peer: PeerId) -> ContactRecord | None:
        if self.discovery is None:
            return self.book.get(peer)
        return await self.discovery.locate(peer)

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
        c.register("punch", lambda args, emit: self.peering.punch_now(self._peer_arg(args)))
        c.register("resolve", self._cmd_resolve)
        c.register("stop", self._cmd_stop)
        c.register("share", self._cmd_share)
        c.register("transfers", self._cmd_transfers)
        c.register("cancel", self._cmd_cancel)
        c.register("log", self._cmd_log)
        c.register("events", self._cmd_events)
        self._register_pairing()  # invite, accept, send, receive_offer, receive_accept
        from node.folders.commands import register as register_folder_commands

        register_folder_commands(self)  # folder_add, folder_list, ... (node/folders)

    async def _cmd_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {
            "peer_id": str(self.identity.peer_id),
            "name": self.identity.name,
            "fingerprint": self.identity.peer_id.fingerprint,
            "pid": os.getpid(),
            "home": str(self.home),
            "host": self.settings.advertised_host,
            "hosts": list(self.record.hosts) if self.record else [],
            "observed": [o.to_json() for o in self.observed.observations(time.time())],
            "advertised_observed": ([f"{svc} {h}:{p}" for svc, h, p in self.record.observed]
                                    if self.record else []),
            "lan_discovery": self.lan.status() if self.lan else {"enabled": False},
            "ports": self.ports,
            "uptime_s": time.time() - self.started_at,
            "bootstrap": list(self.settings.bootstrap),
            "peers_known": len(self.book.entries()),
            "trusted": len(self.trust.all()),
            "dht_contacts": len(self.dht.contacts()) if self.dht else 0,
            "gossip": self.gossip.stats() if getattr(self, "gossip", None) else {},
            "relays": [r.status() for r in getattr(self, "reservations", [])],
            "punch": self.peering.puncher.status() if self.peering.puncher else {},
        }

    async def _cmd_peers(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        self._refresh_presence()
        out = []
        for pid, entry in sorted(self.book.entries().items(), key=lambda kv: kv[0].key):
            # how the open channels reach the peer (node/reach): direct / relayed
            paths = sorted({ch.path for ch, _ in self.peering.open_channels(pid)})
            row = entry.to_json(alias=self.trust.alias_of(pid),
                                trusted=self.trust.is_trusted(pid), live=bool(paths))
            added = self.trust.get(pid)
            row["added_via"] = added.added_via if added is not None else ""
            row["paths"] = paths
            out.append(row)
        return out

    async def _cmd_invite(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        from node.pairing.service import parse_ttl

        return await self.pairing.invite(
            alias=_text_arg(args, "name"), ttl_s=parse_ttl(args.get("expires_s")),
            rendezvous=_text_arg(args, "rendezvous") or None, emit=emit)

    async def _cmd_accept(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.pairing.accept(
            _text_arg(args, "code"), alias=_text_arg(args, "name"),
            rendezvous=_text_arg(args, "rendezvous") or None, emit=emit)

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

    async def _cmd_log(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        from node.gossip.log import ms_from_text

        peer = self._peer_arg(args) if args.get("peer") else None
        since = args.get("since")
        since_ms = ms_from_text(since) if isinstance(since, str) and since else None
        glob = args.get("path") if isinstance(args.get("path"), str) else None
        limit = max(1, min(int(args.get("limit") or LOG_LIMIT_DEFAULT), LOG_LIMIT_MAX))
        events, total = self.events.query_page(peer, since_ms, glob, limit)
        rows = []
        for ev in events:
            row = ev.summary()
            row["origin_label"] = self.peer_label(str(ev.origin))
            row["trusted"] = ev.origin == self.identity.peer_id or self.trust.is_trusted(
                ev.origin)
            rows.append(row)
        # the newest `limit` are shown: what was cut is older
        return LogPage(rows, total, limit, LOG_LIMIT_MAX).to_json()

    def peer_label(self, peer_id: str) -> str:
        """The one label a peer gets in notifications and the log: "me", its alias, or
        its short id (the same name its received folder has)."""
        try:
            pid = PeerId.parse(peer_id)
        except P2PError:
            return peer_id[:7]
        return "me" if pid == self.identity.peer_id else self.label_for(pid)

    def _note_json(self, note: Any) -> dict[str, Any]:
        from node.errors import ProtocolError
        from node.notifications import decode

        out: dict[str, Any] = note.to_json()
        try:
            peers = decode(note.kind, note.data).peers()
        except ProtocolError:
            peers = ()
        out["labels"] = {p: self.peer_label(p) for p in peers}
        return out

    async def _cmd_events(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        follow = bool(args.get("follow"))
        since = args.get("since")
        limit = args.get("limit")
        limit = max(1, min(limit if isinstance(limit, int) else EVENTS_PAGE_DEFAULT,
                           EVENTS_PAGE_MAX))
        last = self.events.last_notification_id
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            since = max(0, last - (EVENTS_FOLLOW_BACKLOG if follow else EVENTS_RECENT_DEFAULT))
        older = self.events.count_notifications(0) - self.events.count_notifications(since)
        sent = since
        shown = 0
        while True:
            batch = self.events.notifications(sent, EVENTS_PAGE_MAX if follow
                                              else min(EVENTS_PAGE_MAX, limit - shown))
            for note in batch:
                await emit(self._note_json(note))
                sent = note.id
                shown += 1
            if not follow:
                return EventsPage(sent, shown, older,
                                  self.events.count_notifications(sent)).to_json()
            if self._stop.is_set():
                raise NodeNotRunning(NODE_STOPPING_MESSAGE)
            await self.events.wait_for_notification(sent, timeout=30.0)

    def _peer_arg(self, args: dict[str, Any]) -> PeerId:
        text = args.get("peer")
        if not isinstance(text, str):
            raise UnknownPeer("no peer given")
        return self.resolve(text)

    # ------------------------------------------------------------------ dashboard
    async def _start_gui(self) -> None:
        """The commands only the dashboard uses so far, and the dashboard itself
        (node/gui), which drives the node through `self.control.dispatch` alone."""
        c = self.control
        c.register("gui", self._cmd_gui)
        c.register("folders", self._cmd_folders)
        c.register("trust", self._cmd_trust)
        c.register("untrust", self._cmd_untrust)
        self.gui: Any = None
        s = self.settings
        if not s.gui_port:
            return
        # binds the port now, loads the dashboard's server (aiohttp) at its first visitor
        from node.gui.lazy import LazyGui

        gui = LazyGui(c.dispatch, home=self.home, host=s.gui_host, port=s.gui_port,
                      commands=c.commands)
        try:
            await gui.start()
        except PortUnavailable as exc:
            raise exc.naming(port_option("gui", bad_address=exc.bad_address)) from None
        self._closers.append(gui.stop)
        self.gui = gui

    async def _cmd_gui(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if self.gui is None:
            from node.errors import ConfigError

            raise ConfigError("the dashboard is off (gui_port = 0); start the node with "
                              "--gui-port P (config key gui_port)")
        return dict(self.gui.info())

    async def _cmd_folders(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        """The --share folders: one-way, send-only, watched (no pause or rescan yet)."""
        mirror = getattr(self, "mirror", None)
        return mirror.folders_json() if mirror is not None else []

    async def _cmd_trust(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`node trust` for the dashboard, through the daemon's own store connection: a
        second connection to trust.db in this process would be unsafe (closing any fd of
        a database file drops this process's POSIX locks on it, and another process may
        then delete the WAL under us: "database disk image is malformed")."""
        peer = self._peer_arg(args)
        if peer == self.identity.peer_id:
            raise UnknownPeer("that is this node's own id")
        name = args.get("name") or ""
        if not isinstance(name, str):
            raise UnknownPeer("an alias must be a string")
        entry = self.trust.trust(peer, name)
        self._trusted_seen.add(peer)
        return entry.to_json()

    async def _cmd_untrust(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`node untrust`: the peer's open channels close now (as `_watch_trust` does for
        an untrust from another process)."""
        peer = self._peer_arg(args)
        if not self.trust.untrust(peer):
            raise UnknownPeer(f"{peer.short} was not trusted")
        self._trusted_seen.discard(peer)
        await self.peering.revoke(peer)
        return {"peer_id": str(peer), "trusted": False}


def _text_arg(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise P2PError(f"{key} must be text")
    return value


def received_folder(path: Path) -> Path:
    """The folder received files go to, created if missing."""
    from node.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the received folder {path} ({exc.strerror}); "
                          "set another with --received-dir (config key received_dir)") from None
    if not os.access(path, os.W_OK | os.X_OK):  # also when started without the CLI
        raise ConfigError(f"the received folder {path} is not writable; set another with "
                          "--received-dir (config key received_dir)")
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
    from node.daemon_main import prepare_quic

    prepare_quic(settings.home, create=False)  # QUIC serves the home's cert pair
    daemon = Daemon(settings)
    try:
        import uvloop

        uvloop.run(daemon.run())
    except ImportError:
        asyncio.run(daemon.run())

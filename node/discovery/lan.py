"""LAN discovery: signed contact records announced by UDP broadcast and multicast.

Modelled on Syncthing's local discovery (lib/discover/local.go): every node
announces itself on start and every ANNOUNCE_INTERVAL_S (30 s) to the directed
broadcast address of each IPv4 interface and to the multicast group
MULTICAST_GROUP, on DEFAULT_PORT (21029, config ``lan_discovery_port``). A
listener keeps what it heard for CACHE_LIFETIME_S (90 s). An announcement
carries a random instance id chosen at start: hearing a peer's new instance
(a peer that just started or restarted) makes us announce at once, so two
nodes find each other within a second instead of 30 s.

Packet: ``MAGIC || msgpack [VERSION, instance_id(8 bytes), contact record wire list]``,
at most MAX_PACKET_BYTES. Anyone on the LAN can send one, so:

* oversize, malformed, wrong-version packets and our own are dropped before any
  signature check; processing is capped at PACKETS_PER_S (token bucket);
* a packet byte-identical to the cached one only refreshes ``last_seen``;
* a record older than (or as old as) the cached one is stale and dropped;
* signatures are verified at most VERIFY_PER_S times a second (token bucket);
* at most MAX_CACHE_ENTRIES peers are cached; when full, new peers wait.

``LanCache`` is the pure part (bytes and ``now`` in, outcomes out);
``LanDiscovery`` is the asyncio driver that owns the socket. Tests set
explicit unicast ``targets`` on 127.0.0.1 instead of broadcast/multicast.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.contact import MAX_RECORD_BYTES, ContactRecord
from node.discovery.addresses import ANY_V4, Interface, interfaces, is_wildcard
from node.errors import ProtocolError
from node.identity import PeerId
from node.wire import packb, unpackb

log = logging.getLogger("p2pfs.discovery.lan")

MAGIC = b"p2pfsLAN"
VERSION = 1
DEFAULT_PORT = 21029
# administratively scoped (RFC 2365, organisation-local 239.192.0.0/14)
MULTICAST_GROUP = "239.192.21.29"
MULTICAST_TTL = 1
ANNOUNCE_INTERVAL_S = 30.0
CACHE_LIFETIME_S = 90.0
INSTANCE_ID_BYTES = 8
MAX_PACKET_BYTES = len(MAGIC) + MAX_RECORD_BYTES + 32
PACKETS_PER_S = 1000.0
PACKET_BURST = 2000.0
VERIFY_PER_S = 50.0
VERIFY_BURST = 100.0
MAX_CACHE_ENTRIES = 256
# a new instance makes us announce at once, but not more often than this
FORCED_ANNOUNCE_GAP_S = 1.0


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # a new peer, a newer record or a new instance: into the book
    REFRESHED = "refreshed"  # the same announcement again: last_seen only
    OWN = "own"
    MALFORMED = "malformed"
    STALE = "stale"
    INVALID = "invalid"  # bad signature, expired, from the future
    RATE_LIMITED = "rate_limited"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Announcement:
    instance_id: bytes
    record: ContactRecord


def encode_announcement(record: ContactRecord, instance_id: bytes) -> bytes:
    data = MAGIC + packb([VERSION, instance_id, record.to_wire()])
    if len(data) > MAX_PACKET_BYTES:
        raise ProtocolError(f"LAN announcement of {len(data)} bytes exceeds {MAX_PACKET_BYTES}")
    return data


def decode_announcement(data: bytes) -> Announcement:
    """Parse (not verify) an announcement; ProtocolError on anything malformed."""
    if len(data) > MAX_PACKET_BYTES:
        raise ProtocolError("LAN announcement too large")
    if not data.startswith(MAGIC):
        raise ProtocolError("not a p2pfs LAN announcement")
    body = unpackb(data[len(MAGIC):], max_bytes=MAX_PACKET_BYTES)
    if not isinstance(body, list) or len(body) != 3:
        raise ProtocolError("a LAN announcement is [version, instance id, record]")
    version, instance_id, record = body
    if version != VERSION:
        raise ProtocolError(f"unknown LAN announcement version {version!r}")
    if not isinstance(instance_id, bytes) or len(instance_id) != INSTANCE_ID_BYTES:
        raise ProtocolError("bad instance id")
    return Announcement(instance_id, ContactRecord.from_wire(record))


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass(slots=True)
class LanEntry:
    record: ContactRecord
    instance_id: bytes
    packet: bytes
    last_seen: float


@dataclass(frozen=True, slots=True)
class Received:
    outcome: Outcome
    record: ContactRecord | None = None
    new_instance: bool = False


class LanCache:
    """What this node heard on the LAN; pure (``now`` in, outcomes out)."""

    def __init__(self, self_id: PeerId, now: float, *, lifetime_s: float = CACHE_LIFETIME_S,
                 max_entries: int = MAX_CACHE_ENTRIES, verify_per_s: float = VERIFY_PER_S,
                 verify_burst: float = VERIFY_BURST, packets_per_s: float = PACKETS_PER_S,
                 packet_burst: float = PACKET_BURST, wall: Callable[[], float] = time.time
                 ) -> None:
        self.self_id = self_id
        self.lifetime_s = lifetime_s
        self.max_entries = max_entries
        self._entries: dict[PeerId, LanEntry] = {}
        self._packets = TokenBucket(packets_per_s, packet_burst, now)
        self._verifies = TokenBucket(verify_per_s, verify_burst, now)
        self._wall = wall
        self.stats: dict[str, int] = {o.value: 0 for o in Outcome}

    def _out(self, outcome: Outcome, record: ContactRecord | None = None,
             new_instance: bool = False) -> Received:
        self.stats[outcome.value] += 1
        return Received(outcome, record, new_instance)

    def receive(self, data: bytes, now: float) -> Received:
        if not self._packets.take(now):
            return self._out(Outcome.RATE_LIMITED)
        try:
            ann = decode_announcement(data)
        except ProtocolError:
            return self._out(Outcome.MALFORMED)
        record = ann.record
        if record.peer_id == self.self_id:
            return self._out(Outcome.OWN)
        entry = self._entries.get(record.peer_id)
        if entry is not None and entry.packet == data:
            entry.last_seen = now
            return self._out(Outcome.REFRESHED, entry.record)
        if entry is not None and record.seq <= entry.record.seq:
            return self._out(Outcome.STALE)
        if entry is None and len(self._entries) >= self.max_entries:
            self.expire(now)
            if len(self._entries) >= self.max_entries:
                return self._out(Outcome.FULL)
        if not self._verifies.take(now):
            return self._out(Outcome.RATE_LIMITED)
        try:
            record.verify(self._wall())
        except ProtocolError:
            return self._out(Outcome.INVALID)
        new_instance = entry is None or entry.instance_id != ann.instance_id
        self._entries[record.peer_id] = LanEntry(record, ann.instance_id, data, now)
        return self._out(Outcome.ACCEPTED, record, new_instance)

    def expire(self, now: float) -> list[PeerId]:
        gone = [pid for pid, e in self._entries.items() if now - e.last_seen > self.lifetime_s]
        for pid in gone:
            del self._entries[pid]
        return gone

    def entries(self) -> dict[PeerId, LanEntry]:
        return dict(self._entries)


class PeerSink:
    """Where LAN-learned peers go (the peer book, wrapped by the daemon)."""

    def __init__(self, add: Callable[[ContactRecord], Any], seen: Callable[[PeerId], Any],
                 gone: Callable[[PeerId], Any]) -> None:
        self.add, self.seen, self.gone = add, seen, gone


def parse_targets(texts: list[str]) -> list[tuple[str, int]]:
    from node.discovery.dht import parse_hostport

    return [parse_hostport(t) for t in texts]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host_for(listen_host: str, targets: list[tuple[str, int]] | None) -> str | None:
    """Where the LAN socket binds, or None when LAN discovery is useless: listening on
    loopback only (the default, and every testnet node) with no explicit targets, no
    peer on the LAN could reach us. Broadcast and multicast arrive only on a socket
    bound to the wildcard; explicit targets bind the listen host."""
    if targets is None:
        return None if _is_loopback(listen_host) else ANY_V4
    return ANY_V4 if is_wildcard(listen_host) else listen_host


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: LanDiscovery) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("LAN discovery socket error: %s", exc)


class LanDiscovery:
    """Announce our record on the LAN and feed what we hear into the peer book."""

    def __init__(self, self_id: PeerId, record: Callable[[], ContactRecord], sink: PeerSink, *,
                 port: int = DEFAULT_PORT, bind_host: str = ANY_V4,
                 targets: list[tuple[str, int]] | None = None,
                 ifaces: Callable[[], list[Interface]] = interfaces,
                 interval_s: float = ANNOUNCE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record = record
        self.sink = sink
        self.port = port
        self.bind_host = bind_host
        self.targets = targets  # None: broadcast + multicast on every IPv4 interface
        self._ifaces = ifaces
        self.interval_s = interval_s
        self._clock = clock
        self.instance_id = os.urandom(INSTANCE_ID_BYTES)
        self.cache = LanCache(self_id, clock())
        self.announcements_sent = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._wake = asyncio.Event()
        self._last_forced = -FORCED_ANNOUNCE_GAP_S

    # -- socket ------------------------------------------------------------------
    async def start(self) -> int:
        """Bind the announcement port (shared with other nodes on this host: SO_REUSEPORT);
        returns the bound port. Raises OSError when it cannot bind."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
            sock.setblocking(False)
            sock.bind((self.bind_host, self.port))
            if self.targets is None:
                self._join_group(sock)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport
        self._sock = sock
        self.port = sock.getsockname()[1]
        return self.port

    def _lan_ifaces(self) -> list[Interface]:
        return [i for i in self._ifaces() if i.ip.version == 4 and not i.ip.is_loopback]

    def _join_group(self, sock: socket.socket) -> None:
        group = socket.inet_aton(MULTICAST_GROUP)
        for iface in self._lan_ifaces():
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                group + socket.inet_aton(iface.address))
            except OSError as exc:  # already joined through another address, or no multicast
                log.debug("cannot join %s on %s: %s", MULTICAST_GROUP, iface.name, exc)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- announcing ----------------------------------------------------------------
    def destinations(self) -> list[tuple[str | None, tuple[str, int]]]:
        """(outgoing interface address for multicast or None, destination) pairs."""
        if self.targets is not None:
            return [(None, t) for t in self.targets]
        out: list[tuple[str | None, tuple[str, int]]] = []
        for iface in self._lan_ifaces():
            if iface.broadcast is not None:
                out.append((None, (iface.broadcast, self.port)))
            out.append((iface.address, (MULTICAST_GROUP, self.port)))
        return out

    def announce(self) -> int:
        """Send our announcement to every destination now; returns how many went out."""
        if self._transport is None or self._sock is None:
            return 0
        data = encode_announcement(self.record(), self.instance_id)
        sent = 0
        for via, dest in self.destinations():
            try:
                if via is not None:
                    self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                          socket.inet_aton(via))
                self._transport.sendto(data, dest)
                sent += 1
            except OSError as exc:
                log.debug("LAN announcement to %s failed: %s", dest, exc)
        self.announcements_sent += 1
        return sent

    def wake(self) -> None:
        """Announce now (our record changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Announce at once, then every interval, or at once when a new instance appears."""
        while True:
            self.announce()
            for pid in self.cache.expire(self._clock()):
                self.sink.gone(pid)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass

    # -- hearing -------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = self._clock()
        got = self.cache.receive(data, now)
        if got.outcome is Outcome.ACCEPTED and got.record is not None:
            (log.info if got.new_instance else log.debug)(
                "LAN: heard %s (%s) from %s, instance %s", got.record.peer_id.short,
                got.record.name or "unnamed", addr[0], self.cache.entries()[
                    got.record.peer_id].instance_id.hex())
            self.sink.add(got.record)
            if got.new_instance and now - self._last_forced >= FORCED_ANNOUNCE_GAP_S:
                self._last_forced = now
                self._wake.set()
        elif got.outcome is Outcome.REFRESHED and got.record is not None:
            self.sink.seen(got.record.peer_id)

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "port": self.port,
                "targets": ([f"{h}:{p}" for h, p in self.targets] if self.targets is not None
                            else [f"{h}:{p}" for _v, (h, p) in self.destinations()]),
                "peers": len(self.cache.entries()), "announcements_sent": self.announcements_sent,
                "received": dict(self.cache.stats)}

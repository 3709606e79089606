"""The peer book: everything this node knows about other peers, and from where.

Knowledge comes from the bootstrap server's answers, DHT lookups, LAN announcements, the
persistent peer cache (dht/peercache.py) and gossip presence heartbeats. Each
entry keeps the newest verified contact record, the set of sources and when
the peer was last seen. ``node peers`` shows this union with a source column.

Only verified ContactRecords enter the book; presence marks only update
``last_seen`` of peers already known.

*Online* means heard from the peer itself, now: an open channel to it, or a live
presence source: its signed gossip heartbeat arrived within the presence timeout
(3 x ``heartbeat_s``, 15 s by default; the gossip engine times it out), or its LAN
announcements are current. A sighting second-hand (a bootstrap listing, a DHT
lookup, the peer cache) only updates ``last_seen``: the bootstrap server lists a
peer until its registration expires, minutes after the peer stopped, so it
proves nothing about now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import PeerId

SOURCES = ("bootstrap", "dht", "lan", "cache", "gossip", "manual")
# the sources whose online mark is the peer's own voice, now: its gossip heartbeats and
# its LAN announcements. A bootstrap listing marks peers online too, but only says the
# server still holds the registration (up to its TTL after the peer stopped)
PRESENCE_SOURCES = frozenset({"gossip", "lan"})
# a trusted peer seen (anywhere) this recently is still a target of `node share` without
# --to: a peer just started may not have sent its first heartbeat yet, and a send to a
# peer that is gone fails with a clear "peer offline"
SHARE_TARGET_SEEN_S = 300.0


class RecordCache(Protocol):
    def add(self, record: ContactRecord, source: str) -> bool: ...

    def records(self) -> list[tuple[ContactRecord, str, float]]: ...


@dataclass
class PeerEntry:
    record: ContactRecord
    sources: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    online_sources: set[str] = field(default_factory=set)

    def is_online(self, *, live: bool = False) -> bool:
        """Heard from the peer itself, now: ``live`` (an open channel), or a presence
        source that has not timed out (gossip heartbeat, LAN announcements)."""
        return live or not self.online_sources.isdisjoint(PRESENCE_SOURCES)

    def seen_within(self, seconds: float, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return bool(self.online_sources) or now - self.last_seen < seconds

    def to_json(self, alias: str = "", trusted: bool = False, *,
                live: bool = False) -> dict[str, Any]:
        r = self.record
        return {
            "peer_id": str(r.peer_id),
            "short_id": r.peer_id.short,
            "name": r.name,
            "alias": alias,
            "trusted": trusted,
            "hosts": list(r.hosts),
            "ports": dict(r.ports),
            "transports": [t for t in ("tcp", "udp", "quic") if t in r.ports],
            "seq": r.seq,
            "last_seen": self.last_seen,
            "online": self.is_online(live=live),
            "source": ",".join(s for s in SOURCES if s in self.sources),
        }


class PeerBook:
    def __init__(self, self_id: PeerId, cache: RecordCache | None = None) -> None:
        self.self_id = self_id
        self._entries: dict[PeerId, PeerEntry] = {}
        self._cache = cache
        if cache is not None:
            for record, _source, last_seen in cache.records():
                self._add(record, "cache", last_seen, persist=False)

    def add(self, record: ContactRecord, source: str, *, now: float | None = None) -> bool:
        """Add a record after verifying it; returns True if it is new or newer."""
        try:
            record.verify(now)
        except ProtocolError:
            return False
        return self._add(record, source, time.time() if now is None else now, persist=True)

    def _add(self, record: ContactRecord, source: str, seen: float, *, persist: bool) -> bool:
        if record.peer_id == self.self_id:
            return False
        entry = self._entries.get(record.peer_id)
        newer = entry is None or record.seq > entry.record.seq
        if entry is None:
            entry = self._entries[record.peer_id] = PeerEntry(record)
        elif newer:
            entry.record = record
        entry.sources.add(source)
        entry.last_seen = max(entry.last_seen, seen)
        if persist and self._cache is not None:
            self._cache.add(record, source)
        return newer

    def mark_seen(self, peer: PeerId, source: str, *, now: float | None = None) -> None:
        entry = self._entries.get(peer)
        if entry is not None:
            entry.sources.add(source)
            entry.last_seen = max(entry.last_seen, time.time() if now is None else now)

    def set_online(self, peer: PeerId, source: str, online: bool) -> None:
        entry = self._entries.get(peer)
        if entry is not None:
            (entry.online_sources.add if online else entry.online_sources.discard)(source)

    def forget_source(self, source: str) -> None:
        for entry in self._entries.values():
            entry.online_sources.discard(source)

    def get(self, peer: PeerId) -> ContactRecord | None:
        entry = self._entries.get(peer)
        if entry is None or entry.record.is_expired():
            return None
        return entry.record

    def entries(self) -> dict[PeerId, PeerEntry]:
        return dict(self._entries)

    def names(self) -> list[tuple[PeerId, list[str]]]:
        return [(pid, [e.record.name]) for pid, e in self._entries.items()]

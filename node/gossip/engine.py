"""Gossip dissemination engine: push with fanout, anti-entropy pull, presence. Sans-IO.

Bytes from a peer go in with ``receive(peer, data, now)``; local events with
``publish(event, now)`` and ``publish_heartbeat(hb, now)``; time with
``tick(now)``. What to do comes out as a list of actions: ``Send(peer, msg)``,
``Accept(event, trusted, via)``, ``Reject(...)``, ``PresenceChanged(...)``.
The engine owns no socket, no clock and no randomness of its own (``rand`` is
injected), so tests drive N engines in memory with simulated loss, exactly.

It does read and write the event store it is given (``EventLog``, which may
be an in-memory SQLite): the store is the source of truth for "do I have this
event" and for anti-entropy digests.

Protocol (all node.wire messages, every field bounded):

* ``Push(events)``: a new event, sent by its origin to ``origin_fanout``
  random peers (default 32, so every peer of a small network gets it in one
  hop), and by every node that accepts it for the first time to ``fanout``
  (default 6) random peers (excluding the peer it came from and the origin).
  De-duplicated by event id (bounded seen-set).
* ``Digest(origins, reply)``: per-origin contiguous highest seq. The receiver
  answers ``Events(batch, more)`` with what the sender lacks (oldest first,
  bounded batch); with ``reply`` it also sends its own digest back, so one
  exchange repairs both sides. ``more`` asks the puller to send another digest,
  repeated until caught up. A push that reveals a gap (seq n+2 while we hold
  up to n) triggers an immediate pull from that peer (rate-limited).
* ``Beat(heartbeat)``: signed presence, sent by each node straight to its peers
  every heartbeat period and not relayed (newest wall_ms per origin wins); a
  peer unheard for ``presence_timeout_s`` is reported offline.

Validation: a bad signature, a reused (origin, seq) with a different id and any
malformed/oversize field produce ``Reject`` and are never stored or relayed.
Events from untrusted origins are stored relay-only and relayed (anyone may
relay signed events) but reported with ``trusted=False``, so nobody acts on them.
The store keeps them within caps (per origin, in total, origins tracked; see
node/gossip/log.py ``RELAY_ONLY_*``) and advertises a high-water mark for them
in digests, so what the caps pruned is never pulled again; an ``Events`` batch
is followed up ("more") only while it brings trusted events, and untrusted
events are pushed onward at most ``RELAY_ONLY_PUSH_PER_S`` (token bucket).

Imports node.gossip.events, node.gossip.log, node.wire, node.identity and
node.errors; it must not import asyncio, sockets, the service or transports.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.hash
from nacl.encoding import RawEncoder

from node.errors import ProtocolError
from node.gossip.events import MAX_EVENT_BYTES, MAX_HEARTBEAT_BYTES, ChangeEvent, Heartbeat
from node.gossip.log import MISSING_BATCH_MAX, AddOutcome, EventLog
from node.identity import PeerId
from node.wire import Message, bound, decode_message, message

PUSH_BATCH_MAX = 64
DIGEST_ORIGINS_MAX = 4096
SEEN_MAX = 100_000
GAP_PULL_MIN_INTERVAL_S = 0.5
DEFAULT_ANTI_ENTROPY_S = 2.0
DEFAULT_PRESENCE_TIMEOUT_S = 15.0


@message("gossip.push")
class Push(Message):
    events: tuple[bytes, ...] = field(metadata=bound(max_len=PUSH_BATCH_MAX))

    def validate(self) -> None:
        _check_blobs(self.events, MAX_EVENT_BYTES, "push")


@message("gossip.digest")
class Digest(Message):
    origins: tuple[tuple[bytes, int], ...] = field(metadata=bound(max_len=DIGEST_ORIGINS_MAX))
    reply: bool

    def validate(self) -> None:
        for item in self.origins:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not isinstance(item[0], bytes) or len(item[0]) != 32
                    or type(item[1]) is not int or not 0 <= item[1] < 2**63):
                raise ProtocolError("digest: bad (origin, seq) entry")

    def as_dict(self) -> dict[bytes, int]:
        return {bytes(k): int(v) for k, v in self.origins}


@message("gossip.events")
class Events(Message):
    events: tuple[bytes, ...] = field(metadata=bound(max_len=MISSING_BATCH_MAX))
    more: bool

    def validate(self) -> None:
        _check_blobs(self.events, MAX_EVENT_BYTES, "events")


@message("gossip.beat")
class Beat(Message):
    heartbeat: bytes = field(metadata=bound(max_len=MAX_HEARTBEAT_BYTES))


GOSSIP_MESSAGES = (Push, Digest, Events, Beat)


def _blob_hash(blob: bytes) -> bytes:
    return nacl.hash.blake2b(blob, digest_size=16, encoder=RawEncoder)


def _check_blobs(items: tuple[bytes, ...], max_len: int, what: str) -> None:
    for item in items:
        if not isinstance(item, bytes) or len(item) > max_len:
            raise ProtocolError(f"{what}: each entry is at most {max_len} bytes")


# -- actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    peer: PeerId
    msg: Message


@dataclass(frozen=True)
class Accept:
    """A new event was stored. Act on it only when `trusted`."""

    event: ChangeEvent
    trusted: bool
    via: PeerId | None


@dataclass(frozen=True)
class Reject:
    """An event (or heartbeat) was refused; already recorded in the store's audit table."""

    reason: str
    via: PeerId | None
    origin: PeerId | None = None
    seq: int | None = None
    event_id: bytes | None = None


@dataclass(frozen=True)
class PresenceChanged:
    peer: PeerId
    online: bool
    name: str
    trusted: bool


Action = Send | Accept | Reject | PresenceChanged


@dataclass
class _Presence:
    last_seen: float
    wall_ms: int
    name: str
    online: bool = True


# each node that accepts an event for the first time relays it to this many peers.
# About e^-fanout of the nodes miss every push and wait for anti-entropy: measured
# with 200 nodes (16-peer views, one process), p99 reach was 1166 ms at fanout 3
# and 315 ms at fanout 6, for 6.5 instead of 4.8 messages per event per node.
DEFAULT_FANOUT = 6
# the origin of an event pushes it to this many peers (relays use `fanout`)
DEFAULT_ORIGIN_FANOUT = 32
# events of untrusted origins are pushed onward at most this fast (a token bucket, for
# all such origins together); beyond it they are still stored within the log's caps and
# spread by anti-entropy only, so a flood of fresh strangers' events costs every node
# at most fanout x 20 pushes/s instead of fanout per event
RELAY_ONLY_PUSH_PER_S = 20.0
RELAY_ONLY_PUSH_BURST = 64


class GossipEngine:
    """See the module docstring. One instance per node; not thread-safe."""

    def __init__(self, self_id: PeerId, store: EventLog, *, fanout: int = DEFAULT_FANOUT,
                 rand: random.Random | None = None,
                 is_trusted: Callable[[PeerId], bool] = lambda _p: True,
                 anti_entropy_s: float = DEFAULT_ANTI_ENTROPY_S,
                 presence_timeout_s: float = DEFAULT_PRESENCE_TIMEOUT_S,
                 seen_max: int = SEEN_MAX,
                 origin_fanout: int = DEFAULT_ORIGIN_FANOUT) -> None:
        if fanout < 1:
            raise ValueError("fanout must be at least 1")
        self.self_id = self_id
        self.store = store
        self.fanout = fanout
        self.origin_fanout = max(origin_fanout, fanout)
        self.rand = rand or random.Random()
        self.is_trusted = is_trusted
        self.anti_entropy_s = anti_entropy_s
        self.presence_timeout_s = presence_timeout_s
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._seen_max = seen_max
        self._peers: list[PeerId] = []
        self._presence: dict[PeerId, _Presence] = {}
        self._next_anti_entropy: float | None = None
        self._last_gap_pull: dict[PeerId, float] = {}
        self._relay_tokens = float(RELAY_ONLY_PUSH_BURST)
        self._relay_tokens_at: float | None = None
        self.stats = {"sent": 0, "received": 0, "accepted": 0, "rejected": 0, "duplicates": 0}

    # -- configuration -------------------------------------------------------
    def set_peers(self, peers: list[PeerId]) -> None:
        self._peers = [p for p in dict.fromkeys(peers) if p != self.self_id]

    @property
    def peers(self) -> list[PeerId]:
        return list(self._peers)

    def presence(self) -> dict[PeerId, tuple[float, bool, str]]:
        """Peer -> (last seen `now`, online, name)."""
        return {p: (s.last_seen, s.online, s.name) for p, s in self._presence.items()}

    # -- inputs ----------------------------------------------------------------
    def publish(self, event: ChangeEvent, now: float) -> list[Action]:
        """A local event (already stored by the caller): push it to `origin_fanout` peers.

        Relays push to `fanout` peers each; with relays alone about e^-fanout of the
        nodes (5 % at 3) would wait for anti-entropy. The origin paying one message per
        peer (up to `origin_fanout`) reaches every direct peer in one hop, which takes
        the tail latency of a small or well-meshed network down to one round trip.
        """
        self._mark_seen(event.id)
        return self._push(Push((event.encode(),)), exclude=(), count=self.origin_fanout)

    def publish_many(self, events: list[ChangeEvent], now: float) -> list[Action]:
        """Local events (already stored): the same push as ``publish``, with up to
        PUSH_BATCH_MAX events per message (2,000 changes are ~32 pushes, not 2,000).
        Each event stays signed on its own, so receivers validate it as before."""
        actions: list[Action] = []
        for i in range(0, len(events), PUSH_BATCH_MAX):
            batch = events[i:i + PUSH_BATCH_MAX]
            for event in batch:
                self._mark_seen(event.id)
            actions += self._push(Push(tuple(e.encode() for e in batch)), exclude=(),
                                  count=self.origin_fanout)
        return actions

    def publish_heartbeat(self, hb: Heartbeat, now: float) -> list[Action]:
        """Send our heartbeat (or goodbye) straight to our peers (up to `origin_fanout`);
        not relayed."""
        self._mark_seen(hb.id)
        return self._push(Beat(hb.encode()), exclude=(), count=self.origin_fanout)

    def receive(self, peer: PeerId, data: bytes, now: float) -> list[Action]:
        """Bytes from `peer`. Raises ProtocolError if the message itself is malformed."""
        msg = decode_message(data, expect=GOSSIP_MESSAGES)
        self.stats["received"] += 1
        if isinstance(msg, Push):
            actions: list[Action] = []
            for blob in msg.events:
                actions += self._ingest(blob, peer, relay=True, now=now)
            origins = {a.event.origin.key for a in actions if isinstance(a, Accept)}
            actions += self._maybe_gap_pull(peer, origins, now)
            return actions
        if isinstance(msg, Events):
            actions = []
            for blob in msg.events:
                actions += self._ingest(blob, peer, relay=False, now=now)
            # ask for the next batch only while it brings events we act on, and only for
            # trusted origins: untrusted ones get one batch per exchange (within the
            # relay caps), so a peer holding thousands of their events cannot make us
            # pull them all, and a batch the caps refused entirely can never loop
            if msg.more and any(isinstance(a, Accept) and a.trusted for a in actions):
                actions.append(self._send(peer, self._digest(reply=False, untrusted_done=True)))
            return actions
        if isinstance(msg, Digest):
            return self._answer_digest(peer, msg)
        assert isinstance(msg, Beat)
        return self._ingest_heartbeat(msg.heartbeat, peer, now)

    def tick(self, now: float) -> list[Action]:
        """Periodic work: anti-entropy with one random peer, presence timeouts."""
        actions: list[Action] = []
        if self._next_anti_entropy is None:
            # spread first rounds so N nodes started together do not pull in lockstep
            self._next_anti_entropy = now + self.rand.uniform(0, self.anti_entropy_s)
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self.anti_entropy_s
            if self._peers:
                target = self.rand.choice(self._peers)
                actions.append(self._send(target, self._digest(reply=True)))
        for peer, state in self._presence.items():
            if state.online and now - state.last_seen > self.presence_timeout_s:
                state.online = False
                actions.append(PresenceChanged(peer, False, state.name, self.is_trusted(peer)))
        return actions

    def next_deadline(self) -> float | None:
        return self._next_anti_entropy

    # -- internals -------------------------------------------------------------
    def _send(self, peer: PeerId, msg: Message) -> Send:
        self.stats["sent"] += 1
        kind = "sent_" + msg.TYPE.rsplit(".", 1)[-1]
        self.stats[kind] = self.stats.get(kind, 0) + 1
        return Send(peer, msg)

    def _push(self, msg: Message, exclude: tuple[PeerId | None, ...],
              count: int | None = None) -> list[Action]:
        candidates = [p for p in self._peers if p not in exclude]
        chosen = self.rand.sample(candidates, min(count or self.fanout, len(candidates)))
        return [self._send(p, msg) for p in chosen]

    def _mark_seen(self, key: bytes) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)

    def _reject(self, reason: str, via: PeerId | None, event: ChangeEvent | None = None,
                origin: PeerId | None = None) -> Reject:
        self.stats["rejected"] += 1
        if event is not None:
            origin = event.origin
            self._mark_seen(event.id)
        seq = event.seq if event else None
        eid = event.id if event else None
        if not reason.startswith("sequence number reused"):  # the store records conflicts
            self.store.record_rejected(origin, seq, eid, reason)
        return Reject(reason, via, origin, seq, eid)

    def _ingest(self, blob: bytes, via: PeerId, *, relay: bool, now: float) -> list[Action]:
        # fast path: the exact bytes were seen before (the id proper is computed
        # over our canonical re-encoding, so a re-encoded copy is still caught below)
        raw_key = b"raw:" + _blob_hash(blob)
        if raw_key in self._seen:
            self.stats["duplicates"] += 1
            return []
        self._mark_seen(raw_key)
        try:
            event = ChangeEvent.decode(blob)
        except ProtocolError as exc:
            return [self._reject(str(exc), via)]
        eid = event.id
        if eid in self._seen:
            self.stats["duplicates"] += 1
            return []
        if self.store.has(eid):
            self._mark_seen(eid)
            self.stats["duplicates"] += 1
            return []
        try:
            event.verify()
        except ProtocolError as exc:
            return [self._reject(str(exc), via, event)]
        trusted = event.origin == self.self_id or self.is_trusted(event.origin)
        outcome = self.store.add(event, relay_only=not trusted)
        self._mark_seen(eid)
        if outcome is AddOutcome.DUPLICATE:
            self.stats["duplicates"] += 1
            return []
        if outcome is AddOutcome.PRUNED:
            # older than what the relay caps already pruned of this untrusted origin:
            # neither stored nor relayed again (that would only bounce it around)
            self.stats["pruned"] = self.stats.get("pruned", 0) + 1
            return []
        if outcome is AddOutcome.CONFLICT:
            return [self._reject(
                f"sequence number reused with different content: "
                f"{event.origin.short}#{event.seq}", via, event)]
        self.stats["accepted"] += 1
        actions: list[Action] = [Accept(event, trusted, via)]
        if relay and (trusted or self._relay_budget(now)):
            actions += self._push(Push((blob,)), exclude=(via, event.origin))
        return actions

    def _relay_budget(self, now: float) -> bool:
        """Token bucket for pushing untrusted origins' events onward."""
        elapsed = max(0.0, now - self._relay_tokens_at) if self._relay_tokens_at is not None \
            else 0.0
        self._relay_tokens = min(float(RELAY_ONLY_PUSH_BURST),
                                 self._relay_tokens + elapsed * RELAY_ONLY_PUSH_PER_S)
        self._relay_tokens_at = now
        if self._relay_tokens >= 1.0:
            self._relay_tokens -= 1.0
            return True
        self.stats["relay_throttled"] = self.stats.get("relay_throttled", 0) + 1
        return False

    def _maybe_gap_pull(self, peer: PeerId, origins: set[bytes], now: float) -> list[Action]:
        """A newly accepted event left a hole below it: pull the hole from that peer now."""
        if not origins or now - self._last_gap_pull.get(peer, -1e18) < GAP_PULL_MIN_INTERVAL_S:
            return []
        for key in origins:
            contiguous, highest = self.store.watermark(key)
            if highest > contiguous:  # (never for untrusted origins: high-water marks)
                self._last_gap_pull[peer] = now
                return [self._send(peer, self._digest(reply=False, untrusted_done=True))]
        return []

    def _digest(self, *, reply: bool, untrusted_done: bool = False) -> Digest:
        return Digest(tuple(self.store.digest_seqs(DIGEST_ORIGINS_MAX,
                                                   untrusted_done=untrusted_done)), reply)

    def _answer_digest(self, peer: PeerId, msg: Digest) -> list[Action]:
        actions: list[Action] = []
        missing = self.store.missing_for(msg.as_dict(), MISSING_BATCH_MAX)
        if missing:
            more = len(missing) >= MISSING_BATCH_MAX
            actions.append(self._send(peer, Events(tuple(e.encode() for e in missing), more)))
        if msg.reply:
            actions.append(self._send(peer, self._digest(reply=False)))
        return actions

    def _ingest_heartbeat(self, blob: bytes, via: PeerId, now: float) -> list[Action]:
        try:
            hb = Heartbeat.decode(blob)
        except ProtocolError as exc:
            return [self._reject(str(exc), via)]
        if hb.origin == self.self_id:
            return []
        state = self._presence.get(hb.origin)
        if hb.id in self._seen or (state is not None and hb.wall_ms <= state.wall_ms):
            return []
        try:
            hb.verify()
        except ProtocolError as exc:
            return [self._reject(str(exc), via, origin=hb.origin)]
        self._mark_seen(hb.id)
        actions: list[Action] = []
        if hb.leaving:  # a goodbye: offline now, not after the presence timeout
            if state is not None and state.online:
                actions.append(PresenceChanged(hb.origin, False, hb.name,
                                               self.is_trusted(hb.origin)))
            self._presence[hb.origin] = _Presence(now, hb.wall_ms, hb.name, False)
            return actions
        if state is None or not state.online:
            actions.append(PresenceChanged(hb.origin, True, hb.name, self.is_trusted(hb.origin)))
        self._presence[hb.origin] = _Presence(now, hb.wall_ms, hb.name, True)
        # not relayed: relaying cost 3N/heartbeat_s messages per node per second (12/s at
        # N=20, measured); presence matters for the peers we sync with, who send us theirs
        return actions

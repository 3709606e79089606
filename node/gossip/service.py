"""The asyncio driver of the gossip engine: channels, timers, notifications, sync hand-off.

``GossipService`` feeds bytes from authenticated channels into ``GossipEngine``
and carries out its actions:

* ``Send``: each peer has one outbox (bounded queue) drained by its own writer
  task over one reused channel (opened on demand with ``open_channel``, or the
  one the peer opened to us via ``handle_channel``). Every connect and send has
  a timeout, so one dead or slow peer only loses its own messages (anti-entropy
  repairs them later); it never stalls the others. A failed connect backs off.
* ``Accept``: trusted origin -> notification (file_shared/updated/deleted/moved)
  and ``on_event(event)`` / ``on_events(batch)`` (given here or with
  ``on_accepted``: the --share mirror, node/folders/mirror_service.py) on a single
  worker task (events are applied in order, never blocking the channel readers).
  Untrusted origin -> stored relay-only and relayed, but no notification and no
  ``on_event``: anyone may relay signed events, only trusted origins are acted on
  (DESIGN.md).
* ``Reject``: ``event_rejected`` notification (the store keeps the audit row);
  a message that does not even decode closes that channel.
* ``PresenceChanged``: ``peer_joined`` / ``peer_left`` for trusted peers.

Channels are duck-typed like node/channel.py's SecureChannel: ``peer``,
``async send(bytes)``, ``async recv() -> bytes`` (ChannelClosed at the end),
``async close()``. Imports the gossip package, identity, errors; it must not
import transports, the daemon or the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from node.errors import ChannelClosed, P2PError, ProtocolError
from node.gossip.engine import (
    DEFAULT_FANOUT,
    Accept,
    Action,
    GossipEngine,
    PresenceChanged,
    Reject,
    Send,
)
from node.gossip.events import ChangeEvent, Heartbeat
from node.gossip.log import EventLog
from node.identity import Identity, PeerId
from node.notifications import (
    FILE_CHANGE_CLASS,
    EventRejected,
    PeerJoined,
    PeerLeft,
    TransferFailed,
    file_change,
)

log = logging.getLogger(__name__)

OUTBOX_MAX_MESSAGES = 1024
APPLY_QUEUE_MAX = 10_000
APPLY_BATCH_MAX = 1024  # accepted events handed to on_events at once (queued ones only)
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0
RECONNECT_BACKOFF_S = 1.0
RECONNECT_BACKOFF_MAX_S = 30.0
TICK_MAX_S = 0.25
STOP_CANCEL_RETRY_S = 0.5
# at stop, the goodbye to each peer with an open channel may take this long (no new
# connections are made for it: a peer we have no channel to learns by the timeout)
GOODBYE_TIMEOUT_S = 0.5
REJECT_NOTIFY_WINDOW_S = 60.0
REJECT_NOTIFY_MAX_PER_WINDOW = 20


class Channel(Protocol):
    peer: PeerId

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


class _Link:
    """Outgoing state for one peer: outbox, current channel, writer task, backoff."""

    def __init__(self, peer: PeerId) -> None:
        self.peer = peer
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(OUTBOX_MAX_MESSAGES)
        self.channel: Channel | None = None
        self.writer: asyncio.Task[None] | None = None
        self.retry_at = 0.0
        self.backoff_s = RECONNECT_BACKOFF_S
        self.dropped = 0


class GossipService:
    """See the module docstring."""

    def __init__(self, identity: Identity, log: EventLog, *,
                 peers: Callable[[], list[PeerId]],
                 open_channel: Callable[[PeerId], Awaitable[Channel]],
                 is_trusted: Callable[[PeerId], bool],
                 on_event: Callable[[ChangeEvent], Awaitable[Any]] | None = None,
                 on_events: Callable[[list[ChangeEvent]], Awaitable[Any]] | None = None,
                 fanout: int = DEFAULT_FANOUT, anti_entropy_s: float = 2.0,
                 heartbeat_s: float = 5.0,
                 rand: random.Random | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 send_timeout_s: float = SEND_TIMEOUT_S) -> None:
        self.identity = identity
        self.log = log
        self._peers = peers
        self._open_channel = open_channel
        self._is_trusted = is_trusted
        self._on_event = on_event
        self._on_events = on_events
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.engine = GossipEngine(identity.peer_id, log, fanout=fanout, rand=rand,
                                   is_trusted=is_trusted, anti_entropy_s=anti_entropy_s,
                                   presence_timeout_s=3 * heartbeat_s)
        self._tick_s = min(TICK_MAX_S, anti_entropy_s / 4, heartbeat_s / 4)
        self._links: dict[PeerId, _Link] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._channels: set[Channel] = set()
        self._apply_queue: asyncio.Queue[ChangeEvent] = asyncio.Queue(APPLY_QUEUE_MAX)
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._next_heartbeat = 0.0
        self._reject_window: dict[PeerId | None, list[float]] = {}
        # callbacks for tests and benchmarks: called with each newly accepted event
        self.accept_listeners: list[Callable[[ChangeEvent, bool], None]] = []

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._tasks = [asyncio.create_task(self._ticker(), name="gossip-ticker"),
                       asyncio.create_task(self._applier(), name="gossip-apply")]

    async def stop(self) -> None:
        if self._running:
            await self._say_goodbye()
        self._running = False
        tasks = list(self._tasks) + list(self._readers)
        tasks += [link.writer for link in self._links.values() if link.writer]
        # cancel until every task is done: on Python 3.11 a writer inside
        # asyncio.wait_for can swallow one cancellation (when its send completes at the
        # same moment) and go back to waiting on its outbox, which hung stop() forever
        pending = {t for t in tasks if not t.done()}
        while pending:
            for t in pending:
                t.cancel()
            _done, pending = await asyncio.wait(pending, timeout=STOP_CANCEL_RETRY_S)
        for t in tasks:
            if not t.cancelled():
                with contextlib.suppress(Exception):
                    t.result()
        for ch in list(self._channels):
            await _close_quietly(ch)
        self._channels.clear()
        self._links.clear()
        self._readers.clear()
        self._tasks = []

    async def _say_goodbye(self) -> None:
        """A signed goodbye over every open channel, so peers show us offline at once."""
        goodbye = Heartbeat.create(self.identity, leaving=True)
        sends = []
        for action in self.engine.publish_heartbeat(goodbye, time.time()):
            link = self._links.get(action.peer) if isinstance(action, Send) else None
            if link is not None and link.channel is not None and isinstance(action, Send):
                sends.append(asyncio.wait_for(link.channel.send(action.msg.encode()),
                                              GOODBYE_TIMEOUT_S))
        for result in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(
                    result, (TimeoutError, P2PError, OSError)):
                raise result

    # -- public API --------------------------------------------------------------
    def on_accepted(self, on_event: Callable[[ChangeEvent], Awaitable[Any]],
                    on_events: Callable[[list[ChangeEvent]], Awaitable[Any]] | None = None
                    ) -> None:
        """Hand accepted events of trusted origins to these from now on (the --share
        mirror registers here; without any, accepted events are only logged/notified)."""
        self._on_event = on_event
        self._on_events = on_events

    async def publish_local(self, kind: str, folder: str, path: str, size: int, hash: bytes,
                            old_path: str = "") -> ChangeEvent:
        """Sign, log, notify and gossip a change of our own shared folder."""
        event = self.log.append_local(self.identity, kind=kind, folder=folder, path=path,
                                      size=size, hash=hash, old_path=old_path)
        self.log.emit(file_change(event, local=True))
        self.engine.set_peers(self._peers())
        self._dispatch(self.engine.publish(event, time.time()))
        return event

    async def publish_local_many(self, folder: str, changes: list[tuple[str, str, int, bytes,
                                                                          str]]
                                 ) -> list[ChangeEvent]:
        """``publish_local`` for a batch of (kind, path, size, hash, old_path): one log
        transaction, one notification transaction, pushes of many events each."""
        for kind, *_rest in changes:
            if kind not in FILE_CHANGE_CLASS:
                raise ValueError(f"unknown change kind {kind!r}")
        with self.log.batch():
            events = self.log.append_local_many(self.identity, folder, changes)
            for e in events:
                self.log.emit(file_change(e, local=True))
        self.engine.set_peers(self._peers())
        self._dispatch(self.engine.publish_many(events, time.time()))
        return events

    async def handle_channel(self, channel: Channel) -> None:
        """Serve a channel the peer opened to us; returns when it closes."""
        link = self._link(channel.peer)
        if link.channel is None:
            link.channel = channel
        self._channels.add(channel)
        try:
            await self._read_loop(channel)
        finally:
            await self._drop_channel(channel)

    async def connect(self, peer: PeerId) -> bool:
        """Open (or reuse) the channel to `peer` now instead of on first send."""
        link = self._link(peer)
        if link.channel is not None:
            return True
        return await self._connect(link) is not None

    def presence(self) -> dict[PeerId, float]:
        """Peer -> wall-clock time (s) its latest heartbeat reached us."""
        return {p: seen for p, (seen, _online, _name) in self.engine.presence().items()}

    def online(self) -> dict[PeerId, bool]:
        return {p: online for p, (_s, online, _n) in self.engine.presence().items()}

    def stats(self) -> dict[str, int]:
        """Engine counters plus what the log holds (O(1): counters, no scan of the log)."""
        out = dict(self.engine.stats)
        out["dropped"] = sum(link.dropped for link in self._links.values())
        out.update({f"log_{k}": v for k, v in self.log.stats().to_json().items()})
        return out

    # -- engine actions ------------------------------------------------------------
    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._enqueue(action.peer, action.msg.encode())
            elif isinstance(action, Accept):
                self._accepted(action)
            elif isinstance(action, Reject):
                self._rejected(action)
            elif isinstance(action, PresenceChanged) and action.trusted:
                presence = PeerJoined if action.online else PeerLeft
                self.log.emit(presence(str(action.peer), action.name))

    def _accepted(self, action: Accept) -> None:
        event = action.event
        for cb in self.accept_listeners:
            cb(event, action.trusted)
        if not action.trusted:
            log.info("relaying event %s#%d from untrusted origin without acting on it",
                     event.origin.short, event.seq)
            return
        self.log.emit(file_change(event, via=action.via))
        try:
            self._apply_queue.put_nowait(event)
        except asyncio.QueueFull:
            self._apply_failed(event, "sync queue full")

    def _rejected(self, action: Reject) -> None:
        now = time.monotonic()
        window = self._reject_window.get(action.via)
        if window is None or now - window[0] > REJECT_NOTIFY_WINDOW_S:
            window = self._reject_window[action.via] = [now, 0]
        window[1] += 1
        if window[1] > REJECT_NOTIFY_MAX_PER_WINDOW:
            return  # a flood from one peer: the audit table has the rows, the stream does not
        log.warning("rejected event from %s: %s",
                    action.via.short if action.via else "?", action.reason)
        self.log.emit(EventRejected(
            reason=action.reason[:300], via=str(action.via) if action.via else "",
            origin=str(action.origin) if action.origin else "",
            seq=action.seq if action.seq is not None else -1,
            event_id=action.event_id.hex() if action.event_id else ""))

    # -- tasks ------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while self._running:
            now = time.time()
            self.engine.set_peers(self._peers())
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.heartbeat_s
                self._dispatch(self.engine.publish_heartbeat(Heartbeat.create(self.identity),
                                                             now))
            self._dispatch(self.engine.tick(now))
            await asyncio.sleep(self._tick_s)

    async def _applier(self) -> None:
        while True:
            event = await self._apply_queue.get()
            if self._on_events is not None:
                batch = [event]
                while len(batch) < APPLY_BATCH_MAX and not self._apply_queue.empty():
                    batch.append(self._apply_queue.get_nowait())
                try:
                    await self._on_events(batch)
                except Exception:  # a bug in one batch must not stop every later sync
                    log.exception("applying %d events failed unexpectedly", len(batch))
                continue
            if self._on_event is None:
                continue
            try:
                await self._on_event(event)
            except P2PError as exc:
                log.warning("could not apply %s %s: %s", event.kind, event.path, exc)
                self._apply_failed(event, str(exc))
            except OSError as exc:
                log.warning("could not apply %s %s: %s", event.kind, event.path, exc)
                self._apply_failed(event, f"local I/O: {exc}")
            except Exception:  # a bug in one apply must not stop every later sync
                log.exception("applying %s %s failed unexpectedly", event.kind, event.path)

    def _apply_failed(self, event: ChangeEvent, error: str) -> None:
        self.log.emit(TransferFailed(peer_id=str(event.origin), direction="sync", error=error,
                                     paths=(f"{event.folder}/{event.path}",),
                                     event_id=event.id.hex()))

    def _link(self, peer: PeerId) -> _Link:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link(peer)
        return link

    def _enqueue(self, peer: PeerId, data: bytes) -> None:
        if not self._running:
            return
        link = self._link(peer)
        try:
            link.outbox.put_nowait(data)
        except asyncio.QueueFull:
            link.dropped += 1  # anti-entropy repairs what a slow peer missed
            return
        if link.writer is None or link.writer.done():
            link.writer = asyncio.create_task(self._writer(link), name=f"gossip-w-{peer.short}")

    async def _writer(self, link: _Link) -> None:
        while True:
            data = await link.outbox.get()
            channel = link.channel
            if channel is None:
                channel = await self._connect(link)
                if channel is None:
                    # peer unreachable: drop what is queued, anti-entropy catches up later
                    link.dropped += 1 + link.outbox.qsize()
                    while not link.outbox.empty():
                        link.outbox.get_nowait()
                    continue
            try:
                await asyncio.wait_for(channel.send(data), self.send_timeout_s)
            except (TimeoutError, P2PError, OSError) as exc:
                log.info("gossip send to %s failed: %s", link.peer.short, exc)
                link.dropped += 1
                await self._drop_channel(channel)

    async def _connect(self, link: _Link) -> Channel | None:
        now = time.monotonic()
        if now < link.retry_at:
            return None
        try:
            channel = await asyncio.wait_for(self._open_channel(link.peer),
                                             self.connect_timeout_s)
        except (TimeoutError, P2PError, OSError) as exc:
            log.info("gossip cannot reach %s: %s", link.peer.short, exc)
            link.retry_at = now + link.backoff_s
            link.backoff_s = min(link.backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
            return None
        link.backoff_s = RECONNECT_BACKOFF_S
        if link.channel is None:
            link.channel = channel
        self._channels.add(channel)
        task = asyncio.create_task(self._reader_task(channel), name=f"gossip-r-{link.peer.short}")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return channel

    async def _reader_task(self, channel: Channel) -> None:
        try:
            await self._read_loop(channel)
        finally:
            await self._drop_channel(channel)

    async def _read_loop(self, channel: Channel) -> None:
        peer = channel.peer
        while True:
            try:
                data = await channel.recv()
            except (ChannelClosed, OSError):
                return
            except ProtocolError as exc:
                log.warning("channel from %s broke the rules: %s", peer.short, exc)
                return
            with self.log.batch():  # one commit per message, not per event it carries
                try:
                    actions = self.engine.receive(peer, data, time.time())
                except ProtocolError as exc:
                    log.warning("bad gossip message from %s: %s; closing", peer.short, exc)
                    self._rejected(Reject(str(exc), peer))
                    return
                self._dispatch(actions)

    async def _drop_channel(self, channel: Channel) -> None:
        self._channels.discard(channel)
        link = self._links.get(channel.peer)
        if link is not None and link.channel is channel:
            link.channel = None
            # prefer another live channel to the same peer, if there is one
            for other in self._channels:
                if other.peer == channel.peer:
                    link.channel = other
                    break
        await _close_quietly(channel)


async def _close_quietly(channel: Channel) -> None:
    with contextlib.suppress(P2PError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(channel.close(), 2.0)

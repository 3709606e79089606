"""Peering: open and accept authenticated channels and route them to services.

Every channel starts with the secure handshake (node/channel.py), both sides
check the trust list, and then the opener names the service it wants in one
``ServiceRequest`` message (``ping``, ``transfer``, ``fetch``, ``gossip``).
The accepting side hands the channel to the handler registered for it.

Every open channel is kept in a registry per peer, so that ``revoke(peer)``
(trust withdrawn) closes all of them at once: services registered with
``on_revoke`` first stop their work with that peer (a transfer tells the peer
why), then every remaining channel to the peer is closed.

The peer book (node/peerbook.py) says where a peer is; if it does not know,
the injected ``locate`` (a DHT lookup) is asked. Transports know nothing of
this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from node.channel import SecureChannel, accept_channel, open_channel
from node.contact import ContactRecord
from node.errors import (
    ChannelClosed,
    ConfigError,
    P2PError,
    PeerNotTrusted,
    PeerUnreachable,
    ProtocolError,
)
from node.identity import Identity, PeerId
from node.reach import PATH_HOLE_PUNCHED, PATH_RELAYED
from node.reach.dialer import FailedEndpoints, dial
from node.reach.punch import udp_candidates
from node.reach.puncher import HolePuncher
from node.transports import TRANSPORT_NAMES, get_transport
from node.transports.base import Listener, Pipe
from node.trust import TrustStore
from node.wire import Message, bound, decode_message, message

log = logging.getLogger("p2pfs.peering")

SERVICE_REQUEST_TIMEOUT_S = 10.0
PING_PAYLOAD_MAX_BYTES = 65536
# on revocation, services whose work must tell the peer why (a transfer's Abort) get
# this long before their channels are closed under them; the rest close at once
REVOKE_GRACE_S = 0.6  # > the transfer session's ABORT_LINGER_S
REVOKE_CLOSE_TIMEOUT_S = 0.5  # a graceful close that takes longer is cut short (reset)
REVOKE_POLL_S = 0.02
SERVICES_TOLD_FIRST = frozenset({"transfer", "fetch"})
# channels this node opened for these services retry and resume when they close, so a
# successful hole punch closes them where they run over a relay: the retry goes direct
SERVICES_MOVED_AFTER_PUNCH = frozenset({"transfer"})


@message("svc")
class ServiceRequest(Message):
    service: str = field(metadata=bound(max_len=32))


@message("ping")
class Ping(Message):
    seq: int
    payload: bytes = field(metadata=bound(max_len=PING_PAYLOAD_MAX_BYTES))


@message("pong")
class Pong(Message):
    seq: int
    payload: bytes = field(metadata=bound(max_len=PING_PAYLOAD_MAX_BYTES))


ChannelHandler = Callable[[SecureChannel], Awaitable[None]]
Locate = Callable[[PeerId], Awaitable[ContactRecord | None]]
OnRevoke = Callable[[PeerId, PeerNotTrusted], None]


def revoked_error(peer: PeerId) -> PeerNotTrusted:
    """What a transfer with a peer whose trust was just withdrawn fails with."""
    return PeerNotTrusted(f"peer {peer.short} is not trusted any more (trust revoked)")


# -- one-shot grants (node send / node receive) ------------------------------------------
@dataclass(frozen=True, slots=True)
class ChannelGrant:
    """An untrusted key may open channels for one service until `expires_at` (monotonic)."""

    peer: PeerId
    service: str
    expires_at: float


class ChannelGrants:
    """In-memory, single-purpose permissions for keys that are NOT trusted: a one-shot
    send lets exactly the other side's key open exactly its service for a bounded time.
    Nothing is written anywhere; a restart forgets every grant; `withdraw` ends one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._grants: list[ChannelGrant] = []

    def add(self, peer: PeerId, service: str, ttl_s: float) -> ChannelGrant:
        if ttl_s <= 0:
            raise ValueError("a grant needs a positive lifetime")
        grant = ChannelGrant(peer, service, self._clock() + ttl_s)
        self._grants.append(grant)
        return grant

    def withdraw(self, grant: ChannelGrant) -> None:
        with contextlib.suppress(ValueError):
            self._grants.remove(grant)

    def allows(self, peer: PeerId, service: str | None) -> bool:
        now = self._clock()
        self._grants = [g for g in self._grants if g.expires_at > now]
        return any(g.peer == peer and (service is None or g.service == service)
                   for g in self._grants)

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for g in self._grants if g.expires_at > now)


class Peering:
    def __init__(self, identity: Identity, trust: TrustStore, *, host: str,
                 ports: dict[str, int], transports: list[str], locate: Locate,
                 on_refused: Callable[[PeerId, str], None] | None = None) -> None:
        self.identity = identity
        self.trust = trust
        self.host = host
        self._wanted_ports = ports
        self.transports = [t for t in transports if t in TRANSPORT_NAMES]
        self.ports: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._handlers: dict[str, ChannelHandler] = {}
        self._locate = locate
        self._on_refused = on_refused
        self._tasks: set[asyncio.Task[Any]] = set()
        # reach (node/reach): hole punching once enabled, direct endpoints that failed
        # lately, and the channels this node opened (a punch moves relayed transfers)
        self.puncher: HolePuncher | None = None
        self._failed_endpoints = FailedEndpoints()
        self._opened_here: weakref.WeakSet[SecureChannel] = weakref.WeakSet()
        # peer -> its open channels and the service each one serves
        self._open: dict[PeerId, weakref.WeakKeyDictionary[SecureChannel, str]] = {}
        self._revoke_listeners: list[OnRevoke] = []
        self.grants = ChannelGrants()
        self.register("ping", self._serve_ping)

    # -- trust -----------------------------------------------------------
    def authorize(self, peer: PeerId, service: str | None = None) -> None:
        """A trusted peer may use every service; an untrusted one only what a one-shot
        grant (below) allows it: `service` when named, else (during the handshake) any
        service some grant of it names, checked again once it names its service."""
        if self.trust.is_trusted(peer) or self.grants.allows(peer, service):
            return
        raise PeerNotTrusted(f"peer {peer} is not trusted; run `node trust {peer}`")

    def register(self, service: str, handler: ChannelHandler) -> None:
        self._handlers[service] = handler

    def on_revoke(self, listener: OnRevoke) -> None:
        """`listener(peer, error)` stops a service's work with `peer` when trust in it ends."""
        self._revoke_listeners.append(listener)

    def _track(self, channel: SecureChannel, service: str) -> None:
        """Register an open channel; re-check trust, which a revocation may have just ended
        (between the handshake's check and this registration)."""
        self._open.setdefault(channel.peer, weakref.WeakKeyDictionary())[channel] = service
        self.authorize(channel.peer, service)

    def open_channels(self, peer: PeerId) -> list[tuple[SecureChannel, str]]:
        """The channels to `peer` that are open now, with their service."""
        entries = self._open.get(peer)
        if entries is None:
            return []
        live = [(ch, svc) for ch, svc in list(entries.items()) if not ch.closed]
        if not live:
            self._open.pop(peer, None)
        return live

    async def revoke(self, peer: PeerId) -> int:
        """Trust in `peer` ended: stop every service's work with it and close every open
        channel to it, within about REVOKE_GRACE_S + REVOKE_CLOSE_TIMEOUT_S. Returns how
        many channels were open."""
        error = revoked_error(peer)
        channels = self.open_channels(peer)
        for listener in self._revoke_listeners:
            try:
                listener(peer, error)
            except P2PError as exc:
                log.warning("stopping work with %s after revocation: %s", peer.short, exc)
        told = [ch for ch, svc in channels if svc in SERVICES_TOLD_FIRST]
        rest = [ch for ch, svc in channels if svc not in SERVICES_TOLD_FIRST]
        await asyncio.gather(*(self._close_now(ch) for ch in rest))
        deadline = time.monotonic() + REVOKE_GRACE_S
        while any(not ch.closed for ch in told) and time.monotonic() < deadline:
            await asyncio.sleep(REVOKE_POLL_S)
        await asyncio.gather(*(self._close_now(ch) for ch in told))
        self._open.pop(peer, None)
        log.info("trust in %s revoked: closed its %d open channel(s)", peer.short, len(channels))
        return len(channels)

    @staticmethod
    async def _close_now(channel: SecureChannel) -> None:
        # a udp/quic close waits for the peer to acknowledge; cancelling it resets the pipe
        with contextlib.suppress(P2PError, OSError, TimeoutError):
            await asyncio.wait_for(channel.close(), REVOKE_CLOSE_TIMEOUT_S)

    # -- listening ---------------------------------------------------------
    async def start(self) -> dict[str, int]:
        for name in list(self.transports):
            try:
                transport = get_transport(name)
            except ConfigError as exc:
                log.warning("not listening on %s: %s", name, exc)
                self.transports.remove(name)
                continue
            listener = await transport.listen(self.host, self._wanted_ports.get(name, 0),
                                              self._on_pipe)
            self._listeners.append(listener)
            self.ports[name] = listener.port
            log.info("listening on %s %s:%d", name, self.host, listener.port)
        return dict(self.ports)

    def enable_punching(self, own_record: Callable[[], ContactRecord]) -> None:
        """Hole punching (node/reach/puncher.py) from the udp listener, offering the udp
        endpoints of `own_record()`; needs ``start()`` to have bound udp."""
        udp = next((li for li in self._listeners if li.transport == "udp"), None)
        if udp is None:
            log.info("hole punching off: the node does not listen on udp")
            return
        self.puncher = HolePuncher(
            udp, lambda: udp_candidates(own_record()),  # type: ignore[arg-type]
            open_coordination=lambda peer: self.connect(peer, "punch", punch=False),
            verify=self._verify_punched, on_punched=self._move_off_relays)
        self.register("punch", self._serve_punch)

    def _move_off_relays(self, peer: PeerId) -> None:
        """A punch to `peer` succeeded: close the relayed channels we opened whose service
        retries and resumes (a share), so that they continue over the punched path."""
        for channel, service in self.open_channels(peer):
            if (channel.path == PATH_RELAYED and service in SERVICES_MOVED_AFTER_PUNCH
                    and channel in self._opened_here):
                log.info("moving a relayed %s channel with %s to the punched path",
                         service, peer.short)
                task = asyncio.create_task(self._close_now(channel))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _verify_punched(self, peer: PeerId, pipe: Pipe) -> None:
        """The punched pipe leads to `peer`: one ping over a channel that proved it."""
        pipe.path = PATH_HOLE_PUNCHED  # type: ignore[attr-defined]
        try:
            channel = await open_channel(pipe, self.identity, expected_peer=peer,
                                         authorize=self.authorize)
        except BaseException:
            await pipe.close()
            raise
        try:
            await channel.send(ServiceRequest("ping").encode())
            await channel.send(Ping(1, b"").encode())
            decode_message(await asyncio.wait_for(channel.recv(), SERVICE_REQUEST_TIMEOUT_S),
                           expect=(Pong,))
        finally:
            await channel.close()

    async def punch_now(self, peer: PeerId) -> dict[str, Any]:
        """Punch with `peer` through whatever path reaches it now (the control API's
        ``punch``, for benchmarks and diagnosis); the outcome as JSON."""
        self.authorize(peer)
        if self.puncher is None:
            raise PeerUnreachable("hole punching is off: this node does not listen on udp")
        outcome = await self.puncher.punch(peer)
        return {"peer_id": str(peer), **outcome.to_json()}

    async def _serve_punch(self, channel: SecureChannel) -> None:
        if self.puncher is None:
            raise ProtocolError("hole punching is off on this node")
        await self.puncher.serve(channel.peer, channel)

    async def stop(self) -> None:
        if self.puncher is not None:
            await self.puncher.close()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.close()
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def accept_pipe(self, pipe: Pipe) -> None:
        """Serve a pipe that reached us some other way (a relay circuit) like an accepted one."""
        await self._on_pipe(pipe)

    async def _on_pipe(self, pipe: Pipe) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            channel = await accept_channel(pipe, self.identity, authorize=self.authorize)
        except PeerNotTrusted as exc:
            # node.channel already logged the refusal with the peer's id
            log.debug("refused %s channel from %s:%s: %s", pipe.transport, *pipe.remote[:2], exc)
            await pipe.close()
            self._discard(task)
            return
        except (TimeoutError, P2PError, OSError) as exc:
            log.info("incoming %s handshake from %s failed: %s", pipe.transport,
                     pipe.remote[0], exc)
            await pipe.close()
            self._discard(task)
            return
        if self.puncher is not None and self.puncher.inbound(channel.peer, pipe.transport,
                                                             pipe.remote):
            channel.path = PATH_HOLE_PUNCHED
        try:
            request = decode_message(
                await asyncio.wait_for(channel.recv(), SERVICE_REQUEST_TIMEOUT_S),
                expect=(ServiceRequest,),
            )
            handler = self._handlers.get(request.service)
            if handler is None:
                raise ProtocolError(f"unknown service {request.service!r}")
            self._track(channel, request.service)
            await handler(channel)
        except (TimeoutError, ChannelClosed):
            pass
        except P2PError as exc:
            log.warning("channel from %s ended: %s", channel.peer.short, exc)
        finally:
            await channel.close()
            self._discard(task)

    def _discard(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)

    # -- connecting ----------------------------------------------------------
    async def connect(self, peer: PeerId, service: str, *, transport: str | None = None,
                      record: ContactRecord | None = None,
                      timeout_s: float = 5.0, punch: bool = True) -> SecureChannel:
        """Open an authenticated channel to `peer` and ask for `service`."""
        self.authorize(peer, service)  # refuse before touching the network
        transport = transport or self.transports[0]
        if transport not in TRANSPORT_NAMES:
            raise PeerUnreachable(f"unknown transport {transport!r}")
        record = record or await self._locate(peer)
        if record is None:
            raise PeerUnreachable(f"peer {peer.short} is offline or unknown: no contact record "
                                  "from the bootstrap server, the DHT or the peer cache")
        # direct addresses first, then the peer's relays (node/reach/dialer.py)
        puncher = self.puncher if punch else None
        pipe = await dial(record, transport, timeout_s=timeout_s,
                          punched=(lambda: puncher.dial_punched(peer)) if puncher else None,
                          failed=self._failed_endpoints)
        try:
            channel = await open_channel(pipe, self.identity, expected_peer=peer,
                                         authorize=self.authorize)
            await channel.send(ServiceRequest(service).encode())
            self._track(channel, service)
            self._opened_here.add(channel)
        except BaseException:
            await pipe.close()
            raise
        # a channel that went through a relay starts a hole punch in the background
        # (unless `punch` is False: the punch's own coordination channel), so the next
        # one may go direct
        if puncher is not None and channel.path == PATH_RELAYED and record.ports.get("udp"):
            puncher.upgrade_soon(peer)
        return channel

    # -- ping ------------------------------------------------------------------
    async def _serve_ping(self, channel: SecureChannel) -> None:
        while True:
            ping = decode_message(await channel.recv(), expect=(Ping,))
            await channel.send(Pong(ping.seq, ping.payload).encode())

    async def ping(self, peer: PeerId, *, transport: str | None, count: int,
                   payload_bytes: int = 32,
                   on_reply: Callable[[int, float], Awaitable[None]] | None = None
                   ) -> dict[str, Any]:
        started = time.perf_counter()
        channel = await self.connect(peer, "ping", transport=transport)
        handshake_ms = (time.perf_counter() - started) * 1000
        rtts: list[float] = []
        try:
            payload = bytes(min(payload_bytes, PING_PAYLOAD_MAX_BYTES))
            for seq in range(1, count + 1):
                t0 = time.perf_counter()
                await channel.send(Ping(seq, payload).encode())
                pong = decode_message(await asyncio.wait_for(channel.recv(), 5.0),
                                      expect=(Pong,))
                if pong.seq != seq or pong.payload != payload:
                    raise ProtocolError("pong does not match ping")
                rtt_ms = (time.perf_counter() - t0) * 1000
                rtts.append(rtt_ms)
                if on_reply is not None:
                    await on_reply(seq, rtt_ms)
        except TimeoutError:
            raise PeerUnreachable(f"peer {peer.short} stopped answering pings") from None
        finally:
            await channel.close()
        return {"peer_id": str(peer), "transport": channel.transport,
                "remote": list(channel.remote), "path": channel.path,
                "relay": channel.relay, "handshake_ms": handshake_ms, "rtt_ms": rtts}

"""The node's side of the relay protocol (bootstrap/relay.py, docs/protocols/relay.md).

* ``RelayReservation`` keeps one reservation: it connects to the relay over
  TCP, proves it owns this node's peer id (signs the relay's nonce), renews
  every third of the TTL, and for each ``Incoming`` token opens a data
  connection, presents the token and hands the spliced pipe to ``on_pipe``
  (the same handler the tcp listener calls), so the SIGMA handshake runs
  through the relay exactly as over a direct connection. A lost reservation
  is re-made with backoff.
* ``dial_via_relay`` asks a relay to splice this node to a peer id and returns
  the spliced TCP pipe, ready for ``open_channel``.

Both use the tcp transport's framing for the relay's control messages; after
``Spliced`` the very same pipe carries the peers' frames. Imports transports,
identity, errors and the relay's wire messages; nothing above the transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bootstrap.relay_proto import (
    MAX_CONTROL_BYTES,
    Challenge,
    Connect,
    Incoming,
    Join,
    Proof,
    RelayError,
    Renew,
    Reserve,
    Reserved,
    Spliced,
    reserve_signed_bytes,
)
from node.errors import ChannelClosed, P2PError, PeerUnreachable, ProtocolError
from node.identity import Identity, PeerId
from node.reach import PATH_RELAYED
from node.transports import tcp
from node.transports.base import Pipe
from node.wire import Message, decode_message

log = logging.getLogger("p2pfs.reach.relay")

RELAY_REPLY_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
MAX_RELAY_ADDR_LEN = 80


def parse_relay_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ProtocolError if it is not one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
            or len(text) > MAX_RELAY_ADDR_LEN or any(c.isspace() for c in host)):
        raise ProtocolError(f"relay address {text[:MAX_RELAY_ADDR_LEN]!r} is not HOST:PORT")
    return host, int(port)


async def _recv(pipe: tcp.TcpPipe, expect: tuple[type[Message], ...],
                timeout_s: float | None, where: str) -> Message:
    """One relay control message; a RelayError becomes PeerUnreachable with its reason."""
    try:
        data = await asyncio.wait_for(pipe.recv(), timeout_s)
    except TimeoutError:
        raise PeerUnreachable(f"relay {where} did not answer within {timeout_s:g} s") from None
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"relay {where} sent a {len(data)}-byte control message")
    msg: Message = decode_message(bytes(data), expect=(*expect, RelayError),
                                  max_bytes=MAX_CONTROL_BYTES)
    if isinstance(msg, RelayError):
        raise PeerUnreachable(f"relay {where} refused: {msg.reason} ({msg.code})")
    return msg


def _mark_relayed(pipe: tcp.TcpPipe, relay: str) -> None:
    # read by SecureChannel (path) and by `node ping` / `node peers` (remote)
    pipe.path = PATH_RELAYED  # type: ignore[attr-defined]
    pipe.relay = relay  # type: ignore[attr-defined]


async def dial_via_relay(relay: str, peer: PeerId, *,
                         timeout_s: float = RELAY_REPLY_TIMEOUT_S) -> tcp.TcpPipe:
    """A TCP pipe spliced through `relay` to the reservation holder `peer`."""
    host, port = parse_relay_addr(relay)
    pipe = await tcp.connect(host, port, timeout=timeout_s)
    try:
        await pipe.send(Connect(peer.key).encode())
        await _recv(pipe, (Spliced,), timeout_s, relay)
    except BaseException:
        await pipe.close()
        raise
    _mark_relayed(pipe, relay)
    return pipe


class ReservationState(enum.Enum):
    CONNECTING = "connecting"
    RESERVED = "reserved"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class RelayReservation:
    """Keeps this node reachable through one relay while ``run()`` runs."""

    def __init__(self, identity: Identity, relay: str,
                 on_pipe: Callable[[Pipe], Awaitable[None]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.relay = relay
        self.host, self.port = parse_relay_addr(relay)
        self._on_pipe = on_pipe
        self._clock = clock
        self.state = ReservationState.CONNECTING
        self.expires: float = 0.0
        self.last_error = ""
        self.circuits_joined = 0
        self._joins: set[asyncio.Task[None]] = set()
        self.reserved = asyncio.Event()

    def _set_state(self, state: ReservationState, why: str = "") -> None:
        if state is not self.state:
            log.info("relay %s: %s -> %s%s", self.relay, self.state.value, state.value,
                     f" ({why})" if why else "")
        self.state = state
        if state is ReservationState.RESERVED:
            self.reserved.set()
        else:
            self.reserved.clear()

    def status(self) -> dict[str, Any]:
        return {"relay": self.relay, "state": self.state.value,
                "expires_in_s": max(0.0, self.expires - self._clock())
                if self.state is ReservationState.RESERVED else 0.0,
                "circuits_joined": self.circuits_joined, "last_error": self.last_error}

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        try:
            while True:
                self._set_state(ReservationState.CONNECTING)
                try:
                    await self._hold()
                    backoff = BACKOFF_MIN_S
                except (P2PError, OSError) as exc:
                    self.last_error = str(exc)
                    log.warning("relay %s: %s", self.relay, exc)
                self._set_state(ReservationState.BACKOFF, self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._set_state(ReservationState.STOPPED)
            for task in list(self._joins):
                task.cancel()
            await asyncio.gather(*self._joins, return_exceptions=True)

    async def _hold(self) -> None:
        pipe = await tcp.connect(self.host, self.port, timeout=RELAY_REPLY_TIMEOUT_S)
        renewer: asyncio.Task[None] | None = None
        try:
            key = self.identity.peer_id.key
            await pipe.send(Reserve(key).encode())
            challenge = await _recv(pipe, (Challenge,), RELAY_REPLY_TIMEOUT_S, self.relay)
            assert isinstance(challenge, Challenge)
            proof = self.identity.sign(reserve_signed_bytes(challenge.nonce, key))
            await pipe.send(Proof(proof).encode())
            reserved = await _recv(pipe, (Reserved,), RELAY_REPLY_TIMEOUT_S, self.relay)
            assert isinstance(reserved, Reserved)
            self._accept_terms(reserved)
            renewer = asyncio.create_task(self._renew(pipe, reserved.ttl_s))
            while True:
                # the renewer keeps Reserved coming at least every ttl/3
                msg = await _recv(pipe, (Incoming, Reserved), reserved.ttl_s, self.relay)
                if isinstance(msg, Reserved):
                    self._accept_terms(msg)
                elif isinstance(msg, Incoming):
                    task = asyncio.create_task(self._join(msg.token))
                    self._joins.add(task)
                    task.add_done_callback(self._joins.discard)
        except ChannelClosed:
            raise PeerUnreachable(f"relay {self.relay} closed the reservation") from None
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError, P2PError, OSError):
                    await renewer
            await pipe.close()

    def _accept_terms(self, reserved: Reserved) -> None:
        self.expires = self._clock() + reserved.ttl_s
        self.last_error = ""
        self._set_state(ReservationState.RESERVED)

    async def _renew(self, pipe: tcp.TcpPipe, ttl_s: int) -> None:
        while True:
            await asyncio.sleep(max(1.0, ttl_s / 3))
            await pipe.send(Renew().encode())

    async def _join(self, token: bytes) -> None:
        try:
            pipe = await tcp.connect(self.host, self.port, timeout=RELAY_REPLY_TIMEOUT_S)
        except P2PError as exc:
            log.info("relay %s: cannot join a circuit: %s", self.relay, exc)
            return
        try:
            await pipe.send(Join(token).encode())
            await _recv(pipe, (Spliced,), RELAY_REPLY_TIMEOUT_S, self.relay)
        except (P2PError, OSError) as exc:
            log.info("relay %s: circuit not joined: %s", self.relay, exc)
            await pipe.close()
            return
        _mark_relayed(pipe, self.relay)
        self.circuits_joined += 1
        await self._on_pipe(pipe)

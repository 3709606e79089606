"""UDP hole punching coordinated through an authenticated (relayed) channel, after DCUtR.

When a peer is reachable only through a relay, both nodes usually sit behind
NATs that drop unsolicited packets but let in replies to what they sent. If
both send to each other's public UDP endpoint at about the same moment, each
NAT sees the other's packets as replies and a direct path opens. libp2p's
DCUtR (relay/DCUtR.md) times this with one round trip over the relayed
connection; so do we, inside an already authenticated, trusted SecureChannel
(service ``punch``), so nobody but a trusted peer can make a node send:

    initiator (dialled through the relay)        responder (the relay's holder)
    pch-connect(attempt, endpoints) ------------>
               <------------ pch-connect(attempt, endpoints)   initiator: rtt
    pch-sync(attempt) -------------------------->               responder: at once,
    (waits rtt/2) then a udp client connection                  raw datagrams to
    from its listening socket to each endpoint                  each endpoint, from
                                                                its listening socket
    pch-done(attempt, ok) ---------------------->

Up to ``MAX_ATTEMPTS`` attempts; each endpoint list is at most
``MAX_ENDPOINTS`` IP literals with ports (no names: nothing to resolve), and the
responder sends at most ``PUNCH_WINDOW_S / PUNCH_INTERVAL_S`` datagrams per
endpoint per attempt. Both sides send from the udp transport's *listening*
socket, so the NAT mapping used is the one observers reported and records
advertise (port preservation: the listener's port on the public address).

This module is the pure part: the messages, the two machines (``now`` in,
actions out, a named state each), the candidate list of a contact record and
the cache of punched paths. ``node/reach/puncher.py`` drives them.
Imports contact, errors, identity and wire only.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import PeerId
from node.wire import Message, bound, message

MAX_ATTEMPTS = 3
MAX_ENDPOINTS = 8
MAX_HOST_CHARS = 45  # the longest IPv6 literal
# a udp connect of one attempt: INITs at 0, 0.25, 0.75 s (the machine's backoff)
ATTEMPT_DIAL_S = 1.5
PUNCH_WINDOW_S = 2.0  # how long the responder keeps opening its NAT per attempt
PUNCH_INTERVAL_S = 0.1
REPLY_TIMEOUT_S = 5.0  # a coordination message that does not come within this ends it
MAX_SYNC_DELAY_S = 1.0  # rtt/2, capped: a slow relay must not stall the punch
PUNCH_DATAGRAM = b"p2pfs-punch-v1\x00\x00"  # first byte is no udp-transport magic
# a punched path is dialled again while NAT mappings last (Linux: 120 s for a udp
# "stream", most home routers 30-60 s); after that the next relayed dial punches anew
PUNCHED_PATH_TTL_S = 60.0
# after a punch failed (symmetric NAT), relayed dials do not try again for a while
PUNCH_RETRY_AFTER_S = 120.0


def _check_endpoints(kind: str, endpoints: tuple[tuple[str, int], ...]) -> None:
    for item in endpoints:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ProtocolError(f"{kind}: an endpoint is [host, port]")
        host, port = item
        if not isinstance(host, str) or len(host) > MAX_HOST_CHARS:
            raise ProtocolError(f"{kind}: endpoint host must be an IP literal")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ProtocolError(f"{kind}: endpoint host {host[:MAX_HOST_CHARS]!r} is not an "
                                "IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise ProtocolError(f"{kind}: endpoint host {host} cannot be dialled")
        if type(port) is not int or not 0 < port < 65536:
            raise ProtocolError(f"{kind}: endpoint port out of range")


@message("pch-connect")
class PunchConnect(Message):
    """This side's udp endpoints (local first, then public) for one attempt."""

    attempt: int = field(metadata=bound(min_val=1, max_val=MAX_ATTEMPTS))
    endpoints: tuple[tuple[str, int], ...] = field(metadata=bound(max_len=MAX_ENDPOINTS))

    def validate(self) -> None:
        _check_endpoints("pch-connect", self.endpoints)
        object.__setattr__(self, "endpoints",
                           tuple((str(h), int(p)) for h, p in self.endpoints))


@message("pch-sync")
class PunchSync(Message):
    attempt: int = field(metadata=bound(min_val=1, max_val=MAX_ATTEMPTS))


@message("pch-done")
class PunchDone(Message):
    attempt: int = field(metadata=bound(min_val=1, max_val=MAX_ATTEMPTS))
    ok: bool


PUNCH_MESSAGES = (PunchConnect, PunchSync, PunchDone)
MAX_PUNCH_MESSAGE_BYTES = 1024  # a full pch-connect is about 450 bytes


# -- actions the machines ask their driver for ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class Dial:
    """Initiator: udp client connections to these endpoints now; report the first success."""

    endpoints: tuple[tuple[str, int], ...]
    attempt: int


@dataclass(frozen=True, slots=True)
class StartPunching:
    """Responder: raw datagrams to these endpoints every PUNCH_INTERVAL_S for PUNCH_WINDOW_S."""

    endpoints: tuple[tuple[str, int], ...]
    attempt: int


@dataclass(frozen=True, slots=True)
class StopPunching:
    pass


@dataclass(frozen=True, slots=True)
class Finished:
    ok: bool
    attempts: int
    rtt_s: float | None  # the relayed round trip of the last exchange


Action = Send | Dial | StartPunching | StopPunching | Finished


class InitiatorState(enum.Enum):
    IDLE = "idle"
    CONNECT_SENT = "connect-sent"
    WAITING_HALF_RTT = "waiting-half-rtt"
    DIALING = "dialing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ResponderState(enum.Enum):
    WAITING_CONNECT = "waiting-connect"
    WAITING_SYNC = "waiting-sync"
    PUNCHING = "punching"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINAL_INITIATOR = (InitiatorState.SUCCEEDED, InitiatorState.FAILED)
FINAL_RESPONDER = (ResponderState.SUCCEEDED, ResponderState.FAILED)


class PunchInitiator:
    """The side that measures the round trip and dials (DCUtR's "B" role for QUIC is the
    dialler; here the node that reached the peer through the relay)."""

    def __init__(self, endpoints: list[tuple[str, int]], *,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.endpoints = tuple(endpoints[:MAX_ENDPOINTS])
        self.max_attempts = max_attempts
        self.state = InitiatorState.IDLE
        self.attempt = 0
        self.rtt_s: float | None = None
        self.peer_endpoints: tuple[tuple[str, int], ...] = ()
        self._sent_at = 0.0
        self._dial_at: float | None = None

    def _set_state(self, state: InitiatorState) -> None:
        self.state = state

    def _connect(self, now: float) -> list[Action]:
        self.attempt += 1
        self._sent_at = now
        self._set_state(InitiatorState.CONNECT_SENT)
        return [Send(PunchConnect(self.attempt, self.endpoints))]

    def start(self, now: float) -> list[Action]:
        if self.state is not InitiatorState.IDLE:
            raise ProtocolError(f"punch initiator started twice (state {self.state.value})")
        return self._connect(now)

    def timer(self) -> float | None:
        """When ``on_timer`` wants to run next, or None."""
        if self.state is InitiatorState.WAITING_HALF_RTT:
            return self._dial_at
        if self.state is InitiatorState.CONNECT_SENT:
            return self._sent_at + REPLY_TIMEOUT_S
        return None

    def on_message(self, msg: Message, now: float) -> list[Action]:
        if (self.state is InitiatorState.CONNECT_SENT and isinstance(msg, PunchConnect)
                and msg.attempt == self.attempt):
            self.rtt_s = max(0.0, now - self._sent_at)
            self.peer_endpoints = msg.endpoints
            if not msg.endpoints:
                return self._fail_attempt(now)  # nothing to dial: the attempt is lost
            self._dial_at = now + min(self.rtt_s / 2, MAX_SYNC_DELAY_S)
            self._set_state(InitiatorState.WAITING_HALF_RTT)
            return [Send(PunchSync(self.attempt))]
        raise ProtocolError(f"unexpected {msg.TYPE} in punch state {self.state.value}")

    def on_timer(self, now: float) -> list[Action]:
        if (self.state is InitiatorState.WAITING_HALF_RTT and self._dial_at is not None
                and now >= self._dial_at):
            self._set_state(InitiatorState.DIALING)
            return [Dial(self.peer_endpoints, self.attempt)]
        if (self.state is InitiatorState.CONNECT_SENT
                and now >= self._sent_at + REPLY_TIMEOUT_S):
            self._set_state(InitiatorState.FAILED)
            return [Finished(False, self.attempt, self.rtt_s)]
        return []

    def on_dial_result(self, ok: bool, now: float) -> list[Action]:
        if self.state is not InitiatorState.DIALING:
            raise ProtocolError(f"dial result in punch state {self.state.value}")
        if ok:
            self._set_state(InitiatorState.SUCCEEDED)
            return [Send(PunchDone(self.attempt, True)), Finished(True, self.attempt, self.rtt_s)]
        return self._fail_attempt(now)

    def _fail_attempt(self, now: float) -> list[Action]:
        done: list[Action] = [Send(PunchDone(self.attempt, False))]
        if self.attempt >= self.max_attempts:
            self._set_state(InitiatorState.FAILED)
            return [*done, Finished(False, self.attempt, self.rtt_s)]
        return [*done, *self._connect(now)]


class PunchResponder:
    """The side that answers with its endpoints and opens its NAT on Sync."""

    def __init__(self, endpoints: list[tuple[str, int]], *,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.endpoints = tuple(endpoints[:MAX_ENDPOINTS])
        self.max_attempts = max_attempts
        self.state = ResponderState.WAITING_CONNECT
        self.attempt = 0
        self.peer_endpoints: tuple[tuple[str, int], ...] = ()

    def on_message(self, msg: Message, now: float) -> list[Action]:
        s = self.state
        if (s in (ResponderState.WAITING_CONNECT, ResponderState.PUNCHING)
                and isinstance(msg, PunchConnect) and msg.attempt == self.attempt + 1
                and msg.attempt <= self.max_attempts):
            stop: list[Action] = [StopPunching()] if s is ResponderState.PUNCHING else []
            self.attempt = msg.attempt
            self.peer_endpoints = msg.endpoints
            self.state = ResponderState.WAITING_SYNC
            return [*stop, Send(PunchConnect(self.attempt, self.endpoints))]
        if s is ResponderState.WAITING_SYNC and isinstance(msg, PunchSync) \
                and msg.attempt == self.attempt:
            self.state = ResponderState.PUNCHING
            return [StartPunching(self.peer_endpoints, self.attempt)]
        if (s in (ResponderState.PUNCHING, ResponderState.WAITING_SYNC)
                and isinstance(msg, PunchDone) and msg.attempt == self.attempt):
            stop = [StopPunching()] if s is ResponderState.PUNCHING else []
            if msg.ok:
                self.state = ResponderState.SUCCEEDED
                return [*stop, Finished(True, self.attempt, None)]
            if self.attempt >= self.max_attempts:
                self.state = ResponderState.FAILED
                return [*stop, Finished(False, self.attempt, None)]
            self.state = ResponderState.WAITING_CONNECT
            return stop
        raise ProtocolError(f"unexpected {msg.TYPE} (attempt {getattr(msg, 'attempt', '?')}) "
                            f"in punch state {s.value}")


# -- what to offer, and what worked --------------------------------------------------------
def udp_candidates(record: ContactRecord) -> list[tuple[str, int]]:
    """The udp endpoints a record implies, best first: its hosts on the udp port, the
    observed udp endpoint, then every other observed public host on the udp port (a NAT
    that preserves ports maps the listener there). IP literals only, at most
    MAX_ENDPOINTS."""
    port = record.ports.get("udp")
    if not port:
        return []
    out: list[tuple[str, int]] = []
    for host, p in [*record.endpoints("udp"),
                    *((h, port) for _svc, h, _p in record.observed)]:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            continue
        if addr.is_unspecified or addr.is_multicast or (host, p) in out:
            continue
        out.append((host, p))
    return out[:MAX_ENDPOINTS]


@dataclass(slots=True)
class PunchedPath:
    endpoint: tuple[str, int]
    at: float


class PunchedPaths:
    """Per peer: the udp endpoint a punch opened (fresh for PUNCHED_PATH_TTL_S after its
    last use), and when a punch last failed. Pure: ``now`` is passed in."""

    def __init__(self, *, ttl_s: float = PUNCHED_PATH_TTL_S,
                 retry_after_s: float = PUNCH_RETRY_AFTER_S) -> None:
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self._paths: dict[PeerId, PunchedPath] = {}
        self._failed: dict[PeerId, float] = {}

    def remember(self, peer: PeerId, endpoint: tuple[str, int], now: float) -> None:
        self._paths[peer] = PunchedPath(endpoint, now)
        self._failed.pop(peer, None)

    def used(self, peer: PeerId, now: float) -> None:
        path = self._paths.get(peer)
        if path is not None:
            path.at = now

    def get(self, peer: PeerId, now: float) -> tuple[str, int] | None:
        path = self._paths.get(peer)
        if path is None:
            return None
        if now - path.at > self.ttl_s:
            del self._paths[peer]
            return None
        return path.endpoint

    def forget(self, peer: PeerId) -> None:
        self._paths.pop(peer, None)

    def failed(self, peer: PeerId, now: float) -> None:
        self._paths.pop(peer, None)
        self._failed[peer] = now

    def should_punch(self, peer: PeerId, now: float) -> bool:
        """A relayed dial starts a punch unless a path is fresh or one failed lately."""
        if self.get(peer, now) is not None:
            return False
        failed = self._failed.get(peer)
        return failed is None or now - failed > self.retry_after_s

    def endpoints(self, now: float) -> dict[PeerId, tuple[str, int]]:
        return {p: e for p in list(self._paths) if (e := self.get(p, now)) is not None}

"""Reliable, ordered, message-oriented transport over datagrams, as a sans-IO state machine.

This is the whole UDP protocol of p2pfs (see the README, "The udp transport"): connection setup
with connection ids and a stateless cookie, sequence numbers, selective acknowledgements, an
RTO from measured RTT (RFC 6298 + Karn), SACK-based fast retransmit, a loss-tolerant AIMD
congestion window with pacing, a bounded receive window (flow control),
keepalive, idle timeout, graceful close and reset.

Like aioquic's ``QuicConnection`` it never touches a socket or a clock: bytes
enter through ``receive_datagram(data, now)``, leave through
``datagrams_to_send(now)``, time enters only as an argument (``get_timer()``,
``handle_timer(now)``) and what happened comes out of ``next_event()``.

Connection setup keeps the server stateless until the client proved it owns its
address (SCTP's INIT / INIT-ACK / COOKIE-ECHO; QUIC's Retry and TCP's SYN cookies
do the same): the ``Acceptor`` answers an INIT with an INIT_ACK carrying a cookie,
a keyed blake2b tag over (client address, port, both connection ids, datagram
size, issue time) under a secret it rotates every ``COOKIE_SECRET_ROTATION_S``.
Only a COOKIE_ECHO that returns a valid tag from the same address within
``COOKIE_LIFETIME_S`` creates a connection, already established. Spoofed INITs
therefore cost one MAC and one 40-byte reply each and leave nothing behind::

    client                                   server (Acceptor, then UdpConnection)
    INIT(scid, size), padded to 64 bytes ->  no state
                                          <- INIT_ACK(cids, size, issued, tag): 40 bytes
    COOKIE_ECHO(cids, size, issued, tag) ->  tag valid: connection created, ESTABLISHED
                                          <- ACK (the client is confirmed)

The client retransmits INIT until an INIT_ACK arrives, then COOKIE_ECHO until the
server answers; the server never retransmits during setup.

Must not import asyncio, socket, or any higher layer of the project; it imports
only ``node.errors`` and the size limit from ``node.transports.base``.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import ProtocolError
from node.transports.base import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# --- packet format -------------------------------------------------------------------
# the first byte of every packet names the wire version; anything else is dropped
# (version 1, 0xD1, had a stateful INIT_ACK and no cookie)
WIRE_VERSION = 2
MAGIC = 0xD0 + WIRE_VERSION
OLD_MAGICS: dict[int, int] = {0xD1: 1}  # magic -> wire version, to name an old peer's version
CID_BYTES = 8
(T_INIT, T_INIT_ACK, T_DATA, T_ACK, T_PING, T_CLOSE, T_CLOSE_ACK, T_RESET,
 T_COOKIE_ECHO) = range(1, 10)

_HDR = struct.Struct(">BB8s")  # magic, type, destination connection id
HEADER_BYTES = _HDR.size  # 10
_INIT = struct.Struct(">BB8s8sH")  # + source cid, datagram size
COOKIE_TAG_BYTES = 16
# INIT_ACK: magic, type, client cid, server cid, datagram size, issue time (ms), tag
_INIT_ACK = struct.Struct(f">BB8s8sHI{COOKIE_TAG_BYTES}s")  # 40 bytes
# COOKIE_ECHO: magic, type, server cid, client cid, size, issue time, tag, retransmissions
_ECHO = struct.Struct(f">BB8s8sHI{COOKIE_TAG_BYTES}sB")  # 41 bytes
# INIT is zero-padded to more than the one reply it can cause (an INIT_ACK),
# so spoofed INITs cannot use us as an amplifier
INIT_BYTES = 64
COOKIE_SECRET_BYTES = 32
COOKIE_LIFETIME_S = 10.0  # a cookie older than this is refused (the client then gives up)
COOKIE_SECRET_ROTATION_S = 60.0  # the secret before the current one is still accepted
_COOKIE_PERSON = b"p2pfs-udp-cookie"
_MS_MASK = 0xFFFFFFFF
_SEQ = struct.Struct(">Q")
DATA_HEADER_BYTES = HEADER_BYTES + _SEQ.size  # 18
_ACK = struct.Struct(">BB8sQIIQH")  # + cumulative, rwnd packets, ack delay us, largest, n ranges
_RANGE = struct.Struct(">II")  # [cum + start, cum + end) received out of order

MIN_DATAGRAM_BYTES = 576
DEFAULT_DATAGRAM_BYTES = 1452
MAX_DATAGRAM_BYTES = 65000
# Between two addresses on loopback (MTU 65536, nothing in between to drop a big datagram) the
# automatic size is the largest one: ~45x fewer packets, ACKs and Python calls per byte than
# 1452 (measured: sender 0.9 instead of 2.9 CPU ms/MiB). Anywhere else it stays
# DEFAULT_DATAGRAM_BYTES, which fits a 1500-byte Ethernet path: this transport does not probe
# the path MTU, so it never guesses above that.
LOOPBACK_DATAGRAM_BYTES = MAX_DATAGRAM_BYTES
MESSAGE_LENGTH = struct.Struct(">I")  # every message in the byte stream is u32-length-prefixed

# --- timing --------------------------------------------------------------------------
INITIAL_RTO_S = 0.25
MIN_RTO_S = 0.04
MAX_RTO_S = 8.0
CLOCK_GRANULARITY_S = 0.001
MAX_ACK_DELAY_S = 0.004
ACK_EVERY_PACKETS = 16
KEEPALIVE_S = 5.0
IDLE_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # how long a graceful close may take to drain our queued data
CLOSE_RETRIES = 3
MAX_RTO_BACKOFFS = 10
MIN_PROBE_TIMEOUT_S = 0.01
PROBE_TIMEOUTS = 2  # the first timeouts only probe (tail loss probe); later ones collapse cwnd

# --- windows -------------------------------------------------------------------------
RECV_WINDOW_BYTES = 4 * 1024 * 1024  # out-of-order + delivered-but-unread bytes; <= socket buffer
# before the channel layer says the peer authenticated (``end_preauth``), a server
# connection takes handshake-sized messages into a small window: its memory is bounded
# by about 2 x the window + the message limit, whatever the peer sends
MAX_PREAUTH_MESSAGE_BYTES = 4 * 1024
PREAUTH_RECV_WINDOW_BYTES = 16 * 1024
PREAUTH_WINDOW_DATAGRAMS = 2  # the window holds at least this many full datagrams
INITIAL_CWND_PACKETS = 32
MIN_CWND_PACKETS = 4
MAX_PEER_WINDOW_PACKETS = 65536
MAX_SACK_RANGES = 1024  # also limited by what fits in one datagram
REORDER_THRESHOLD_PACKETS = 3
LOSS_TOLERANCE_FRACTION = 0.2  # random loss below this per round is not congestion
LOSS_SAMPLE_MIN_PACKETS = 32  # a round is judged only once it has seen this many packets
PACING_GAIN = 2.0
PACING_BURST_PACKETS = 64
# a message at least this large is reassembled straight into a buffer of its own size
# (``message_buffer``) as its packets arrive and delivered as that bytearray: one copy of
# it is ever held, not a growing stream buffer plus the bytes cut out of it
DIRECT_MESSAGE_MIN_BYTES = 64 * 1024


class State(enum.Enum):
    INIT_SENT = "init-sent"  # client: INIT sent, waiting for INIT_ACK
    ESTABLISHED = "established"  # (a server connection starts here: its cookie came back)
    CLOSING = "closing"  # we asked to close: drain our data, then CLOSE, wait CLOSE_ACK
    CLOSED = "closed"


_ALLOWED: dict[State, frozenset[State]] = {
    State.INIT_SENT: frozenset({State.ESTABLISHED, State.CLOSED}),
    State.ESTABLISHED: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Connected:
    pass


@dataclass(frozen=True, slots=True)
class MessageReceived:
    data: bytes | bytearray  # a bytearray (the receiver's own) for a large message


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event = Connected | MessageReceived | Closed


def new_cid() -> bytes:
    return os.urandom(CID_BYTES)


@dataclass(frozen=True, slots=True)
class Init:
    """A client's INIT: its connection id and the largest datagram it accepts."""

    client_cid: bytes
    datagram_bytes: int


def parse_init(data: bytes) -> Init | None:
    """The INIT in `data`, or None if it is not one (unpadded INITs are not)."""
    if len(data) != INIT_BYTES:
        return None
    magic, ptype, _dcid, scid, size = _INIT.unpack_from(data)
    if magic != MAGIC or ptype != T_INIT:
        return None
    if not MIN_DATAGRAM_BYTES <= size <= MAX_DATAGRAM_BYTES:
        return None
    return Init(scid, size)


def old_wire_version(data: bytes) -> int | None:
    """The wire version of an INIT from a peer speaking an older version, else None."""
    if len(data) == INIT_BYTES and data[1] == T_INIT:
        return OLD_MAGICS.get(data[0])
    return None


def is_loopback(addr: Any) -> bool:
    """Whether a socket address (host, port, ...) is on loopback (127/8, ::1, ::ffff:127/104)."""
    try:
        ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except (ValueError, IndexError, TypeError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def auto_datagram_bytes(addr: Any) -> int:
    """The datagram size a client proposes to `addr` when the caller named none."""
    return LOOPBACK_DATAGRAM_BYTES if is_loopback(addr) else DEFAULT_DATAGRAM_BYTES


def _ms(now: float) -> int:
    return int(now * 1000) & _MS_MASK


def _addr_bytes(addr: Any) -> bytes:
    """The (host, port) of a socket address as bytes; IPv6 flow info and scope are not."""
    return f"{addr[0]}|{int(addr[1])}".encode()


class Acceptor:
    """Server side of connection setup: answers INITs without keeping any state and
    creates a connection only when a valid cookie comes back from the same address.

    Its only state is the secret pair, which is not per connection: however many
    INITs it answered, it holds the same few bytes. ``random_bytes`` is injectable
    for known-answer tests.
    """

    __slots__ = ("datagram_bytes", "loopback_datagram_bytes", "lifetime_s", "rotation_s",
                 "_random", "_secret", "_previous", "_rotated_at", "forged_cookies",
                 "expired_cookies")

    def __init__(self, now: float, *, datagram_bytes: int | None = DEFAULT_DATAGRAM_BYTES,
                 lifetime_s: float = COOKIE_LIFETIME_S,
                 rotation_s: float = COOKIE_SECRET_ROTATION_S,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        """``datagram_bytes`` is the largest datagram a connection may use; None means
        automatic: LOOPBACK_DATAGRAM_BYTES for a client on loopback, else the default."""
        self.loopback_datagram_bytes = LOOPBACK_DATAGRAM_BYTES if datagram_bytes is None \
            else datagram_bytes
        if datagram_bytes is None:
            datagram_bytes = DEFAULT_DATAGRAM_BYTES
        if not MIN_DATAGRAM_BYTES <= datagram_bytes <= MAX_DATAGRAM_BYTES:
            raise ValueError(f"datagram size must be {MIN_DATAGRAM_BYTES}..{MAX_DATAGRAM_BYTES}")
        if not 0 < lifetime_s <= rotation_s:
            raise ValueError("a cookie must expire before its secret is forgotten")
        self.datagram_bytes = datagram_bytes
        self.lifetime_s = lifetime_s
        self.rotation_s = rotation_s
        self._random = random_bytes
        self._secret = random_bytes(COOKIE_SECRET_BYTES)
        self._previous: bytes | None = None
        self._rotated_at = now
        self.forged_cookies = 0  # COOKIE_ECHOs whose tag did not verify (or wrong address)
        self.expired_cookies = 0

    def _cap(self, addr: Any) -> int:
        return self.loopback_datagram_bytes if is_loopback(addr) else self.datagram_bytes

    def _rotate(self, now: float) -> None:
        if now - self._rotated_at < self.rotation_s:
            return
        # after a long quiet spell the old secret is useless too: its cookies have expired
        stale = now - self._rotated_at >= 2 * self.rotation_s
        self._previous = None if stale else self._secret
        self._secret = self._random(COOKIE_SECRET_BYTES)
        self._rotated_at = now

    @staticmethod
    def _tag(secret: bytes, addr: Any, client_cid: bytes, server_cid: bytes, size: int,
             issued_ms: int) -> bytes:
        msg = b"".join((_addr_bytes(addr), b"\0", client_cid, server_cid,
                        struct.pack(">HI", size, issued_ms)))
        return hashlib.blake2b(msg, key=secret, digest_size=COOKIE_TAG_BYTES,
                               person=_COOKIE_PERSON).digest()

    def answer_init(self, data: bytes, addr: Any, now: float) -> bytes | None:
        """The INIT_ACK (with its cookie) for an INIT from `addr`, or None if `data` is
        not an INIT. Nothing is remembered."""
        init = parse_init(data)
        if init is None:
            return None
        self._rotate(now)
        server_cid = self._random(CID_BYTES)
        size = min(init.datagram_bytes, self._cap(addr))
        issued = _ms(now)
        tag = self._tag(self._secret, addr, init.client_cid, server_cid, size, issued)
        return _INIT_ACK.pack(MAGIC, T_INIT_ACK, init.client_cid, server_cid, size, issued, tag)

    def accept_echo(self, data: bytes, addr: Any, now: float, *, preauth: bool = False,
                    idle_timeout_s: float = IDLE_TIMEOUT_S,
                    keepalive_s: float = KEEPALIVE_S) -> UdpConnection | None:
        """A new established server connection if `data` is a COOKIE_ECHO whose cookie
        this acceptor issued to `addr` less than ``lifetime_s`` ago, else None.
        ``preauth`` starts it with the pre-authentication receive limits."""
        if len(data) != _ECHO.size:
            return None
        magic, ptype, server_cid, client_cid, size, issued, tag, tries = _ECHO.unpack(data)
        if magic != MAGIC or ptype != T_COOKIE_ECHO:
            return None
        if not MIN_DATAGRAM_BYTES <= size <= self._cap(addr):
            self.forged_cookies += 1
            return None
        self._rotate(now)
        age_ms = (_ms(now) - issued) & _MS_MASK  # a time from the future reads as very old
        if age_ms > self.lifetime_s * 1000:
            self.expired_cookies += 1
            return None
        for secret in (self._secret, self._previous):
            if secret is not None and hmac.compare_digest(
                    tag, self._tag(secret, addr, client_cid, server_cid, size, issued)):
                break
        else:
            self.forged_cookies += 1
            return None
        return UdpConnection(is_client=False, local_cid=server_cid, peer_cid=client_cid,
                             datagram_bytes=size, now=now,
                             handshake_rtt_s=age_ms / 1000 if tries == 0 else None,
                             preauth=preauth, idle_timeout_s=idle_timeout_s,
                             keepalive_s=keepalive_s)


class UdpConnection:
    """One end of one connection. Build with ``client()`` or ``server()``."""

    def __init__(self, *, is_client: bool, local_cid: bytes, peer_cid: bytes,
                 datagram_bytes: int, now: float, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 keepalive_s: float = KEEPALIVE_S,
                 handshake_rtt_s: float | None = None, preauth: bool = False) -> None:
        if not MIN_DATAGRAM_BYTES <= datagram_bytes <= MAX_DATAGRAM_BYTES:
            raise ValueError(f"datagram size must be {MIN_DATAGRAM_BYTES}..{MAX_DATAGRAM_BYTES}")
        self.is_client = is_client
        self.local_cid = local_cid
        self.peer_cid = peer_cid
        self.datagram_bytes = datagram_bytes
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self.state = State.INIT_SENT if is_client else State.ESTABLISHED
        self.close_reason = ""
        self.dropped_datagrams = 0  # garbage / unexpected / out-of-window datagrams
        self.retransmitted_packets = 0
        self.rto_count = 0
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []  # control datagrams waiting for datagrams_to_send
        self._created = now
        self._last_recv = now
        self._last_send = now
        # --- sender
        self._send_queue: deque[memoryview] = deque()
        self._queued_bytes = 0
        self._next_seq = 0
        self._snd_una = 0  # lowest seq not cumulatively acked
        self._inflight: OrderedDict[int, tuple[int, float, bytes, bool]] = OrderedDict()
        self._inflight_bytes = 0
        self._lost: OrderedDict[int, bytes] = OrderedDict()
        self._lost_bytes = 0
        self._sacked_seen: dict[int, int] = {}  # SACK range end -> lowest start processed
        self._tx_counter = 0
        self._largest_acked_tx = -1
        self._peer_rwnd = 64  # packets; the first ACK tells the real one
        self.cwnd = float(INITIAL_CWND_PACKETS)
        self.ssthresh = float("inf")
        self._round_end_tx = 0
        self._round_acked = 0
        self._round_lost = 0
        self._pacing_tokens = float(PACING_BURST_PACKETS)
        self._pacing_last = now
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO_S
        self.pto = INITIAL_RTO_S
        self.probe_count = 0
        self._backoffs = 0
        self._rto_deadline: float | None = None
        self._ctrl_deadline: float | None = None  # INIT / INIT_ACK / CLOSE retransmission
        self._ctrl_tries = 0
        self._close_sent = False
        self._probe_credit = 0
        self._confirmed = not is_client  # client: has the server shown it is established?
        self._persist_deadline: float | None = None
        # --- receiver
        self._rcv_next = 0
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._range_starts: list[int] = []
        self._range_ends: list[int] = []
        self._stream = bytearray()  # in-order bytes not yet parsed into small messages
        self._msg_need = 0  # total length (with prefix) of the message being reassembled
        # the large message being reassembled in place, and how much of it arrived
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._big_got = 0
        # allocates the buffer a large message is reassembled in (the driver may pool them)
        self.message_buffer: Callable[[int], bytearray] = bytearray
        self._unread_bytes = 0
        self._ack_pending = 0
        self._ack_now = False
        self._ack_deadline: float | None = None
        self._largest_rcv = -1
        self._largest_rcv_time = now
        self._advertised_rwnd = 0
        self._payload_max = datagram_bytes - DATA_HEADER_BYTES
        self._data_prefix = bytes((MAGIC, T_DATA)) + peer_cid
        self._data_header_in = bytes((MAGIC, T_DATA)) + local_cid
        self.preauth = preauth
        self._set_receive_limits()
        self._cookie = b""  # client: the server's cookie (issue time + tag) to echo
        if is_client:
            self._queue_init(now)
        else:
            # created from a returned cookie: established at once; the ACK confirms the client
            if handshake_rtt_s is not None:
                self._rtt_sample(handshake_rtt_s, 0.0)
            self._ack_now = True
            self._events.append(Connected())

    # --- construction -----------------------------------------------------------------
    @classmethod
    def client(cls, now: float, *, datagram_bytes: int = DEFAULT_DATAGRAM_BYTES,
               idle_timeout_s: float = IDLE_TIMEOUT_S,
               keepalive_s: float = KEEPALIVE_S) -> UdpConnection:
        return cls(is_client=True, local_cid=new_cid(), peer_cid=bytes(CID_BYTES),
                   datagram_bytes=datagram_bytes, now=now, idle_timeout_s=idle_timeout_s,
                   keepalive_s=keepalive_s)


    def _set_receive_limits(self) -> None:
        if self.preauth:
            self._recv_window = max(PREAUTH_RECV_WINDOW_BYTES,
                                    PREAUTH_WINDOW_DATAGRAMS * self._payload_max)
            self._max_message = MAX_PREAUTH_MESSAGE_BYTES
        else:
            self._recv_window = RECV_WINDOW_BYTES
            self._max_message = MAX_MESSAGE_BYTES
        self._window_packets = max(16, self._recv_window // self._payload_max)

    def end_preauth(self) -> bool:
        """The peer authenticated: full-size messages and the full receive window.

        Returns True when the larger window should be advertised now (call
        datagrams_to_send)."""
        if not self.preauth:
            return False
        self.preauth = False
        self._set_receive_limits()
        if self.state is State.CLOSED:
            return False
        self._ack_now = True
        return True

    # --- state ------------------------------------------------------------------------
    def _set_state(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"illegal udp transition {self.state.value} -> {new.value}")
        log.debug("udp %s: %s -> %s", self.local_cid.hex(), self.state.value, new.value)
        self.state = new

    def _finish(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._set_state(State.CLOSED)
        self.close_reason = reason
        self._send_queue.clear()
        self._inflight.clear()
        self._lost.clear()
        self._ooo.clear()
        self._stream = bytearray()
        self._drop_big()
        self._events.append(Closed(reason))

    @property
    def is_closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def send_buffered_bytes(self) -> int:
        """Bytes queued or unacknowledged: what backpressure is measured on."""
        return self._queued_bytes + self._inflight_bytes + self._lost_bytes

    # --- application API --------------------------------------------------------------
    def send_message(self, data: bytes | bytearray) -> None:
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        if self.state in (State.CLOSING, State.CLOSED):
            raise RuntimeError(f"cannot send on a {self.state.value} udp connection")
        self._send_queue.append(memoryview(MESSAGE_LENGTH.pack(len(data))))
        if data:
            self._send_queue.append(memoryview(data))
        self._queued_bytes += MESSAGE_LENGTH.size + len(data)

    def message_consumed(self, nbytes: int) -> bool:
        """The application read a delivered message: reopen that much receive window.

        Returns True when a window update should be sent now (call datagrams_to_send).
        """
        self._unread_bytes = max(0, self._unread_bytes - nbytes)
        if self._ack_now or self.state is State.CLOSED:
            return False
        # window update once it grew by a quarter since we last advertised it (the sender
        # may be stalled on the old value); smaller steps ride on the next regular ack
        if self._rwnd_packets() - self._advertised_rwnd >= max(2, self._window_packets // 4):
            self._ack_now = True
            return True
        return False

    def close(self, now: float) -> None:
        """Graceful close: deliver what is queued, then CLOSE."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state is State.INIT_SENT:
            self._finish("closed locally")
            return
        self._set_state(State.CLOSING)
        self._ctrl_deadline = now + CLOSE_TIMEOUT_S  # overall drain limit
        self._maybe_send_close(now)

    def reset(self, reason: str = "reset locally") -> None:
        if self.state is State.CLOSED:
            return
        if self.state is not State.INIT_SENT:
            self._out.append(_HDR.pack(MAGIC, T_RESET, self.peer_cid))
        self._finish(reason)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- input ------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one datagram. Invalid or unexpected datagrams are counted and dropped."""
        self.receive_datagrams((data,), now)

    def receive_datagrams(self, dgrams: Sequence[bytes], now: float) -> None:
        """Feed a batch (e.g. one GRO read). Same as one receive_datagram per item, but
        in-order data takes a short path and the byte stream is parsed once per batch."""
        try:
            self._receive_batch(dgrams, now)
            if self._stream and self.state is not State.CLOSED:
                self._parse_stream()
        except ProtocolError as exc:
            self.reset(f"protocol error from peer: {exc}")

    def _receive_batch(self, dgrams: Sequence[bytes], now: float) -> None:
        if not ((self.state is State.ESTABLISHED or self.state is State.CLOSING)
                and self._confirmed):
            for d in dgrams:
                self._receive_one(d, now)
                if self.state is State.CLOSED:
                    return
            return
        hdr = self._data_header_in
        maxlen = self.datagram_bytes
        unpack_seq = _SEQ.unpack_from
        starts = self._range_starts
        stream = self._stream
        limit = self._recv_window + self._max_message - self._unread_bytes
        rcv_next = self._rcv_next
        in_order = 0
        for d in dgrams:
            if d.startswith(hdr) and DATA_HEADER_BYTES < len(d) <= maxlen:
                seq = unpack_seq(d, HEADER_BYTES)[0]
                if seq == rcv_next and not starts and len(stream) + self._big_got <= limit:
                    # the common case: the next packet in order, no holes; bookkeeping
                    # is settled once per batch in _note_in_order
                    payload = memoryview(d)[DATA_HEADER_BYTES:]
                    big = self._big_view
                    got = self._big_got
                    if big is not None and len(payload) < len(big) - got:
                        big[got:got + len(payload)] = payload  # inside a large message
                        self._big_got = got + len(payload)
                    else:
                        self._deposit(payload)
                        limit = self._recv_window + self._max_message - self._unread_bytes
                    rcv_next += 1
                    in_order += 1
                    continue
                if in_order:
                    self._note_in_order(in_order, rcv_next, now)
                    in_order = 0
                self._last_recv = now
                self._receive_data(seq, d[DATA_HEADER_BYTES:], now)
            else:
                if in_order:
                    self._note_in_order(in_order, rcv_next, now)
                    in_order = 0
                self._receive_one(d, now)
                if self.is_closed:
                    return
            rcv_next = self._rcv_next
            stream = self._stream
            limit = self._recv_window + self._max_message - self._unread_bytes
        if in_order:
            self._note_in_order(in_order, rcv_next, now)

    def _note_in_order(self, count: int, rcv_next: int, now: float) -> None:
        self._rcv_next = rcv_next
        if rcv_next - 1 > self._largest_rcv:
            self._largest_rcv = rcv_next - 1
            self._largest_rcv_time = now
        self._last_recv = now
        self._ack_pending += count
        if self._ack_deadline is None:
            self._ack_deadline = now + MAX_ACK_DELAY_S
        if self._ack_pending >= ACK_EVERY_PACKETS:
            self._ack_now = True

    def _receive_one(self, d: bytes, now: float) -> None:
        try:
            if not self._receive(d, now):
                self.dropped_datagrams += 1
        except (struct.error, IndexError, ValueError):
            self.dropped_datagrams += 1

    def _receive(self, data: bytes, now: float) -> bool:
        n = len(data)
        if n < HEADER_BYTES or n > self.datagram_bytes or data[0] != MAGIC:
            return False
        ptype = data[1]
        if self.state is State.CLOSED:
            return False
        if ptype == T_INIT_ACK:
            return self._receive_init_ack(data, now)
        if data[2:10] != self.local_cid:
            return False
        if self.state is State.INIT_SENT:
            return False  # the server cannot know our cid's pairing before INIT_ACK
        if ptype == T_COOKIE_ECHO:
            # a repeated echo (our ACK was lost): the Acceptor made us from the first one
            if self.is_client or n != _ECHO.size:
                return False
            self._last_recv = now
            self._ack_now = True
            return True
        if not self._confirmed:
            # anything from the server under our cid proves it reached ESTABLISHED
            self._confirmed = True
            if self.state is State.ESTABLISHED:
                self._ctrl_deadline = None
        if ptype == T_DATA:
            if n <= DATA_HEADER_BYTES:
                return False
            self._last_recv = now
            self._receive_data(_SEQ.unpack_from(data, HEADER_BYTES)[0], data[DATA_HEADER_BYTES:],
                               now)
            return True
        if ptype == T_ACK:
            ok = self._receive_ack(data, now)
            if ok:
                self._last_recv = now
            return ok
        if n != HEADER_BYTES:
            return False
        self._last_recv = now
        if ptype == T_PING:
            self._ack_now = True
        elif ptype == T_CLOSE:
            # CLOSE comes only after all the peer's data was acked, so all is delivered
            self._out.append(_HDR.pack(MAGIC, T_CLOSE_ACK, self.peer_cid))
            self._finish("closed by peer")
        elif ptype == T_CLOSE_ACK:
            if self.state is not State.CLOSING or not self._close_sent:
                return False
            self._finish("closed")
        elif ptype == T_RESET:
            self._finish("reset by peer")
        else:
            return False
        return True

    def _receive_init_ack(self, data: bytes, now: float) -> bool:
        if len(data) != _INIT_ACK.size or not self.is_client:
            return False
        _, _, dcid, scid, size, issued, tag = _INIT_ACK.unpack(data)
        if dcid != self.local_cid or not MIN_DATAGRAM_BYTES <= size <= MAX_DATAGRAM_BYTES:
            return False
        if self.state is State.INIT_SENT:
            if size > self.datagram_bytes:
                return False
            self.peer_cid = scid
            self._cookie = struct.pack(">I", issued) + tag
            self._data_prefix = bytes((MAGIC, T_DATA)) + scid
            self.datagram_bytes = size
            self._payload_max = size - DATA_HEADER_BYTES
            self._set_receive_limits()
            if self._ctrl_tries == 0:  # Karn: time the handshake only if INIT went once
                self._rtt_sample(now - self._created, 0.0)
            self._ctrl_tries = 0
            self._last_recv = now
            self._set_state(State.ESTABLISHED)
            self._events.append(Connected())
        elif scid != self.peer_cid:
            return False
        if not self._confirmed:
            self._queue_confirm(now)
        return True

    def _receive_data(self, seq: int, payload: bytes, now: float) -> None:
        rcv_next = self._rcv_next
        if seq > self._largest_rcv:
            self._largest_rcv = seq
            self._largest_rcv_time = now
        self._ack_pending += 1
        if self._ack_deadline is None:
            self._ack_deadline = now + MAX_ACK_DELAY_S
        if seq == rcv_next:
            if self._unread_bytes + len(self._stream) + self._big_got > \
                    self._recv_window + self._max_message:
                self.dropped_datagrams += 1  # the peer ignores our window
                return
            self._deposit(payload)
            rcv_next += 1
            starts = self._range_starts
            if starts and starts[0] == rcv_next:
                end = self._range_ends[0]
                ooo = self._ooo
                for s in range(rcv_next, end):
                    p = ooo.pop(s)
                    self._ooo_bytes -= len(p)
                    self._deposit(p)
                rcv_next = end
                del starts[0]
                del self._range_ends[0]
                self._ack_now = True  # a hole was filled: tell the sender promptly
            self._rcv_next = rcv_next
            if self._ack_pending >= ACK_EVERY_PACKETS:
                self._ack_now = True
            return
        if seq < rcv_next or seq in self._ooo:
            self._ack_now = True  # duplicate: our ack was probably lost
            return
        # memory bound: out-of-order bytes <= the receive window; unread + partial message
        # bytes are bounded separately on the in-order path (window races stay loss-free)
        if seq - rcv_next >= self._window_packets or \
                self._ooo_bytes + len(payload) > self._recv_window:
            self.dropped_datagrams += 1
            return
        self._ooo[seq] = payload
        self._ooo_bytes += len(payload)
        starts, ends = self._range_starts, self._range_ends
        if ends and ends[-1] == seq:  # the usual case: extends the newest range
            ends[-1] = seq + 1
            return
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and ends[i] == seq:
            ends[i] = seq + 1
            if i + 1 < len(starts) and starts[i + 1] == seq + 1:
                ends[i] = ends[i + 1]
                del starts[i + 1]
                del ends[i + 1]
        elif i + 1 < len(starts) and starts[i + 1] == seq + 1:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq + 1)
            self._ack_now = True  # a new hole: SACK it at once for fast retransmit

    def _deposit(self, payload: bytes | memoryview) -> None:
        """Take the next in-order payload bytes: into the large message being reassembled
        while it lasts, the rest onto the stream (parsed after the batch)."""
        big = self._big_view
        if big is not None:
            got = self._big_got
            n = min(len(payload), len(big) - got)
            big[got:got + n] = payload[:n]
            got += n
            if got < len(big):
                self._big_got = got
                return
            msg = self._big
            self._drop_big()
            assert msg is not None
            self._deliver(msg)
            payload = payload[n:]
            if not payload:
                return
        self._stream += payload

    def _deliver(self, msg: bytes | bytearray) -> None:
        self._unread_bytes += len(msg)
        self._events.append(MessageReceived(msg))

    def _drop_big(self) -> None:
        if self._big_view is not None:
            self._big_view.release()
        self._big = self._big_view = None
        self._big_got = 0

    def _parse_stream(self) -> None:
        stream = self._stream
        while True:
            need = self._msg_need
            if need == 0:
                if len(stream) < 4:
                    return
                length = MESSAGE_LENGTH.unpack_from(stream)[0]
                if length > self._max_message:
                    before = " before authenticating" if self.preauth else ""
                    raise ProtocolError(f"peer sent a {length}-byte message{before}; limit "
                                        f"is {self._max_message}")
                need = self._msg_need = 4 + length
            if need - 4 >= DIRECT_MESSAGE_MIN_BYTES:
                # a large message goes into a buffer of its own: what the stream holds of it
                # now (all of it, if it arrived whole in one batch or once a loss was
                # repaired), and the rest straight from the packets as they come (_deposit)
                big = self.message_buffer(need - 4)
                got = min(len(stream), need) - 4
                with memoryview(stream) as head, memoryview(big) as into:
                    into[:got] = head[4:4 + got]
                del stream[:4 + got]
                self._msg_need = 0
                if got < len(big):
                    self._big, self._big_view, self._big_got = big, memoryview(big), got
                    return
                self._deliver(big)
                continue
            if len(stream) < need:
                return
            view = memoryview(stream)
            msg = bytes(view[4:need])  # one copy, not two
            view.release()
            del stream[:need]
            self._msg_need = 0
            self._deliver(msg)

    def _receive_ack(self, data: bytes, now: float) -> bool:
        if len(data) < _ACK.size:
            return False
        _, _, _, cum, rwnd, delay_us, largest, nranges = _ACK.unpack_from(data)
        if len(data) != _ACK.size + nranges * _RANGE.size or nranges > MAX_SACK_RANGES:
            return False
        if cum > self._next_seq or largest > self._next_seq:
            return False
        if nranges:  # validate every range before acting on any
            flat = struct.unpack_from(f">{2 * nranges}I", data, _ACK.size)
            limit = self._next_seq - cum
            for i in range(0, 2 * nranges, 2):
                if flat[i] >= flat[i + 1] or flat[i + 1] > limit:
                    return False
        largest -= 1  # on the wire: largest received + 1, so 0 means "none yet"
        # a window claim larger than any honest receiver's only stretches our bookkeeping
        self._peer_rwnd = min(rwnd, MAX_PEER_WINDOW_PACKETS)
        inflight = self._inflight
        lost = self._lost
        newly = 0
        newly_bytes = 0
        max_tx = -1
        sample_rec = None
        if cum > self._snd_una:
            for seq in range(self._snd_una, cum):
                rec = inflight.pop(seq, None)
                if rec is not None:
                    newly += 1
                    newly_bytes += len(rec[2])
                    max_tx = max(max_tx, rec[0])
                    if seq == largest:
                        sample_rec = rec
                elif seq in lost:
                    self._lost_bytes -= len(lost.pop(seq))
            self._snd_una = cum
        off = _ACK.size
        seen = self._sacked_seen
        for _ in range(nranges):
            a, b = _RANGE.unpack_from(data, off)
            off += _RANGE.size
            a += cum
            b += cum
            # ranges repeat from ack to ack: skip the part already processed
            lo = seen.get(b)
            seen[b] = a if lo is None or a < lo else lo
            if lo is not None:
                if lo <= a:
                    continue
                b = lo
            for seq in range(a, b):
                rec = inflight.pop(seq, None)
                if rec is not None:
                    newly += 1
                    newly_bytes += len(rec[2])
                    max_tx = max(max_tx, rec[0])
                    if seq == largest:
                        sample_rec = rec
                elif lost and seq in lost:
                    self._lost_bytes -= len(lost.pop(seq))
        if len(seen) > 8 * MAX_SACK_RANGES:
            seen = {e: st for e, st in seen.items() if e > cum}
            # only an optimisation: a peer that keeps it large gets it forgotten
            self._sacked_seen = seen if len(seen) <= 8 * MAX_SACK_RANGES else {}
        if not newly:
            return True
        self._inflight_bytes -= newly_bytes
        self._backoffs = 0
        if sample_rec is not None and not sample_rec[3]:  # Karn: never time a retransmission
            self._rtt_sample(now - sample_rec[1], delay_us / 1e6)
        self._largest_acked_tx = max(self._largest_acked_tx, max_tx)
        # congestion window growth
        if self.cwnd < self.ssthresh:
            self.cwnd += newly
        else:
            self.cwnd += newly / self.cwnd
        cap = float(self._window_packets)
        self.cwnd = min(self.cwnd, cap)
        self._round_acked += newly
        self._detect_losses()
        if self._largest_acked_tx >= self._round_end_tx:
            self._end_round()
        # RFC 6298 5.3: restart the timer when new data is acknowledged
        self._rto_deadline = now + self._timeout() if inflight else None
        return True

    def _rtt_sample(self, rtt: float, ack_delay: float) -> None:
        if rtt <= 0:
            return
        if rtt - ack_delay >= CLOCK_GRANULARITY_S:
            rtt -= min(ack_delay, MAX_ACK_DELAY_S)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        base = self.srtt + max(CLOCK_GRANULARITY_S, 4 * self.rttvar) + MAX_ACK_DELAY_S
        self.rto = min(MAX_RTO_S, max(MIN_RTO_S, base))
        self.pto = min(MAX_RTO_S, max(MIN_PROBE_TIMEOUT_S, base))

    def _timeout(self) -> float:
        """Current retransmission timeout: probe timeout first, then the RTO, backed off."""
        base = self.pto if self._backoffs < PROBE_TIMEOUTS else self.rto
        return min(MAX_RTO_S, base * float(2 ** self._backoffs))

    def _detect_losses(self) -> None:
        """A packet is lost once packets sent REORDER_THRESHOLD later were acked (SACK)."""
        inflight = self._inflight
        limit = self._largest_acked_tx - REORDER_THRESHOLD_PACKETS
        while inflight:
            seq = next(iter(inflight))
            rec = inflight[seq]
            if rec[0] > limit:
                break
            del inflight[seq]
            self._inflight_bytes -= len(rec[2])
            self._lost[seq] = rec[2]
            self._lost_bytes += len(rec[2])
            self._round_lost += 1

    def _end_round(self) -> None:
        total = self._round_acked + self._round_lost
        if total < LOSS_SAMPLE_MIN_PACKETS:
            return  # too few packets to tell noise from congestion: keep counting
        if self._round_lost / total > LOSS_TOLERANCE_FRACTION:
            # congestion, not noise: multiplicative decrease, once per round
            self.ssthresh = max(float(MIN_CWND_PACKETS), self.cwnd / 2)
            self.cwnd = self.ssthresh
        self._round_acked = self._round_lost = 0
        self._round_end_tx = self._tx_counter

    # --- timers -----------------------------------------------------------------------
    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        t = self._last_recv + self.idle_timeout_s
        if self.state is State.ESTABLISHED:
            t = min(t, self._last_send + self.keepalive_s)
        for d in (self._rto_deadline, self._ctrl_deadline, self._ack_deadline,
                  self._persist_deadline):
            if d is not None and d < t:
                t = d
        if (self._lost or self._send_queue) and self._pacing_tokens < 1 and self._can_send():
            t = min(t, self._pacing_last + self._pacing_interval())
        return t

    def handle_timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if now >= self._last_recv + self.idle_timeout_s:
            self._finish("idle timeout: no packet from the peer for "
                         f"{self.idle_timeout_s:g} s")
            return
        if self._ctrl_deadline is not None and now >= self._ctrl_deadline:
            self._on_ctrl_timeout(now)
            if self.is_closed:
                return
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_rto(now)
            if self.is_closed:
                return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_now = True
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._out.append(_HDR.pack(MAGIC, T_PING, self.peer_cid))
        if self.state is State.ESTABLISHED and now >= self._last_send + self.keepalive_s:
            self._out.append(_HDR.pack(MAGIC, T_PING, self.peer_cid))

    def _on_ctrl_timeout(self, now: float) -> None:
        self._ctrl_tries += 1
        if self.state is State.INIT_SENT:
            if now - self._created >= HANDSHAKE_TIMEOUT_S:
                self._finish("handshake timeout")
            else:
                self._queue_init(now)
        elif self.state is State.CLOSING:
            if self._close_sent and self._ctrl_tries <= CLOSE_RETRIES:
                self._out.append(_HDR.pack(MAGIC, T_CLOSE, self.peer_cid))
                self._ctrl_deadline = now + min(MAX_RTO_S, self.rto * 2 ** self._ctrl_tries)
            elif self._close_sent:
                self._finish("closed (peer did not confirm)")
            else:
                self.reset("close timed out: the peer did not acknowledge queued data")
        elif self.state is State.ESTABLISHED and not self._confirmed:
            self._queue_confirm(now)
        else:
            self._ctrl_deadline = None

    def _queue_confirm(self, now: float) -> None:
        """Client: the COOKIE_ECHO makes the server create its connection, and its ACK
        tells us so; repeated until something arrives from the server (the server keeps
        nothing before it, so only we can repeat it)."""
        self._out.append(_ECHO.pack(MAGIC, T_COOKIE_ECHO, self.peer_cid, self.local_cid,
                                    self.datagram_bytes, *struct.unpack(">I", self._cookie[:4]),
                                    self._cookie[4:], min(self._ctrl_tries, 255)))
        self._ctrl_deadline = now + min(MAX_RTO_S, self.rto * 2 ** min(self._ctrl_tries, 8))

    def _on_rto(self, now: float) -> None:
        self._rto_deadline = None
        if not self._inflight:
            return
        self._backoffs += 1
        if self._backoffs > MAX_RTO_BACKOFFS:
            self._finish(f"peer stopped acknowledging ({MAX_RTO_BACKOFFS} retransmission "
                         "timeouts)")
            return
        if self._backoffs <= PROBE_TIMEOUTS:
            # tail loss probe: resend the oldest unacked packet and keep the window; its
            # ack lets SACK loss detection find whatever else was lost
            self.probe_count += 1
            self._probe_credit = 1  # the probe goes out even if the window is full
            seq, rec = self._inflight.popitem(last=False)
            self._inflight_bytes -= len(rec[2])
            self._lost[seq] = rec[2]
            self._lost_bytes += len(rec[2])
            self._lost.move_to_end(seq, last=False)
            return
        self.rto_count += 1
        self.ssthresh = max(float(MIN_CWND_PACKETS), self.cwnd / 2)
        self.cwnd = float(MIN_CWND_PACKETS)
        # everything unacknowledged is presumed lost (SACKed packets are already gone),
        # oldest first, ahead of earlier losses still waiting for the window
        requeue: OrderedDict[int, bytes] = OrderedDict()
        for seq, rec in self._inflight.items():
            requeue[seq] = rec[2]
        requeue.update(self._lost)
        self._lost = requeue
        self._lost_bytes += self._inflight_bytes
        self._inflight_bytes = 0
        self._inflight.clear()
        self._round_end_tx = self._tx_counter

    # --- output -----------------------------------------------------------------------
    def _queue_init(self, now: float) -> None:
        init = _INIT.pack(MAGIC, T_INIT, bytes(CID_BYTES), self.local_cid, self.datagram_bytes)
        self._out.append(init + bytes(INIT_BYTES - len(init)))
        self._ctrl_deadline = now + min(MAX_RTO_S, INITIAL_RTO_S * 2 ** self._ctrl_tries)

    def _maybe_send_close(self, now: float) -> None:
        if self._close_sent or self.state is not State.CLOSING:
            return
        if self._send_queue or self._inflight or self._lost:
            return
        self._close_sent = True
        self._ctrl_tries = 0
        self._out.append(_HDR.pack(MAGIC, T_CLOSE, self.peer_cid))
        self._ctrl_deadline = now + self.rto

    def _rwnd_packets(self) -> int:
        # counted from rcv_next, so out-of-order packets already lie inside it
        free = self._recv_window - self._unread_bytes
        return max(0, min(self._window_packets, free // self._payload_max))

    def _build_ack(self, now: float) -> bytes:
        starts, ends = self._range_starts, self._range_ends
        cum = self._rcv_next
        n = min(len(starts), MAX_SACK_RANGES, (self.datagram_bytes - _ACK.size) // _RANGE.size)
        rwnd = self._rwnd_packets()
        self._advertised_rwnd = rwnd
        delay_us = min(0xFFFFFFFF, max(0, int((now - self._largest_rcv_time) * 1e6)))
        largest = self._largest_rcv + 1
        head = _ACK.pack(MAGIC, T_ACK, self.peer_cid, cum, rwnd, delay_us, largest, n)
        self._ack_pending = 0
        self._ack_now = False
        self._ack_deadline = None
        if not n:
            return head
        # newest ranges first: older ones were reported by earlier acks
        k = len(starts)
        flat: list[int] = []
        for i in range(k - 1, k - 1 - n, -1):
            flat.append(starts[i] - cum)
            flat.append(ends[i] - cum)
        return head + struct.pack(f">{2 * n}I", *flat)

    def _pacing_interval(self) -> float:
        srtt = self.srtt if self.srtt is not None else INITIAL_RTO_S / 4
        return max(srtt, CLOCK_GRANULARITY_S) / (PACING_GAIN * self.cwnd)

    def _can_send(self) -> bool:
        return len(self._inflight) < self.cwnd or self._probe_credit > 0

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = self._out
        self._out = []
        state = self.state
        if state is State.ESTABLISHED or state is State.CLOSING:
            if self._ack_now or self._ack_pending and self._ack_deadline is not None and \
                    now >= self._ack_deadline:
                out.append(self._build_ack(now))
            if self._lost or self._send_queue:
                self._send_data(now, out)
            if state is State.CLOSING:
                self._maybe_send_close(now)
                if self._out:
                    out.extend(self._out)
                    self._out = []
        if out:
            self._last_send = now
        return out

    def _send_data(self, now: float, out: list[bytes]) -> None:
        # pacing: a token bucket refilled at PACING_GAIN * cwnd / srtt packets per second
        interval = self._pacing_interval()
        tokens = self._pacing_tokens + (now - self._pacing_last) / interval
        burst = max(float(PACING_BURST_PACKETS), self.cwnd / 8)
        tokens = min(tokens, burst)
        self._pacing_last = now
        inflight = self._inflight
        lost = self._lost
        cwnd = self.cwnd
        tx = self._tx_counter
        sent_any = False
        if self._probe_credit:
            cwnd = max(cwnd, len(inflight) + self._probe_credit)
        budget = min(int(tokens), math.ceil(cwnd - len(inflight)))
        while budget > 0 and lost:
            seq, dgram = lost.popitem(last=False)
            self._lost_bytes -= len(dgram)
            self.retransmitted_packets += 1
            tx += 1
            inflight[seq] = (tx, now, dgram, True)
            self._inflight_bytes += len(dgram)
            out.append(dgram)
            budget -= 1
            tokens -= 1
            sent_any = True
        budget = min(budget, self._snd_una + self._peer_rwnd - self._next_seq)
        q = self._send_queue
        if budget > 0 and q:
            sent_any = True
            seq = self._next_seq
            room = self._payload_max
            prefix = self._data_prefix
            pack_seq = _SEQ.pack
            join = b"".join
            added = 0
            while budget > 0 and q:
                chunk = q[0]
                k = min(budget, len(chunk) // room)
                if k:
                    # the common case: whole packets cut straight out of one big message
                    for i in range(k):
                        dgram = join((prefix, pack_seq(seq), chunk[i * room:(i + 1) * room]))
                        tx += 1
                        inflight[seq] = (tx, now, dgram, False)
                        out.append(dgram)
                        seq += 1
                    cut = k * room
                    added += k * (room + DATA_HEADER_BYTES)
                    self._queued_bytes -= cut
                    if cut == len(chunk):
                        q.popleft()
                    else:
                        q[0] = chunk[cut:]
                    budget -= k
                else:
                    dgram = self._packetize(seq)  # small pieces share a packet
                    tx += 1
                    inflight[seq] = (tx, now, dgram, False)
                    out.append(dgram)
                    added += len(dgram)
                    seq += 1
                    budget -= 1
            self._inflight_bytes += added
            tokens -= seq - self._next_seq
            self._next_seq = seq
        self._tx_counter = tx
        self._pacing_tokens = tokens
        if sent_any:
            self._probe_credit = 0
        if (sent_any or inflight or lost) and self._rto_deadline is None:
            # armed whenever anything is unacknowledged, sent or still waiting for the window
            self._rto_deadline = now + self._timeout()
        if not inflight and not lost and self._send_queue and \
                self._next_seq >= self._snd_una + self._peer_rwnd and \
                self._persist_deadline is None:
            # zero window: probe later with a ping so the peer re-advertises its window
            self._persist_deadline = now + max(self.rto, 0.05)

    def _packetize(self, seq: int) -> bytes:
        room = self._payload_max
        q = self._send_queue
        parts: list[bytes | memoryview] = [self._data_prefix, _SEQ.pack(seq)]
        while room and q:
            chunk = q[0]
            if len(chunk) <= room:
                parts.append(chunk)
                room -= len(chunk)
                q.popleft()
            else:
                parts.append(chunk[:room])
                q[0] = chunk[room:]
                room = 0
        dgram = b"".join(parts)
        self._queued_bytes -= len(dgram) - DATA_HEADER_BYTES
        return dgram

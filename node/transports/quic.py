"""The `quic` transport: one QUIC connection (qh3) with one bidirectional stream per Pipe.

Library: qh3 (the maintained aioquic fork with a Rust packet core), chosen because
it measured ~3x faster than aioquic for one bare stream on this machine
(scripts/bench_quic_libs.py; numbers in the README, "QUIC transport").

Stream format (ALPN "p2pfs/1"): a sequence of records, each a big-endian u32.
* high bit clear: a message of that many bytes follows (<= MAX_MESSAGE_BYTES);
* high bit set: a *credit* record, no payload: the sender of the record grants
  its peer (value & 0x7fffffff) more bytes of message records.

Why our own credit: QUIC flow control in qh3/aioquic is extended as soon as the
library hands data to Python, so it never pushes back on an application that
does not call recv(). Each side may have at most RECV_WINDOW_BYTES of message
records (header + payload) unread by the peer's application; recv() grants
consumed bytes back in batches. A peer exceeding its window is a ProtocolError.
The receive buffer is therefore bounded by RECV_WINDOW_BYTES. A sender paces
itself tighter (SEND_WINDOW_BYTES ungranted, or one message of any size once
nearly all credit is back), which bounds what a bulk transfer keeps in the
receiver's memory without changing what a receiver accepts.

Send-side backpressure: neither library's StreamWriter.drain() waits for
anything, so send() awaits (a) enough credit and (b) the connection's queue of
not-yet-transmitted stream bytes (``get_send_buffer_size``) being at most
SEND_HIGH_WATER_BYTES; it is woken from ``transmit()`` (which runs after every
ack, received packet and pacing timer) once the queue falls to
SEND_LOW_WATER_BYTES, so a bulk writer wakes a few times per MiB, not per packet.

The client does not verify the server's certificate (verify_mode=CERT_NONE):
peer identity is proven by the p2pfs handshake that node/channel.py runs over
this pipe, and a fresh self-signed certificate per node (node/transports/certs.py)
only lets TLS complete. That handshake is bound to this very QUIC connection:
``QuicPipe.channel_binding`` is the connection's RFC 8446 §7.5 TLS exporter
(node/transports/tls_exporter.py), equal at both ends of one connection and
unknown to anyone else; node/secure.py signs it in the transcript, so a relay or
man in the middle that terminates QUIC (two connections, two exporters) is
refused, and the channel's frames then ride inside QUIC's TLS 1.3 without a
second AEAD.

Imports only errors, wire-level constants, transports.base, transports.certs,
transports.tls_exporter and transports.tcp (its pool of large receive buffers);
must not import identity, trust, channel, transfer or gossip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.asyncio._transport import create_optimized_datagram_transport
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.asyncio.server import QuicServer
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode
from qh3.tls import load_pem_private_key, load_pem_x509_certificates

from node.errors import ChannelClosed, P2PError, PeerUnreachable, ProtocolError, bind_errors
from node.transports.base import (
    CONNECT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    Pipe,
    pin_mmap_threshold,
    trim_freed_memory_soon,
)
from node.transports.certs import load_or_create_cert, renew_after_s
from node.transports.tcp import POOLED_MIN_BYTES, buffer_pool, take_buffer
from node.transports.tls_exporter import ExporterTap, tap

log = logging.getLogger(__name__)
# qh3 logs every peer CONNECTION_CLOSE, even a normal one, at WARNING on the "quic" logger;
# the pipe reports the close reason itself (ChannelClosed), so keep node logs quiet
logging.getLogger("quic").setLevel(logging.ERROR)

name = "quic"
ALPN_PROTOCOL = "p2pfs/1"
IDLE_TIMEOUT_S = 30.0  # a silent peer (crashed, unplugged) ends the pipe after this
# a live but quiet pipe pings so the idle timeout never ends it (TCP pipes don't expire either)
KEEPALIVE_INTERVAL_S = 10.0
# Datagram sizes. Off loopback, both ends send QUIC's minimum, 1200 bytes (RFC 9000 §14: every
# QUIC path must carry it; 1228-byte IPv4 / 1248-byte IPv6 packets), because qh3 2.x sends
# data at its configured size without validating the path first: at 1452 bytes (a 1500-byte
# Ethernet MTU) a path with a smaller MTU (PPPoE, a VPN or tunnel, IPv6 in IPv4) stalled the
# connection (tests/netns/test_quic_mtu.py). About 20 % more packets per byte than 1452 there.
SAFE_DATAGRAM_BYTES = 1200
# the server's size towards a client on loopback (as before; loopback's MTU is 64 KiB)
MAX_DATAGRAM_BYTES = 1452
# A client talking to a loopback address sends datagrams as large as the kernel's MTU for that
# route allows (IP_MTU of the connected socket: 65536 unless someone changed lo's MTU), up to
# this cap (the UDP payload limit, rounded down): ~45x fewer packets per byte, 2.6 instead of
# 6.4 ms of sender CPU per MiB here. Only loopback: on any other route the kernel's figure is
# the first hop's MTU, not the path's (a jumbo LAN behind a 1500-byte router).
LARGE_DATAGRAM_CAP_BYTES = 65000
# SO_RCVBUF (Linux doubles it: 512 KiB): the ~208 KiB default holds three 64 KB datagrams, and a
# receiver that falls behind for a moment then drops ~17 % of a loopback share (measured: 700
# drops per 256 MiB, 230-290 with this, 40-120 with 1 MiB); the retransmissions doubled the
# sender's CPU. Larger buffers cost the receiver peak RSS (+4 MB at 512 KiB, +7 MB at 1 MiB).
SOCKET_RECEIVE_BUFFER_BYTES = 256 * 1024
IP_MTU_SOCKOPT = 14  # Linux <linux/in.h> IP_MTU (Python's socket module does not name it)
IPV6_MTU_SOCKOPT = 24  # Linux <linux/in6.h> IPV6_MTU
IPV4_UDP_OVERHEAD_BYTES = 28
IPV6_UDP_OVERHEAD_BYTES = 48
# QUIC-level windows: what the sending library may have in flight (and keeps for retransmission)
# and the receiving one may hold out of order. 4 MiB is ~20 ms at 200 MiB/s, more than any
# loopback or LAN round trip; measured here as fast as 16 MiB (1.7-2.3 ms of sender CPU per
# MiB either way) for ~6 MB less peak RSS per node
QUIC_MAX_STREAM_DATA_BYTES = 4 * 1024 * 1024
QUIC_MAX_DATA_BYTES = 8 * 1024 * 1024

# transmit() hands the socket layer at most about this many bytes of datagrams at a time instead
# of every datagram qh3 has ready (measured on a loopback share: 17-33 datagrams of 65000 bytes,
# a transient 1.1-2.1 MB list next to the same bytes in qh3's send buffer); with 65000-byte
# datagrams GSO sends one per syscall anyway, and a 1200-byte path keeps whole GSO batches
TRANSMIT_BATCH_BYTES = 256 * 1024

RECORD_HEADER = struct.Struct(">I")
# messages at least this large are received straight into a (pooled) buffer of their own
# instead of through the reassembly buffer and a copy: one copy less per byte, and no
# reassembly buffer the size of a chunk kept per pipe (~1.2 MB of receiver peak RSS)
OWNED_MIN_BYTES = POOLED_MIN_BYTES
CREDIT_FLAG = 0x8000_0000
# the reader grants consumed bytes back once this many have accumulated, so up to this much
# less than the window may be available to the sender
CREDIT_GRANT_BYTES = 1024 * 1024
# a whole maximal message plus its header always fits in the credit the sender has (the window
# minus up to one ungranted batch), and little more: what a reader that falls behind (a slow
# disk) may have waiting in memory, where TCP's kernel buffers hold it for the tcp transport
RECV_WINDOW_BYTES = MAX_MESSAGE_BYTES + RECORD_HEADER.size + CREDIT_GRANT_BYTES
# What this side keeps unread at its peer: the receiver enforces RECV_WINDOW_BYTES (room for
# one maximal message), but a sender leaves at most this much ungranted, unless nearly all of
# its credit is back (at most one grant batch out), when any message up to the maximum may go
# (so a maximal message never waits forever). A bulk transfer's 1 MiB chunks then sit at most
# 4 MiB deep in the receiver's memory instead of 9 MiB: 1 GiB share receiver peak RSS 76 ->
# 65-67 MB. Measured then (bench_channel quic, 256 MiB, 1 MiB messages, load ~5): 2 MiB ran at
# 37-45 MiB/s and 3 MiB at 140-190 against 180-290 for 4 MiB and 170-225 for 9 MiB. Since the
# pooled receive buffers and bounded transmit batches, 3 MiB costs a share next to nothing:
# fresh 1 GiB shares, 4 MiB / 3 MiB interleaved, 2 runs of 2 each (load ~1.2): 398/386 vs
# 387/385 MiB/s, receiver peak RSS 65/64 vs 63/62 MB. A transfer chunk is a little over
# 1 MiB, so 3 MiB keeps two in flight per round trip (4 MiB kept three): ~20 MiB/s per pipe
# at a 100 ms RTT instead of ~30. Only the sender's own pacing: peers of either version
# still understand each other.
SEND_WINDOW_BYTES = 3 * 1024 * 1024
# bytes handed to qh3 but not yet transmitted; measured: 2 MiB / 512 KiB cost ~2 MB more peak
# RSS on the sender than 1 MiB / 256 KiB for the same share time
SEND_HIGH_WATER_BYTES = 1024 * 1024
SEND_LOW_WATER_BYTES = 256 * 1024

# RFC 8446 §7.5 exporter label (RFC 5705 "EXPORTER-" prefix) of the channel binding that
# node/channel.py puts into the p2pfs handshake transcript (node/secure.py)
CHANNEL_BINDING_LABEL = b"EXPORTER-p2pfs-channel-binding"
CHANNEL_BINDING_BYTES = 32

CLOSE_LINGER_S = 2.0  # how long close() waits for sent data to be acknowledged
STREAM_OPEN_TIMEOUT_S = 10.0  # server drops a handshaken connection that opens no stream
MAX_SERVER_CONNECTIONS = 256
PIPE_STREAM_ID = 0  # the client's first bidirectional stream

# application close codes (frame_type None -> APPLICATION_CLOSE)
APP_CLOSE_NORMAL = 0
APP_CLOSE_PROTOCOL_VIOLATION = 1
APP_CLOSE_LISTENER_STOPPED = 2

PipeHandler = Callable[[Pipe], Awaitable[None]]


def _configuration(*, is_client: bool, home: Path | None = None,
                   datagram_bytes: int = MAX_DATAGRAM_BYTES) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN_PROTOCOL],
        idle_timeout=IDLE_TIMEOUT_S,
        max_datagram_size=datagram_bytes,
        max_stream_data=QUIC_MAX_STREAM_DATA_BYTES,
        max_data=QUIC_MAX_DATA_BYTES,
    )
    if is_client:
        # Not verifying is deliberate: the certificate is a throwaway self-signed one and
        # the p2pfs handshake above this pipe authenticates the peer's Ed25519 identity.
        cfg.verify_mode = ssl.CERT_NONE
    else:
        cert_pem, key_pem = load_or_create_cert(home, check=qh3_pair_usable)
        cfg.load_cert_chain(cert_pem, key_pem)
    return cfg


def qh3_pair_usable(cert_pem: bytes, key_pem: bytes) -> bool:
    """certs.usable's check done with qh3's parsers (loaded anyway, unlike cryptography's
    X.509 code): one certificate, its key, more than the renewal margin left."""
    if not (cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
            and key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")):
        return False  # (qh3 2.x panics on some non-PEM input instead of raising)
    try:
        certs = load_pem_x509_certificates(cert_pem)
        key = load_pem_private_key(key_pem)
        if len(certs) != 1:
            return False
        return bool(certs[0].public_key() == key.public_key()
                    and certs[0].not_valid_after > renew_after_s())
    except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
        raise
    except BaseException:  # noqa: BLE001 - qh3 raises assorted types, a Rust panic included
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0].removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


def route_datagram_bytes(sock: socket.socket) -> int:
    """The QUIC datagram size for a connected UDP socket: SAFE_DATAGRAM_BYTES, or more when
    the peer is on loopback (as large as the kernel's MTU for that route, when that is larger
    than Ethernet's)."""
    try:
        peer = sock.getpeername()
        if not _is_loopback(str(peer[0])):
            return SAFE_DATAGRAM_BYTES
        if sock.family == socket.AF_INET6:
            mtu = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU_SOCKOPT)
            overhead = IPV6_UDP_OVERHEAD_BYTES
        else:
            mtu = sock.getsockopt(socket.IPPROTO_IP, IP_MTU_SOCKOPT)
            overhead = IPV4_UDP_OVERHEAD_BYTES
    except OSError:  # not Linux, or not connected: the size every path carries
        return SAFE_DATAGRAM_BYTES
    return max(SAFE_DATAGRAM_BYTES, min(LARGE_DATAGRAM_CAP_BYTES, mtu - overhead))


def server_datagram_bytes(addr: Any) -> int:
    """The server's datagram size towards a client at `addr` (loopback or not)."""
    return MAX_DATAGRAM_BYTES if _is_loopback(str(addr[0])) else SAFE_DATAGRAM_BYTES


def _size_receive_buffer(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # best effort: capped by net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER_BYTES)


def _plain_addr(addr: Any) -> tuple[str, int]:
    host, port = str(addr[0]), int(addr[1])
    host = host.removeprefix("::ffff:")
    return host, port


class QuicPipe:
    """One QUIC connection's stream 0 as a message pipe (see module docstring)."""

    transport = "quic"

    def __init__(self, proto: _PipeProtocol, remote: tuple[str, int], *,
                 owns_socket: bool) -> None:
        self.remote = remote
        self._proto = proto
        self._quic = proto._quic
        self._owns_socket = owns_socket
        self._sid = PIPE_STREAM_ID
        self._binding = b""
        # receive side
        self._rbuf = bytearray()  # a partial header, or a small message being assembled
        self._rneed = -1  # payload length of the record being received; -1: reading a header
        # a large message is written straight into a buffer of its own (the tcp transport's
        # pool), handed to recv() as is; dialled pipes at once, accepted ones once the channel
        # layer says the peer authenticated (before that an announced size costs nothing)
        self._owned_ok = owns_socket
        self._rmsg: bytearray | None = None
        self._rfill = 0
        # the pool (per event loop, shared with tcp pipes) empties when its last pipe closes
        self._pool: Any = buffer_pool()
        self._pool.retain()  # given back once (_drop_pool), when its connection is released
        self._inbox: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._recv_allowed = RECV_WINDOW_BYTES  # total message-record bytes the peer may send
        self._recv_total = 0
        self._consumed_ungranted = 0
        self._peer_finished = False
        # send side
        self._send_credit = RECV_WINDOW_BYTES
        self._writable = asyncio.Event()
        self._want_space = False
        self._want_drained = False
        # lifecycle
        self._error: ProtocolError | None = None
        self._error_reported = False
        self._close_reason = ""
        self._terminated = False
        self._closing = False
        self._closed_event = asyncio.Event()

    # -- public API ----------------------------------------------------------
    # every bytearray recv() returns is the caller's alone (node/channel.py may open it in place)
    recv_buffers_owned = True

    def authenticated(self) -> None:
        """The channel layer's word that the peer of this accepted pipe is authenticated and
        trusted: large messages are received into buffers of their own from now on."""
        self._owned_ok = True

    @property
    def closed(self) -> bool:
        return self._closing or self._terminated

    @property
    def channel_binding(self) -> bytes:
        """This connection's TLS exporter value: the same on both ends of one QUIC connection,
        different on any other. Empty (frames then keep their own AEAD) if qh3 hid it."""
        if not self._binding:
            self._binding = self._proto.exporter.export(CHANNEL_BINDING_LABEL, b"",
                                                        CHANNEL_BINDING_BYTES)
        return self._binding

    async def send(self, data: bytes) -> None:
        n = len(data)
        if n > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        need = RECORD_HEADER.size + n
        quic = self._quic
        while True:
            if self._closing or self._terminated or self._error is not None:
                raise ChannelClosed(self._closed_message())
            if self._may_send(need):
                if quic.get_send_buffer_size(self._sid) <= SEND_HIGH_WATER_BYTES:
                    break
                self._want_space = True
            self._writable.clear()
            await self._writable.wait()
        self._send_credit -= need
        try:
            quic.send_stream_data(self._sid, RECORD_HEADER.pack(n))
            if n:
                quic.send_stream_data(self._sid, data)
        except QuicConnectionError:  # closed by the peer or idle timeout in this very tick
            self._terminated = True
            raise ChannelClosed(self._closed_message()) from None
        self._proto._transmit_soon()

    def _may_send(self, need: int) -> bool:
        outstanding = RECV_WINDOW_BYTES - self._send_credit  # sent, not yet granted back
        if outstanding <= CREDIT_GRANT_BYTES:
            return self._send_credit >= need  # always true up to MAX_MESSAGE_BYTES
        return outstanding + need <= SEND_WINDOW_BYTES

    async def recv(self) -> bytes:
        while not self._inbox:
            if self._error is not None and not self._error_reported:
                self._error_reported = True
                raise self._error
            if self._closing or self._terminated or self._peer_finished:
                raise ChannelClosed(self._closed_message())
            self._readable.clear()
            await self._readable.wait()
        msg = self._inbox.popleft()
        self._consumed_ungranted += RECORD_HEADER.size + len(msg)
        if self._consumed_ungranted >= CREDIT_GRANT_BYTES and not self.closed:
            grant, self._consumed_ungranted = self._consumed_ungranted, 0
            self._recv_allowed += grant
            with contextlib.suppress(QuicConnectionError):  # then the next recv() reports it
                self._quic.send_stream_data(self._sid, RECORD_HEADER.pack(CREDIT_FLAG | grant))
                self._proto._transmit_soon()
        return msg

    async def close(self) -> None:
        """Finish the stream, let sent data be acknowledged (bounded), close the connection."""
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        self._wake_all()
        try:
            if not self._terminated:
                with contextlib.suppress(Exception):  # the stream may be reset already
                    self._quic.send_stream_data(self._sid, b"", end_stream=True)
                    self._proto.transmit()
                if not self._drained():
                    self._want_drained = True
                    self._writable.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wait_drained(), CLOSE_LINGER_S)
                # CONNECTION_CLOSE leaves synchronously; no need to sit out the draining period
                self._proto.close_connection(APP_CLOSE_NORMAL, "closed")
                self._terminated = True
                if not self._close_reason:
                    self._close_reason = "QUIC channel closed"
        finally:
            # gives the pool share back and schedules the trim (whoever released it first)
            self._proto.release(self._owns_socket)
            self._rmsg = None
            self._closed_event.set()

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.release()
            self._pool = None

    # -- driven by the protocol --------------------------------------------------
    def _closed_message(self) -> str:
        return self._close_reason or f"QUIC channel to {self.remote[0]}:{self.remote[1]} closed"

    def _drained(self) -> bool:
        if self._terminated:
            return True
        if self._quic.get_send_buffer_size(self._sid):
            return False
        # qh3 exposes no public "all acknowledged" query; its core's counter is exact
        core = getattr(self._quic, "_core", None)
        return core is None or getattr(core, "bytes_in_flight", 0) == 0

    async def _wait_drained(self) -> None:
        while not self._drained():
            self._writable.clear()
            self._want_drained = True
            await self._writable.wait()

    def _wake_all(self) -> None:
        self._readable.set()
        self._writable.set()

    def after_transmit(self) -> None:
        if self._want_space and (
            self._quic.get_send_buffer_size(self._sid) <= SEND_LOW_WATER_BYTES
        ):
            self._want_space = False
            self._writable.set()
        if self._want_drained and self._drained():
            self._want_drained = False
            self._writable.set()

    def on_stream_data(self, data: bytes, end_stream: bool) -> None:
        if self._closing or self._error is not None:
            return
        try:
            self._feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if end_stream:
            if self._rbuf or self._rneed >= 0 or self._rmsg is not None:
                self._close_reason = "peer closed the QUIC channel in the middle of a message"
            else:
                self._close_reason = "peer closed the QUIC channel"
            self._peer_finished = True
            self._readable.set()

    def _feed(self, data: bytes) -> None:
        """Split stream bytes into records: credit is applied, messages go to the inbox.

        A message of at least OWNED_MIN_BYTES (once allowed, see ``_owned_ok``) is copied
        once, from the event's bytes into its own buffer; a header or a small message is
        gathered in ``_rbuf`` first when it arrives in pieces."""
        buf = self._rbuf
        inbox = self._inbox
        delivered = False
        with memoryview(data) as view:
            pos = 0
            end = len(view)
            while True:
                msg = self._rmsg
                if msg is not None:  # the rest of a large message, in place
                    fill = self._rfill
                    take = min(end - pos, len(msg) - fill)
                    msg[fill : fill + take] = view[pos : pos + take]
                    pos += take
                    self._rfill = fill = fill + take
                    if fill < len(msg):
                        break
                    owned: Any = msg  # bytes-like: handed over as is (tcp.py does the same)
                    inbox.append(owned)
                    self._rmsg = None
                    delivered = True
                    continue
                need = self._rneed
                if need < 0:
                    if buf or end - pos < RECORD_HEADER.size:  # a header in pieces
                        take = min(end - pos, RECORD_HEADER.size - len(buf))
                        buf += view[pos : pos + take]
                        pos += take
                        if len(buf) < RECORD_HEADER.size:
                            break
                        (value,) = RECORD_HEADER.unpack(buf)
                        buf.clear()
                    else:
                        (value,) = RECORD_HEADER.unpack_from(view, pos)
                        pos += RECORD_HEADER.size
                    if value & CREDIT_FLAG:
                        self._on_credit(value & ~CREDIT_FLAG)
                        continue
                    if value > MAX_MESSAGE_BYTES:
                        raise ProtocolError(
                            f"peer announced a {value}-byte message (limit {MAX_MESSAGE_BYTES})")
                    self._recv_total += RECORD_HEADER.size + value
                    if self._recv_total > self._recv_allowed:
                        raise ProtocolError("peer overran the QUIC channel's receive window")
                    if value >= OWNED_MIN_BYTES and self._owned_ok:
                        self._rmsg = take_buffer(value)
                        self._rfill = 0
                        continue
                    self._rneed = need = value
                if not buf and end - pos >= need:  # a whole small message in this piece
                    inbox.append(bytes(view[pos : pos + need]))
                    pos += need
                else:
                    take = min(end - pos, need - len(buf))
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < need:
                        break
                    inbox.append(bytes(buf))
                    buf.clear()
                self._rneed = -1
                delivered = True
        if delivered:
            self._readable.set()

    def _on_credit(self, grant: int) -> None:
        if self._send_credit + grant > RECV_WINDOW_BYTES:
            raise ProtocolError("peer granted more QUIC channel credit than was used")
        self._send_credit += grant
        if grant:
            self._writable.set()

    def _fail(self, exc: ProtocolError) -> None:
        log.warning("QUIC channel from %s:%d: %s", self.remote[0], self.remote[1], exc)
        self._error = exc
        self._close_reason = f"QUIC channel closed after a protocol violation: {exc}"
        self._inbox.clear()
        self._rbuf.clear()
        self._rmsg = None
        self._proto.close_connection(APP_CLOSE_PROTOCOL_VIOLATION, "protocol violation")
        self._wake_all()

    def on_reset(self) -> None:
        self._close_reason = self._close_reason or "peer reset the QUIC stream"
        self._terminated = True
        self._wake_all()

    def on_terminated(self, event: events.ConnectionTerminated) -> None:
        if not self._close_reason:
            if event.error_code == APP_CLOSE_NORMAL and event.frame_type is None:
                self._close_reason = "peer closed the QUIC channel"
            elif event.reason_phrase:
                self._close_reason = f"QUIC connection ended: {event.reason_phrase[:200]}"
            else:
                self._close_reason = f"QUIC connection ended (code {event.error_code})"
        self._terminated = True
        self._wake_all()


class _PipeProtocol(QuicConnectionProtocol):
    """qh3 connection driver that routes stream-0 events straight into a QuicPipe."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic)
        self.exporter: ExporterTap = tap(quic)  # before any TLS message is processed
        self.pipe: QuicPipe | None = None
        self.remote_addr: tuple[str, int] | None = None
        self.connect_error: BaseException | None = None
        self.on_pipe: Callable[[QuicPipe], None] | None = None  # server side
        self.on_release: Callable[[_PipeProtocol], None] | None = None
        self._released = False
        self._keepalive: asyncio.TimerHandle | None = None

    def start_keepalive(self) -> None:
        self._keepalive = self._loop.call_later(KEEPALIVE_INTERVAL_S, self._send_keepalive)

    def _send_keepalive(self) -> None:
        if self._released or self._closed.is_set() or self._quic._close_event is not None:
            self._keepalive = None
            return
        with contextlib.suppress(QuicConnectionError):
            self._quic.send_ping(0)
            self.transmit()
        self.start_keepalive()

    def stop_timers(self) -> None:
        for handle in (self._keepalive, self._timer):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._timer = None

    # asyncio / qh3 hooks
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.remote_addr is None:
            self.remote_addr = _plain_addr(addr)
        super().datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # Linux reports an ICMP port-unreachable as ECONNREFUSED on the next socket call
        if not self._connected and self.connect_error is None:
            self.connect_error = exc
            waiter = self._connected_waiter
            if waiter is not None and not waiter.done():
                self._connected_waiter = None
                waiter.set_exception(exc)

    def _process_events(self) -> None:
        super()._process_events()
        # qh3 announces a peer's CONNECTION_CLOSE only after the draining period (~3 PTO);
        # its close event is known at once, so end the pipe now
        close_event = self._quic._close_event
        if close_event is not None and self.pipe is not None and not self.pipe._terminated:
            self.pipe.on_terminated(close_event)

    def transmit(self) -> None:
        quic = self._quic
        core = getattr(quic, "_core", None)
        send_many = self._sendto_many
        if core is None or send_many is None or getattr(quic, "_quic_logger", True) is not None:
            super().transmit()  # before the handshake starts, or with a qlog attached
        else:
            self._transmit_fast(quic, core, send_many)
        pipe = self.pipe
        if pipe is not None:
            pipe.after_transmit()

    def _transmit_fast(self, quic: QuicConnection, core: Any,
                       send_many: Callable[[list[bytes], Any], None]) -> None:
        """qh3's transmit() minus its per-datagram qlog bookkeeping: without a logger that is
        still two Python calls, a header parse and a slice per datagram. Measured with
        1452-byte datagrams (any real path): sender 4.0-5.3 instead of 5.7 CPU ms/MiB; with
        loopback's 65000-byte ones it makes no difference. Same datagrams, order and timer."""
        self._transmit_task = None
        poll = core.poll_transmit
        now = self._loop_time()
        batch: list[bytes] = []
        batch_addr: Any = None
        batch_bytes = 0
        while True:
            try:
                item = poll(now)
            except RuntimeError as exc:  # as qh3's own wrapper maps its core's failures
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
            if item is None:
                break
            data, addr = item[0], item[1]
            if batch and (addr != batch_addr or batch_bytes >= TRANSMIT_BATCH_BYTES):
                send_many(batch, batch_addr)
                batch = []
                batch_bytes = 0
            batch.append(data)
            batch_addr = addr
            batch_bytes += len(data)
        if batch:
            send_many(batch, batch_addr)
        timer_at = quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            pipe = self.pipe
            if pipe is None and self.on_pipe is not None and event.stream_id == PIPE_STREAM_ID:
                pipe = self.pipe = QuicPipe(self, self.remote_addr or ("?", 0), owns_socket=False)
                self.start_keepalive()
                self.on_pipe(pipe)
            if pipe is None or event.stream_id != PIPE_STREAM_ID:
                log.info("QUIC peer %s opened unexpected stream %d; closing",
                         self.remote_addr, event.stream_id)
                self.close_connection(APP_CLOSE_PROTOCOL_VIOLATION, "one stream per connection")
                return
            pipe.on_stream_data(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            if self.pipe is not None and event.stream_id == PIPE_STREAM_ID:
                self.pipe.on_reset()
        elif isinstance(event, events.ConnectionTerminated):
            if self.pipe is not None:
                self.pipe.on_terminated(event)
            elif self.on_release is not None:
                self.release(False)
        elif isinstance(event, events.HandshakeCompleted) and self.on_pipe is not None:
            self._loop.call_later(STREAM_OPEN_TIMEOUT_S, self._check_stream_opened)

    # helpers
    def _check_stream_opened(self) -> None:
        if self.pipe is None and not self._closed.is_set():
            self.close_connection(APP_CLOSE_PROTOCOL_VIOLATION, "no stream opened")

    def close_connection(self, code: int, reason: str) -> None:
        if not self._closed.is_set():
            self._quic.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def release(self, owns_socket: bool) -> None:
        """Forget this connection: close its socket (client) or deregister it (server)."""
        if self._released:
            return
        self._released = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if owns_socket:
            # client: the socket is ours alone, so the connection ends with it. A server-side
            # connection keeps its timer so qh3 finishes it and drops its connection ids.
            self.stop_timers()
            if self._transport is not None:
                self._transport.close()
        if self.on_release is not None:
            self.on_release(self)
        if self.pipe is not None:
            # a pipe nobody will close (a dial that failed, a handler that never ran, a
            # listener stopping) must not keep the pool counted as in use: it never empties
            self.pipe._drop_pool()
        trim_freed_memory_soon(collect_cycles=True)


class QuicListener:
    """A UDP socket accepting QUIC connections; each connection's stream 0 becomes a Pipe."""

    transport = "quic"

    def __init__(self, handler: PipeHandler) -> None:
        self._handler = handler
        self._server: _Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._protocols: set[_PipeProtocol] = set()
        self._port = 0
        self._closing = False

    @property
    def port(self) -> int:
        return self._port

    def _make_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> _PipeProtocol:
        proto = _PipeProtocol(quic)
        proto.on_pipe = self._on_pipe
        proto.on_release = self._protocols.discard
        self._protocols.add(proto)
        return proto

    def _on_pipe(self, pipe: QuicPipe) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._run_handler(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, pipe: QuicPipe) -> None:
        try:
            await self._handler(pipe)
        except asyncio.CancelledError:
            raise
        except P2PError as exc:
            log.info("QUIC pipe from %s:%d ended: %s", pipe.remote[0], pipe.remote[1], exc)
        except Exception:  # a handler bug must not take the listener down
            log.exception("QUIC pipe handler for %s:%d failed", *pipe.remote)
        finally:
            await pipe.close()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proto in list(self._protocols):
            proto.close_connection(APP_CLOSE_LISTENER_STOPPED, "listener stopped")
            if proto.pipe is not None:
                proto.pipe.on_terminated(events.ConnectionTerminated(
                    APP_CLOSE_LISTENER_STOPPED, None, "listener stopped"))
            proto.release(False)
            proto.stop_timers()  # the shared socket closes below; nothing left to send
        if self._server is not None and self._server._transport is not None:
            self._server._transport.close()
        await asyncio.sleep(0)  # let the transport finish closing its socket


class _Server(QuicServer):
    """qh3's connection demultiplexer, hardened: bounded connections, survives any datagram."""

    def __init__(self, listener: QuicListener, configuration: QuicConfiguration) -> None:
        super().__init__(configuration=configuration, create_protocol=listener._make_protocol)
        self._listener = listener
        self._cid_length = configuration.connection_id_length
        # one configuration per datagram size (same certificate): qh3's server builds each new
        # connection from self._configuration, so it is chosen by the client's address
        self._configs = {size: dataclasses.replace(configuration, max_datagram_size=size)
                         for size in {MAX_DATAGRAM_BYTES, SAFE_DATAGRAM_BYTES}}

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes):
            return
        self._configuration = self._configs[server_datagram_bytes(addr)]
        if len(self._listener._protocols) >= MAX_SERVER_CONNECTIONS:
            try:
                dcid = _pull_quic_header(data, 0, self._cid_length)[3]
            except ValueError:
                return
            if dcid not in self._protocols:
                return
        try:
            super().datagram_received(data, addr)
        except Exception:  # hostile datagrams must never stop the listener
            log.warning("QUIC listener dropped a bad datagram from %s", addr, exc_info=True)

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        """A recvmmsg/GRO batch from one address: hand runs of one connection's packets
        to it at once, so it processes them and answers (acks) once per run, not per packet."""
        run: list[bytes] = []
        run_proto: _PipeProtocol | None = None
        for data in datagrams:
            try:
                dcid = _pull_quic_header(data, 0, self._cid_length)[3]
            except ValueError:
                continue
            proto = self._protocols.get(dcid)
            if proto is not None and proto is run_proto:
                run.append(data)
                continue
            if run_proto is not None:
                self._deliver_run(run_proto, run, addr)
            if proto is None:  # a new connection's Initial, or an unknown id
                run, run_proto = [], None
                self.datagram_received(data, addr)
            else:
                run, run_proto = [data], proto  # type: ignore[assignment]
        if run_proto is not None:
            self._deliver_run(run_proto, run, addr)

    def _deliver_run(self, proto: _PipeProtocol, run: list[bytes], addr: Any) -> None:
        try:
            proto.datagrams_received(run, addr)
        except Exception:  # hostile datagrams must never stop the listener
            log.warning("QUIC listener dropped bad datagrams from %s", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:
        log.debug("QUIC listener socket error: %s", exc)


async def listen(host: str, port: int, handler: PipeHandler, *,
                 home: Path | None = None) -> QuicListener:
    """Accept QUIC connections on host:port (0 = ephemeral); call `handler(pipe)` for each.

    The pipe is closed when the handler returns. `home` holds the node's certificate
    (in-memory one per process when None).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    with bind_errors("quic", host, port):
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    try:
        return await listen_on_socket(sock, handler, home=home)
    except BaseException:
        sock.close()
        raise


async def listen_on_socket(sock: socket.socket, handler: PipeHandler, *,
                           home: Path | None = None) -> QuicListener:
    """Accept QUIC connections on an already bound UDP socket (node/transports/quic_lazy.py
    binds first and starts QUIC at the first datagram); the listener owns `sock`."""
    pin_mmap_threshold()  # qh3's send buffer: see there
    listener = QuicListener(handler)
    config = _configuration(is_client=False, home=home)
    _size_receive_buffer(sock)
    loop = asyncio.get_running_loop()
    # qh3's socket layer: batched receive (recvmmsg/GRO) and GSO sends
    transport, server_any = await create_optimized_datagram_transport(
        loop, lambda: _Server(listener, config), sock=sock)
    server: _Server = server_any  # type: ignore[assignment]
    listener._server = server
    listener._port = int(transport.get_extra_info("sockname")[1])
    return listener


async def connect(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S) -> QuicPipe:
    """Open a QUIC connection to host:port and return its pipe; PeerUnreachable on failure."""
    loop = asyncio.get_running_loop()
    where = f"{host}:{port}"
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), timeout)
    except (TimeoutError, OSError) as exc:
        raise PeerUnreachable(f"cannot resolve {host!r} for QUIC: {exc or 'timed out'}") from None
    family, _, _, _, addr = infos[0]
    pin_mmap_threshold()  # qh3's send buffer: see there
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        # a connected UDP socket gets ICMP port-unreachable as ECONNREFUSED: fast refusal
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    _size_receive_buffer(sock)
    quic = QuicConnection(configuration=_configuration(
        is_client=True, datagram_bytes=route_datagram_bytes(sock)))
    transport, proto_any = await create_optimized_datagram_transport(
        loop, lambda: _PipeProtocol(quic), sock=sock)
    proto: _PipeProtocol = proto_any  # type: ignore[assignment]
    pipe = QuicPipe(proto, (host if _is_ip(host) else str(addr[0]), port), owns_socket=True)
    proto.pipe = pipe
    try:
        proto.connect(addr)
        await asyncio.wait_for(proto.wait_connected(), timeout)
        # open stream 0 with an empty credit record so the server sees the pipe now
        quic.send_stream_data(PIPE_STREAM_ID, RECORD_HEADER.pack(CREDIT_FLAG))
        proto.transmit()
        proto.start_keepalive()
    except TimeoutError:
        await _abandon(proto)
        raise PeerUnreachable(f"QUIC connection to {where} timed out after {timeout:g} s") from None
    except (ConnectionError, OSError) as exc:
        await _abandon(proto)
        detail = "refused" if isinstance(exc, ConnectionRefusedError) else (
            str(exc) or "handshake failed")
        raise PeerUnreachable(f"QUIC connection to {where} failed: {detail}") from None
    except BaseException:
        await _abandon(proto)
        raise
    del transport  # owned by proto from here on; closed by pipe.close()
    return pipe


async def _abandon(proto: _PipeProtocol) -> None:
    """End a dial that failed: its pipe was never handed out, so nobody will close it."""
    proto._quic.close()
    proto.transmit()
    proto.release(True)  # gives the pipe's share of the buffer pool back
    await asyncio.sleep(0)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

"""UDP transport: a thin asyncio driver around the sans-IO machine in ``udp_machine.py``.

Implements the Pipe/Listener interface of ``node/transports/base.py`` (``name``,
``listen``, ``connect``). All protocol logic lives in ``UdpConnection``; this
module only moves bytes between it and a non-blocking socket, runs its timer and
turns its events into ``recv()`` results. Works on uvloop and the default loop
(it uses only ``add_reader``/``add_writer``/``call_at``).

Fighting per-datagram cost:
* receive: ``recvmsg`` in a loop per readable wakeup (up to ``READS_PER_WAKEUP``)
  with Linux UDP GRO (``UDP_GRO``): one call can return many coalesced datagrams;
  the machine is flushed once per wakeup, so acks are batched naturally.
* send: runs of equal-size datagrams go out in one ``sendmsg`` with a
  ``UDP_SEGMENT`` (GSO) control message, without joining the buffers; both fall
  back to one syscall per datagram where the kernel refuses.
* ``loss_rate`` drops that fraction of outgoing datagrams (tests, benchmarks).

Memory: large messages live in the large-buffer pool tcp and quic use too
(``tcp.buffer_pool()``). ``send_frame`` lets the channel seal straight into a pooled
buffer, and the machine reassembles each received large message in place in a pooled
buffer that ``recv()`` hands over (``recv_buffers_owned``: the channel decrypts it in
place). Before, a received 1 MiB message was held twice (the machine's stream buffer and
the bytes cut from it) and then decrypted into a third buffer, all freshly allocated.

The listener keeps nothing for an INIT: the machine's ``Acceptor`` answers it
with a cookie, and only a COOKIE_ECHO with a valid cookie from the same address
creates a connection (bounded by ``MAX_CONNECTIONS``). Spoofed INITs therefore
cannot fill any table; their replies are dropped rather than queued when the
socket is busy. An INIT from a peer speaking an older wire version is logged,
at most once per ``VERSION_LOG_INTERVAL_S``, with both versions named.

A connection made from a cookie is pre-auth until the channel layer calls
``pipe.authenticated()``: its machine takes only handshake-sized messages into a
small receive window, at most ``MAX_PREAUTH_PER_IP`` such connections per remote
address exist (more cookies from it are ignored) and ``MAX_PREAUTH_TOTAL`` in all
(a new one evicts the oldest of the address holding the most), and each must
authenticate within ``PREAUTH_DEADLINE_S``, as on TCP.

Must not import channel, secure, trust or anything above the transports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from node.errors import ChannelClosed, P2PError, PeerUnreachable, ProtocolError, bind_errors
from node.transports.base import (
    CONNECT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    PipeHandler,
    trim_freed_memory_soon,
)
from node.transports.tcp import FrameFiller, buffer_pool, take_buffer
from node.transports.udp_machine import (
    CLOSE_TIMEOUT_S,
    DEFAULT_DATAGRAM_BYTES,
    HEADER_BYTES,
    MAGIC,
    T_COOKIE_ECHO,
    T_INIT,
    WIRE_VERSION,
    Acceptor,
    Closed,
    Connected,
    MessageReceived,
    State,
    UdpConnection,
    auto_datagram_bytes,
    old_wire_version,
)

log = logging.getLogger(__name__)

name = "udp"

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # Linux GSO
UDP_GRO = 104  # Linux GRO
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
RECV_BUFFER_BYTES = 65536
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
READS_PER_WAKEUP = 256
SEND_HIGH_WATER_BYTES = 2 * 1024 * 1024
SEND_LOW_WATER_BYTES = 1024 * 1024
MAX_CONNECTIONS = 4096  # created only from a returned cookie: each proved its address
MAX_PREAUTH_PER_IP = 32  # connections not yet authenticated, per remote address
MAX_PREAUTH_TOTAL = 256
# longer than the channel's own 10 s handshake timeout, whose error is the clearer one
PREAUTH_DEADLINE_S = 15.0
VERSION_LOG_INTERVAL_S = 60.0
_GRO_SIZE = struct.Struct("=i")


class _Endpoint:
    """One UDP socket: reads with GRO, writes with GSO, reports to a datagram callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, *,
                 connected: bool, loss_rate: float,
                 on_datagrams: Callable[[list[bytes], Any], None],
                 on_batch_end: Callable[[], None],
                 on_error: Callable[[OSError], None]) -> None:
        if not 0.0 <= loss_rate < 1.0:
            raise ValueError("loss_rate must be in [0, 1)")
        self.loop = loop
        self.sock = sock
        self.connected = connected
        self.loss_rate = loss_rate
        self._rng = random.Random()
        self._on_datagrams = on_datagrams
        self._on_batch_end = on_batch_end
        self._on_error = on_error
        self._backlog: deque[tuple[list[bytes], Any]] = deque()
        self._writer_on = False
        self.closed = False
        self.gso = _try_setsockopt(sock, SOL_UDP, UDP_SEGMENT, 0) and hasattr(sock, "sendmsg")
        self.gro = _try_setsockopt(sock, SOL_UDP, UDP_GRO, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            _try_setsockopt(sock, socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        self._anc_size = socket.CMSG_SPACE(_GRO_SIZE.size) if self.gro else 0
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self.sock
        on_datagrams = self._on_datagrams
        try:
            for _ in range(READS_PER_WAKEUP):
                try:
                    if self.gro:
                        data, anc, _flags, addr = sock.recvmsg(RECV_BUFFER_BYTES, self._anc_size)
                    else:
                        data, addr = sock.recvfrom(RECV_BUFFER_BYTES)
                        anc = None
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors on a connected socket, e.g. refused
                    self._on_error(exc)
                    if self.closed:
                        return
                    continue
                seg = 0
                if anc:
                    for level, kind, cdata in anc:
                        if level == SOL_UDP and kind == UDP_GRO and len(cdata) >= _GRO_SIZE.size:
                            seg = _GRO_SIZE.unpack_from(cdata)[0]
                if 0 < seg < len(data):
                    on_datagrams([data[off:off + seg] for off in range(0, len(data), seg)], addr)
                else:
                    on_datagrams([data], addr)
                if self.closed:
                    return
        finally:
            if not self.closed:
                self._on_batch_end()

    def send_or_drop(self, dgrams: list[bytes], addr: Any) -> None:
        """Send if nothing waits for the socket, else drop: for stateless replies, which
        the peer's retransmission replaces, so a flood of them never queues up."""
        if not self._backlog:
            self.send(dgrams, addr)

    def send(self, dgrams: list[bytes], addr: Any) -> None:
        if self.closed or not dgrams:
            return
        if self.loss_rate:
            rnd = self._rng.random
            dgrams = [d for d in dgrams if rnd() >= self.loss_rate]
        if self._backlog:
            self._backlog.append((dgrams, addr))
            return
        self._send_now(dgrams, addr)

    def _send_now(self, dgrams: list[bytes], addr: Any) -> None:
        sock = self.sock
        target = None if self.connected else addr
        n = len(dgrams)
        i = 0
        while i < n:
            first = dgrams[i]
            size = len(first)
            j = i + 1
            if self.gso and size * 2 <= GSO_MAX_BYTES:
                total = size
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    ln = len(dgrams[j])
                    if ln > size or total + ln > GSO_MAX_BYTES:
                        break
                    total += ln
                    j += 1
                    if ln < size:
                        break  # only the last segment may be shorter
            try:
                if j - i == 1:
                    if target is None:
                        sock.send(first)
                    else:
                        sock.sendto(first, target)
                else:
                    anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                    if target is None:
                        sock.sendmsg(dgrams[i:j], anc)
                    else:
                        sock.sendmsg(dgrams[i:j], anc, 0, target)
            except (BlockingIOError, InterruptedError):
                self._backlog.appendleft((dgrams[i:], addr))
                if not self._writer_on:
                    self._writer_on = True
                    self.loop.add_writer(sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                if j - i > 1 and self.gso:
                    log.info("udp GSO refused (%s); sending datagrams one by one", exc)
                    self.gso = False
                    continue
                self._on_error(exc)
                if self.closed:
                    return
                # a datagram the kernel refuses is a lost datagram; the machine retransmits
            i = j

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self._writer_on = False
        backlog, self._backlog = self._backlog, deque()
        while backlog and not self._backlog:
            dgrams, addr = backlog.popleft()
            self._send_now(dgrams, addr)
        if self._backlog:
            self._backlog.extend(backlog)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
            if self._writer_on:
                self.loop.remove_writer(self.sock.fileno())
        except (ValueError, OSError):
            pass  # the loop may already be closing
        self._backlog.clear()
        self.sock.close()


def _try_setsockopt(sock: socket.socket, level: int, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(level, opt, value)
        return True
    except OSError:
        return False


def _make_socket(family: int, bind_addr: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if bind_addr is not None:
            sock.bind(bind_addr)
    except OSError:
        sock.close()
        raise
    return sock


class UdpPipe:
    """One UDP connection as a message pipe (see base.Pipe).

    Large messages travel in buffers of the large-buffer pool tcp and quic share
    (``tcp.buffer_pool()``): ``send_frame`` seals into one, the machine reassembles a
    received one straight into one, and ``recv()`` hands it over as the caller's own
    bytearray (``recv_buffers_owned``), so the channel opens it in place.
    """

    transport = "udp"
    recv_buffers_owned = True

    def __init__(self, machine: UdpConnection, addr: Any,
                 send: Callable[[list[bytes], Any], None],
                 loop: asyncio.AbstractEventLoop,
                 on_closed: Callable[[UdpPipe], None]) -> None:
        self._m = machine
        machine.message_buffer = take_buffer
        self._pool = buffer_pool()
        self._pool.retain()
        self._addr = addr
        self.remote: tuple[str, int] = (str(addr[0]), int(addr[1]))
        self._send_dgrams = send
        self._loop = loop
        self._on_closed = on_closed
        self._recv_q: deque[bytes] = deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._send_waiter: asyncio.Future[None] | None = None
        self._closed_fut: asyncio.Future[None] = loop.create_future()
        self.connected: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._flush_soon = False
        self._closed = False
        self.close_reason = ""
        self.on_connected: Callable[[UdpPipe], None] | None = None
        # set by the listener while this accepted pipe is pre-auth
        self._on_authenticated: Callable[[UdpPipe], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def machine(self) -> UdpConnection:
        return self._m

    # --- driven by the endpoint ---------------------------------------------------------
    def feed(self, dgrams: list[bytes]) -> None:
        self._m.receive_datagrams(dgrams, self._loop.time())

    def flush(self) -> None:
        self._flush_soon = False
        m = self._m
        now = self._loop.time()
        dgrams = m.datagrams_to_send(now)
        if dgrams:
            self._send_dgrams(dgrams, self._addr)
        self._process_events()
        if self._closed:
            return
        w = self._send_waiter
        if w is not None and m.send_buffered_bytes < SEND_LOW_WATER_BYTES:
            self._send_waiter = None
            if not w.done():
                w.set_result(None)
        t = m.get_timer()
        if t is None:
            self._cancel_timer()
        elif self._timer is None or t < self._timer_when - 0.0005:
            self._cancel_timer()
            self._timer_when = t
            self._timer = self._loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._m.handle_timer(self._loop.time())
        self.flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def schedule_flush(self) -> None:
        if not self._flush_soon and not self._closed:
            self._flush_soon = True
            self._loop.call_soon(self.flush)

    def _process_events(self) -> None:
        m = self._m
        while (ev := m.next_event()) is not None:
            if type(ev) is MessageReceived:
                self._recv_q.append(ev.data)
                w = self._recv_waiter
                if w is not None:
                    self._recv_waiter = None
                    if not w.done():
                        w.set_result(None)
            elif isinstance(ev, Connected):
                if not self.connected.done():
                    self.connected.set_result(None)
                if self.on_connected is not None:
                    self.on_connected(self)
            elif isinstance(ev, Closed):
                self._mark_closed(ev.reason)

    def _mark_closed(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._cancel_timer()
        self._pool.release()
        trim_freed_memory_soon()
        for w in (self._recv_waiter, self._send_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        self._recv_waiter = self._send_waiter = None
        if not self.connected.done():
            self.connected.set_exception(ChannelClosed(reason))
            self.connected.exception()  # retrieved: connect() reports it its own way
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)
        self._on_closed(self)

    def fail(self, reason: str) -> None:
        """The socket reported an error for this peer (e.g. ICMP port unreachable)."""
        self._m.reset(reason)
        self.flush()

    # --- Pipe API -----------------------------------------------------------------------
    @property
    def preauth(self) -> bool:
        """True while pre-authentication limits apply to what the peer sends."""
        return self._m.preauth

    def authenticated(self) -> None:
        """The channel layer's word that the peer is authenticated and trusted: lifts the
        pre-auth limits and frees its pre-auth slot. Idempotent."""
        hook, self._on_authenticated = self._on_authenticated, None
        if hook is not None:
            hook(self)
        if self._m.end_preauth():
            self.schedule_flush()  # advertise the full window now

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"udp channel to {self.remote[0]}:{self.remote[1]} closed: "
                             f"{self.close_reason or 'closed'}")

    async def send(self, data: bytes) -> None:
        n = len(data)
        if n > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        await self._wait_send_room()
        self._m.send_message(data)
        self.schedule_flush()

    async def send_frame(self, size: int, fill: FrameFiller) -> None:
        """Send one `size`-byte message that ``fill(buf, offset)`` writes at buf[offset:],
        built in a pooled buffer (it returns to the pool once all of it is packetized)."""
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte "
                                "limit")
        await self._wait_send_room()
        buf = take_buffer(size)
        if fill(buf, 0) != size:
            raise ProtocolError(f"frame filler wrote a different size than the {size} announced")
        self._m.send_message(buf)
        del buf
        self.schedule_flush()

    async def _wait_send_room(self) -> None:
        m = self._m
        while not self._closed and m.send_buffered_bytes >= SEND_HIGH_WATER_BYTES:
            fut = self._loop.create_future()
            self._send_waiter = fut
            await fut
        if self._closed or m.state is not State.ESTABLISHED:
            raise self._closed_error()

    async def recv(self) -> bytes:
        q = self._recv_q
        while not q:
            if self._closed:
                raise self._closed_error()
            fut = self._loop.create_future()
            self._recv_waiter = fut
            await fut
        msg = q.popleft()
        if self._m.message_consumed(len(msg)):
            self.schedule_flush()
        return msg

    async def close(self) -> None:
        """Graceful: queued messages are delivered first (bounded by CLOSE_TIMEOUT_S)."""
        if self._closed:
            return
        self._m.close(self._loop.time())
        self.flush()
        if self._closed:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._closed_fut), CLOSE_TIMEOUT_S + 2.0)
        except TimeoutError:
            self.abort("close timed out")
        except asyncio.CancelledError:
            self.abort("close cancelled")
            raise

    def abort(self, reason: str = "reset locally") -> None:
        """Reset at once: the peer sees 'reset by peer'. Never raises."""
        if self._closed:
            return
        self._m.reset(reason)
        try:
            self.flush()
        except OSError:
            pass
        self._mark_closed(reason)


class UdpListener:
    transport = "udp"

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 handler: PipeHandler, datagram_bytes: int | None, loss_rate: float,
                 preauth: bool = True) -> None:
        self._loop = loop
        self._limit_preauth = preauth
        self._handler = handler
        # an int for anything else this listener starts (None only means "automatic" to the
        # Acceptor, which then grants loopback clients LOOPBACK_DATAGRAM_BYTES)
        self._datagram_bytes = DEFAULT_DATAGRAM_BYTES if datagram_bytes is None else datagram_bytes
        self._by_cid: dict[bytes, UdpPipe] = {}
        self._acceptor = Acceptor(loop.time(), datagram_bytes=datagram_bytes)
        self._dirty: set[UdpPipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped_datagrams = 0
        self.inits_answered = 0
        self._last_version_log = -VERSION_LOG_INTERVAL_S
        # pre-auth pipes by remote address, oldest first, with their deadline timers
        self._preauth: dict[str, dict[UdpPipe, asyncio.TimerHandle]] = {}
        self._preauth_count = 0
        self.refused_connections = 0  # valid cookie, but its address is at MAX_PREAUTH_PER_IP
        self.evicted_connections = 0
        self.expired_connections = 0
        self._port = int(sock.getsockname()[1])
        self._endpoint = _Endpoint(loop, sock, connected=False, loss_rate=loss_rate,
                                   on_datagrams=self._on_datagrams,
                                   on_batch_end=self._on_batch_end,
                                   on_error=self._on_error)
        self._closing = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def connections(self) -> int:
        return len(self._by_cid)

    @property
    def preauth_connections(self) -> int:
        """Connections whose peer has not authenticated yet."""
        return self._preauth_count

    @property
    def rejected_cookies(self) -> int:
        """COOKIE_ECHOs refused: forged, for another address, or expired."""
        return self._acceptor.forged_cookies + self._acceptor.expired_cookies

    def _on_datagrams(self, dgrams: list[bytes], addr: Any) -> None:
        if len(dgrams) > 1:
            pipe = self._by_cid.get(dgrams[0][2:10])
            if pipe is not None and pipe._addr == addr:
                # one GRO read is one flow: the machine checks each datagram's cid itself
                pipe.feed(dgrams)
                self._dirty.add(pipe)
                return
        for d in dgrams:
            self._on_datagram(d, addr)

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if len(data) < HEADER_BYTES or data[0] != MAGIC:
            self.dropped_datagrams += 1
            old = old_wire_version(data)
            if old is not None:
                self._log_old_version(old, addr)
            return
        pipe = self._by_cid.get(data[2:10])
        if pipe is None:
            ptype = data[1]
            if ptype == T_INIT and not self._closing:
                reply = self._acceptor.answer_init(data, addr, self._loop.time())
                if reply is not None:
                    self.inits_answered += 1
                    self._endpoint.send_or_drop([reply], addr)
                    return
            elif ptype == T_COOKIE_ECHO:
                self._accept(data, addr)
                return
            self.dropped_datagrams += 1
            return
        elif pipe._addr != addr:
            self.dropped_datagrams += 1  # no migration: a cid is bound to its address
            return
        pipe.feed([data])
        self._dirty.add(pipe)

    def _accept(self, data: bytes, addr: Any) -> None:
        """A COOKIE_ECHO for no connection we have: create it if the cookie is good."""
        if self._closing or len(self._by_cid) >= MAX_CONNECTIONS:
            self.dropped_datagrams += 1
            return
        limited = self._limit_preauth
        ip = str(addr[0])
        same = self._preauth.get(ip)
        if limited and same is not None and len(same) >= MAX_PREAUTH_PER_IP:
            # checked before the MAC: a full address costs no hashing; its client's
            # retransmitted echo gets in once a slot frees
            self.refused_connections += 1
            self.dropped_datagrams += 1
            return
        machine = self._acceptor.accept_echo(data, addr, self._loop.time(), preauth=limited)
        if machine is None:
            self.dropped_datagrams += 1
            return
        pipe = UdpPipe(machine, addr, self._endpoint.send, self._loop, self._forget)
        pipe.on_connected = self._on_connected
        if limited:
            if self._preauth_count >= MAX_PREAUTH_TOTAL:
                self._evict()
            pipe._on_authenticated = self._leave_preauth
            timer = self._loop.call_later(PREAUTH_DEADLINE_S, self._expire, pipe)
            self._preauth.setdefault(ip, {})[pipe] = timer
            self._preauth_count += 1
        self._by_cid[machine.local_cid] = pipe
        self._dirty.add(pipe)  # the flush reports Connected and sends the confirming ACK

    def _evict(self) -> None:
        # the address holding the most slots pays, oldest connection first
        ip = max(self._preauth, key=lambda k: len(self._preauth[k]))
        victim = next(iter(self._preauth[ip]))
        self.evicted_connections += 1
        self._leave_preauth(victim)
        victim.abort("too many unauthenticated connections")

    def _expire(self, pipe: UdpPipe) -> None:
        self.expired_connections += 1
        log.info("udp connection from %s:%d did not authenticate within %g s; reset",
                 *pipe.remote, PREAUTH_DEADLINE_S)
        self._leave_preauth(pipe)
        pipe.abort("did not authenticate in time")

    def _leave_preauth(self, pipe: UdpPipe) -> None:
        pipe._on_authenticated = None
        ip = pipe.remote[0]
        same = self._preauth.get(ip)
        if same is None or pipe not in same:
            return
        same.pop(pipe).cancel()
        if not same:
            del self._preauth[ip]
        self._preauth_count -= 1

    def _log_old_version(self, version: int, addr: Any) -> None:
        now = time.monotonic()
        if now - self._last_version_log >= VERSION_LOG_INTERVAL_S:
            self._last_version_log = now
            log.warning("udp INIT from %s:%s speaks udp wire version %d; this node speaks "
                        "version %d, so it cannot connect until it is upgraded", addr[0],
                        addr[1], version, WIRE_VERSION)

    def _on_connected(self, pipe: UdpPipe) -> None:
        task = self._loop.create_task(self._run_handler(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, pipe: UdpPipe) -> None:
        try:
            await self._handler(pipe)
        except asyncio.CancelledError:
            pass  # listener closing
        except P2PError as exc:
            log.info("udp connection from %s:%d ended: %s", *pipe.remote, exc)
        except Exception:  # a handler bug or a hostile peer must not kill the listener
            log.warning("udp handler for %s:%d failed", *pipe.remote, exc_info=True)
        finally:
            await pipe.close()

    def _forget(self, pipe: UdpPipe) -> None:
        self._leave_preauth(pipe)
        if self._by_cid.get(pipe.machine.local_cid) is pipe:
            del self._by_cid[pipe.machine.local_cid]
        self._dirty.discard(pipe)

    # -- hole punching (node/reach/punch.py) -------------------------------------------
    # Both run on the listening socket: its NAT mapping is the one peers observed and
    # were told about, and a reply to it reaches this listener's table of connections.
    async def connect_from_listener(self, host: str, port: int, *,
                                    timeout: float = CONNECT_TIMEOUT_S) -> UdpPipe:
        """A client connection to `host:port` sent from this listener's own socket."""
        if self._closing:
            raise PeerUnreachable("udp listener closed")
        addr = (host, port)
        machine = UdpConnection.client(self._loop.time(), datagram_bytes=self._datagram_bytes)
        pipe = UdpPipe(machine, addr, self._endpoint.send, self._loop, self._forget)
        self._by_cid[machine.local_cid] = pipe
        pipe.flush()
        try:
            await asyncio.wait_for(asyncio.shield(pipe.connected), timeout)
        except TimeoutError:
            pipe.abort("connect timed out")
            raise PeerUnreachable(f"udp connect to {host}:{port} timed out after "
                                  f"{timeout:g} s") from None
        except ChannelClosed:
            pipe.abort("connect failed")
            raise PeerUnreachable(f"udp connect to {host}:{port} failed: "
                                  f"{pipe.close_reason}") from None
        except asyncio.CancelledError:
            pipe.abort("connect cancelled")
            raise
        return pipe

    def send_datagram(self, data: bytes, host: str, port: int) -> None:
        """One raw datagram from the listening socket (a hole punch's opener); the peer's
        listener drops it as not ours (wrong magic). Never queues behind a busy socket."""
        self._endpoint.send_or_drop([data], (host, port))

    def _on_batch_end(self) -> None:
        dirty = self._dirty
        while dirty:
            dirty.pop().flush()

    def _on_error(self, exc: OSError) -> None:
        log.debug("udp listener socket error: %s", exc)  # unconnected: not attributable

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for pipe in list(self._by_cid.values()):
            pipe.abort("listener closed")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._endpoint.close()


async def listen(host: str, port: int, handler: PipeHandler, *,
                 datagram_bytes: int | None = None,  # None: udp_machine.auto_datagram_bytes
                 loss_rate: float = 0.0, preauth: bool = True) -> UdpListener:
    """Accept connections; with ``preauth`` (the default) each is held to the pre-auth
    limits until ``pipe.authenticated()``; ``preauth=False`` is for raw-pipe tools."""
    loop = asyncio.get_running_loop()
    with bind_errors("udp", host, port):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        sock = _make_socket(family, addr)
    return UdpListener(loop, sock, handler, datagram_bytes, loss_rate, preauth)


class _ClientEndpoint:
    """Glue for connect(): one socket connected to one peer, one pipe."""

    def __init__(self) -> None:
        self.pipe: UdpPipe | None = None
        self.endpoint: _Endpoint | None = None
        self.error: OSError | None = None

    def on_datagrams(self, dgrams: list[bytes], addr: Any) -> None:
        if self.pipe is not None:
            self.pipe.feed(dgrams)

    def on_batch_end(self) -> None:
        if self.pipe is not None:
            self.pipe.flush()

    def on_error(self, exc: OSError) -> None:
        self.error = exc
        if self.pipe is not None and not self.pipe.closed:
            self.pipe.fail(f"peer unreachable ({exc.strerror or exc.__class__.__name__})")

    def on_closed(self, pipe: UdpPipe) -> None:
        if self.endpoint is not None:
            # let the final CLOSE/RESET datagrams leave before the socket goes
            self.endpoint.loop.call_soon(self.endpoint.close)


async def connect(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S,
                  datagram_bytes: int | None = None,  # None: udp_machine.auto_datagram_bytes
                  loss_rate: float = 0.0,
                  local_addr: tuple[str, int] | None = None) -> UdpPipe:
    """Open a pipe; PeerUnreachable on timeout, ICMP refusal or a bad address.

    Each address of ``host`` is tried in turn while the peer refuses (so
    "localhost" reaches a listener on 127.0.0.1 even if ::1 comes first).
    ``local_addr`` binds the socket first (tests and benchmarks pick a source)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise PeerUnreachable(f"cannot reach {host}:{port} over udp: "
                              f"{exc.strerror or exc.__class__.__name__}") from None
    why = "no address"
    seen: set[Any] = set()
    for family, _, _, _, addr in infos:
        if addr in seen:
            continue
        seen.add(addr)
        pipe, why = await _connect_one(loop, family, addr, deadline, datagram_bytes, loss_rate,
                                       local_addr)
        if pipe is not None:
            return pipe
        if why == "timeout":
            raise PeerUnreachable(f"udp connect to {host}:{port} timed out after {timeout:g} s "
                                  "(no answer; is the peer listening on udp, and does it "
                                  f"speak udp wire version {WIRE_VERSION}?)")
    raise PeerUnreachable(f"cannot reach {host}:{port} over udp: {why}")


async def _connect_one(loop: asyncio.AbstractEventLoop, family: int, addr: Any,
                       deadline: float, datagram_bytes: int | None, loss_rate: float,
                       local_addr: tuple[str, int] | None) -> tuple[UdpPipe | None, str]:
    try:
        sock = _make_socket(family, local_addr)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        return None, exc.strerror or exc.__class__.__name__
    glue = _ClientEndpoint()
    glue.endpoint = _Endpoint(loop, sock, connected=True, loss_rate=loss_rate,
                              on_datagrams=glue.on_datagrams, on_batch_end=glue.on_batch_end,
                              on_error=glue.on_error)
    machine = UdpConnection.client(loop.time(), datagram_bytes=auto_datagram_bytes(addr)
                                   if datagram_bytes is None else datagram_bytes)
    pipe = UdpPipe(machine, addr, glue.endpoint.send, loop, glue.on_closed)
    glue.pipe = pipe
    pipe.flush()
    try:
        await asyncio.wait_for(asyncio.shield(pipe.connected), max(0.0, deadline - loop.time()))
    except TimeoutError:
        pipe.abort("connect timed out")
        return None, "timeout"
    except ChannelClosed:
        pipe.abort("connect failed")
        err = glue.error
        return None, (err.strerror or str(err)) if err is not None else pipe.close_reason
    except asyncio.CancelledError:
        pipe.abort("connect cancelled")
        raise
    return pipe, ""

"""TCP transport: asyncio carrying u32 big-endian length-prefixed messages.

Implements the Pipe/Listener interface of ``node/transports/base.py``. Knows
nothing about identities, trust or encryption (``node/channel.py`` adds those);
must not import channel, secure, trust or anything above the transports.

Built on ``asyncio.BufferedProtocol`` (the layer under asyncio streams) so a
large message is received straight into its own buffer: no stream-buffer
append and no slice copy per message, which streams cost at 1 MiB messages.

* A header announcing more than ``MAX_MESSAGE_BYTES`` is refused before any
  payload is buffered (ProtocolError, the pipe is closed).
* ``send`` writes header and payload with ``writelines`` (no concatenation
  copy) and waits while the transport's write buffer is above
  ``WRITE_HIGH_WATER_BYTES`` (backpressure via pause_writing/resume_writing).
  ``send_frame`` lets the caller (the channel's frame sealing) write a large
  message straight into a reused buffer behind its length header: one write,
  no allocation, no copy.
* Large messages (>= ``POOLED_MIN_BYTES``) live in reused buffers: allocating
  and first touching 1 MiB of fresh memory per message (glibc hands big blocks
  back to the kernel) cost more page faults than the AEAD itself. A received
  bytearray belongs to the caller outright (``recv_buffers_owned``); the pool
  takes a buffer back only once nothing references it any more (CPython
  reference counts), so a message someone still holds is never overwritten.
* Receiving pauses the socket while more than ``READ_HIGH_WATER_BYTES`` of
  complete messages wait for ``recv()``: memory per pipe stays bounded.
* A handler's exception is logged and its pipe closed; the listener keeps serving.

Before authentication an accepted connection costs a bounded amount of memory
and holds a bounded slot (DESIGN.md, "Before authentication"):

* it may announce frames of at most ``MAX_PREAUTH_FRAME_BYTES`` (the handshake's
  messages are far smaller), reads through a small buffer and stops reading
  once ``PREAUTH_READ_HIGH_WATER_BYTES`` wait unread;
* at most ``MAX_HALF_OPEN_PER_IP`` such connections per remote address (more
  are closed at once) and ``MAX_HALF_OPEN_TOTAL`` in all; when the total is
  reached, a new connection evicts the oldest half-open one of the address that
  holds the most, so a flood from a few addresses cannot crowd out a peer
  connecting from another one;
* it must finish within ``PREAUTH_DEADLINE_S`` or is closed.

The channel layer ends this phase by calling ``pipe.authenticated()`` once the
peer proved its identity and is trusted; from then on the normal limits apply.
Pipes from ``connect()`` (we chose to dial) and listeners opened with
``preauth=False`` (raw-pipe tools and tests) have no pre-auth phase.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import threading
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

log = logging.getLogger(__name__)

name = "tcp"
HEADER = struct.Struct(">I")
# what one read takes between messages: the start of a large message read this way is
# copied into the message's own buffer (the rest is read straight into it), so this stays
# small: at 256 KiB a quarter of every 1 MiB chunk was copied once more
READ_CHUNK_BYTES = 64 * 1024
# bodies at least this large are received directly into their own buffer
DIRECT_READ_MIN_BYTES = 64 * 1024
# complete messages waiting for recv() and unsent bytes in user space: the kernel's socket
# buffers (megabytes on their own) keep the pipe full, so one 1 MiB message each is enough;
# 4 MiB each cost ~4 MB of peak RSS per node in a share (no throughput loss measurable here)
READ_HIGH_WATER_BYTES = 1024 * 1024
WRITE_HIGH_WATER_BYTES = 1024 * 1024
WRITE_LOW_WATER_BYTES = 256 * 1024
POOLED_MIN_BYTES = 64 * 1024
# per thread (one event loop each); with 1 MiB messages a busy pipe cycles ~4 buffers
POOL_MAX_BUFFERS = 8
POOL_MAX_BYTES = 12 * 1024 * 1024
_ZEROS = memoryview(bytes(64 * 1024))
# --- before authentication (accepted connections only) ---------------------------------
# handshake messages are at most secure.MAX_HANDSHAKE_MSG_BYTES (512) and verdicts smaller
MAX_PREAUTH_FRAME_BYTES = 4 * 1024
PREAUTH_READ_CHUNK_BYTES = 8 * 1024
PREAUTH_READ_HIGH_WATER_BYTES = 16 * 1024
MAX_HALF_OPEN_PER_IP = 32
MAX_HALF_OPEN_TOTAL = 256
# longer than the channel's own 10 s handshake timeout, whose error is the clearer one
PREAUTH_DEADLINE_S = 15.0
REFUSAL_LOG_INTERVAL_S = 10.0

# Fills buf[offset:offset + size] in place and returns the number of bytes written.
FrameFiller = Callable[[bytearray, int], int]


class _BufferPool:
    """Reusable bytearrays for large messages; one pool per thread (event loop).

    ``take(n)`` returns a bytearray of exactly n bytes (stale contents: the
    caller overwrites all of them) that nobody else references. A buffer is
    reused only when its one remaining reference is the pool's own, so a
    message still held by a consumer, or by the event loop's unsent-data
    buffer, is never handed out twice. Capacities come in coarse size classes
    and a buffer changes length only within its allocation (no realloc, no
    page faults).
    """

    def __init__(self) -> None:
        self._bufs: list[bytearray] = []
        self._caps: list[int] = []  # capacity each buffer was made with
        self.users = 0  # open pipes of this thread; the last one to close empties the pool

    @staticmethod
    def _capacity(n: int) -> int:
        """n rounded up to 1/16 of its power of two: a 1 MiB body and a 1 MiB frame
        with its header share one size class, and at most ~1/8 is unused."""
        step = max(4096, 1 << max(n.bit_length() - 4, 0))
        return -(-n // step) * step

    def take(self, n: int) -> bytearray:
        cap = self._capacity(n)
        bufs, caps = self._bufs, self._caps
        spare = -1  # a free buffer of another size class, replaceable when the pool is full
        for i in range(len(bufs)):
            # 2 = the list's reference + getrefcount's argument: nobody else holds it
            if sys.getrefcount(bufs[i]) == 2:
                if caps[i] == cap and bufs[i].__alloc__() == cap + 1:
                    buf = bufs[i]
                    _set_length(buf, n)
                    return buf
                spare = i
        buf = bytearray(cap)
        total = sum(caps)
        if len(bufs) < POOL_MAX_BUFFERS and total + cap <= POOL_MAX_BYTES:
            bufs.append(buf)
            caps.append(cap)
        elif spare >= 0 and total - caps[spare] + cap <= POOL_MAX_BYTES:
            bufs[spare], caps[spare] = buf, cap
        _set_length(buf, n)
        return buf

    def clear(self) -> None:
        """Forget every buffer (one still in use stays valid for its holder)."""
        self._bufs.clear()
        self._caps.clear()

    def retain(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.users = 0
            self.clear()  # an idle node keeps no large buffers
        else:
            self.trim()

    def trim(self) -> None:
        """Forget the buffers nobody else holds (those in use stay pooled for their pipe).

        Run when a pipe closes while others stay open: a node's gossip channel outlives
        every transfer, and a quic share's receiver had grown the pool to five 1.1 MiB
        buffers (the sender's window in flight), which it then kept idle (~6 MB)."""
        keep = [i for i in range(len(self._bufs)) if sys.getrefcount(self._bufs[i]) > 2]
        self._bufs[:] = [self._bufs[i] for i in keep]
        self._caps[:] = [self._caps[i] for i in keep]


def _set_length(buf: bytearray, n: int) -> None:
    """Shrink or grow `buf` to n bytes within its allocation (grown bytes are zeros)."""
    have = len(buf)
    if have > n:
        del buf[n:]
    while have < n:
        step = min(n - have, len(_ZEROS))
        buf += _ZEROS[:step]
        have += step


_pools = threading.local()
_REFCOUNTS = sys.implementation.name == "cpython"


def buffer_pool() -> _BufferPool:
    """This thread's pool of large receive buffers, shared by its tcp and quic pipes (each
    pipe retains it while open; the last to close empties it)."""
    pool: _BufferPool | None = getattr(_pools, "pool", None)
    if pool is None:
        pool = _pools.pool = _BufferPool()
    return pool


def take_buffer(n: int) -> bytearray:
    """A bytearray of n bytes for a large message: pooled if possible, else fresh."""
    if n < POOLED_MIN_BYTES or not _REFCOUNTS:
        return bytearray(n)
    return buffer_pool().take(n)


class _FrameProtocol(asyncio.BufferedProtocol):
    """Parses length-prefixed frames into a bounded queue; tracks write pausing."""

    def __init__(self, *, preauth: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.preauth = preauth
        self.max_frame_bytes = MAX_PREAUTH_FRAME_BYTES if preauth else MAX_MESSAGE_BYTES
        self._high_water = PREAUTH_READ_HIGH_WATER_BYTES if preauth else READ_HIGH_WATER_BYTES
        self._chunk = bytearray(PREAUTH_READ_CHUNK_BYTES if preauth else READ_CHUNK_BYTES)
        self._chunk_view = memoryview(self._chunk)
        self._hdr = bytearray()
        self._body: bytearray | None = None
        self._body_view: memoryview | None = None
        self._body_got = 0
        self._direct = False
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.error: P2PError | None = None
        self.eof = False
        self._reading_paused = False
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.connected = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not every socket family supports it; not fatal
                pass
        writer: Any = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass
        writer.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES, low=WRITE_LOW_WATER_BYTES)
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body_view is not None and len(self._body_view) - self._body_got >= \
                DIRECT_READ_MIN_BYTES:
            self._direct = True
            return self._body_view[self._body_got:]
        self._direct = False
        return self._chunk_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._body_got += nbytes
            if self._body is not None and self._body_got == len(self._body):
                self._finish_body()
            return
        try:
            self._parse(self._chunk_view[:nbytes])
        except ProtocolError as exc:
            self._fail(exc)

    def _parse(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._body is None:
                take = min(HEADER.size - len(self._hdr), end - pos)
                self._hdr += data[pos:pos + take]
                pos += take
                if len(self._hdr) < HEADER.size:
                    return
                (n,) = HEADER.unpack(self._hdr)
                self._hdr.clear()
                if n > self.max_frame_bytes:
                    if self.preauth:
                        raise ProtocolError(
                            f"peer announced a {n}-byte message before authenticating "
                            f"(limit {self.max_frame_bytes})")
                    raise ProtocolError(
                        f"peer announced a {n}-byte message (limit {MAX_MESSAGE_BYTES})"
                    )
                if n == 0:
                    self._deliver(b"")
                    continue
                if n <= end - pos:  # whole small message in this chunk: one copy
                    self._deliver(bytes(data[pos:pos + n]))
                    pos += n
                    continue
                self._body = take_buffer(n)
                self._body_view = memoryview(self._body)
                self._body_got = 0
            else:
                take = min(len(self._body) - self._body_got, end - pos)
                self._body_view[self._body_got:self._body_got + take] = data[pos:pos + take]  # type: ignore[index]
                self._body_got += take
                pos += take
                if self._body_got == len(self._body):
                    self._finish_body()

    def _finish_body(self) -> None:
        assert self._body is not None and self._body_view is not None
        # handed over as-is: a bytes() copy of fresh memory costs as much as decrypting it
        body: Any = self._body
        self._body_view.release()
        self._body = self._body_view = None
        self._body_got = 0
        self._deliver(body)

    def _deliver(self, msg: bytes) -> None:
        self.queue.append(msg)
        self.queued_bytes += len(msg)
        if self.queued_bytes > self._high_water and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def _fail(self, exc: P2PError) -> None:
        if self.error is None:
            self.error = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = ChannelClosed(f"tcp connection failed: {exc.__class__.__name__}")
        self._write_paused = False
        self._wake()
        if not self.connected.done():
            self.connected.set_exception(ChannelClosed("tcp connection lost while opening"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def end_preauth(self) -> None:
        """The peer authenticated: full-size frames, the large read buffer, the full queue.

        Called from a coroutine, never between get_buffer() and buffer_updated(),
        so swapping the read buffer is safe."""
        if not self.preauth:
            return
        self.preauth = False
        self.max_frame_bytes = MAX_MESSAGE_BYTES
        self._high_water = READ_HIGH_WATER_BYTES
        self._chunk = bytearray(READ_CHUNK_BYTES)
        self._chunk_view = memoryview(self._chunk)
        if self._reading_paused and self.queued_bytes <= self._high_water // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- used by TcpPipe -------------------------------------------------------------
    def pop(self) -> bytes | None:
        if not self.queue:
            return None
        msg = self.queue.popleft()
        self.queued_bytes -= len(msg)
        if self._reading_paused and self.queued_bytes <= self._high_water // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return msg

    async def wait_readable(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_writable(self) -> None:
        while self._write_paused and not self.eof and self.error is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class TcpPipe:
    """One TCP connection as a message pipe."""

    transport = "tcp"
    # every bytearray recv() returns is the caller's alone (may be decrypted in place)
    recv_buffers_owned = True

    def __init__(self, proto: _FrameProtocol) -> None:
        assert proto.transport is not None
        self._proto = proto
        self._transport = proto.transport
        self._closed = False
        # set by the listener while this accepted pipe is half-open (pre-auth)
        self._on_authenticated: Callable[[TcpPipe], None] | None = None
        self._pool = buffer_pool()
        self._pool.retain()
        peer: Any = self._transport.get_extra_info("peername")
        self.remote: tuple[str, int] = (
            (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("?", 0)
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _where(self) -> str:
        return f"tcp connection to {self.remote[0]}:{self.remote[1]}"

    async def send(self, data: bytes) -> None:
        n = len(data)
        if n > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        proto = self._proto
        if self._closed or proto.eof or proto.error is not None or self._transport.is_closing():
            raise ChannelClosed(f"{self._where()} is closed")
        self._transport.writelines((HEADER.pack(n), data) if n else (HEADER.pack(0),))
        await self._backpressure()

    async def send_many(self, messages: list[bytes]) -> None:
        """Send several messages with one write (one syscall for a burst of small ones)."""
        parts: list[bytes] = []
        for data in messages:
            n = len(data)
            if n > MAX_MESSAGE_BYTES:
                raise ProtocolError(
                    f"message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
            parts.append(HEADER.pack(n))
            if n:
                parts.append(data)
        proto = self._proto
        if self._closed or proto.eof or proto.error is not None or self._transport.is_closing():
            raise ChannelClosed(f"{self._where()} is closed")
        if len(parts) > 2:  # writelines on a list of small parts: join them, one buffer
            self._transport.write(b"".join(parts))
        else:
            self._transport.writelines(parts)
        await self._backpressure()

    async def send_frame(self, size: int, fill: FrameFiller) -> None:
        """Send one `size`-byte message that ``fill(buf, offset)`` writes at buf[offset:].

        The message is built in a reused buffer right behind its length header
        and written at once; the buffer returns to the pool when the event loop
        has handed every byte to the kernel.
        """
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError(
                f"message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        proto = self._proto
        if self._closed or proto.eof or proto.error is not None or self._transport.is_closing():
            raise ChannelClosed(f"{self._where()} is closed")
        buf = take_buffer(HEADER.size + size)
        HEADER.pack_into(buf, 0, size)
        if fill(buf, HEADER.size) != size:
            raise ProtocolError(f"frame filler wrote a different size than the {size} announced")
        self._transport.write(buf)
        del buf
        await self._backpressure()

    async def _backpressure(self) -> None:
        proto = self._proto
        if proto._write_paused:
            await proto.wait_writable()
            if proto.error is not None and not isinstance(proto.error, ProtocolError):
                await self.close()
                raise ChannelClosed(f"{self._where()} failed") from None

    async def recv(self) -> bytes:
        """The next message (a bytearray for large ones: bytes-like, never copied)."""
        proto = self._proto
        while True:
            if self._closed:
                raise ChannelClosed(f"{self._where()} is closed")
            msg = proto.pop()
            if msg is not None:
                return msg
            if proto.error is not None:
                err = proto.error
                await self.close()
                if isinstance(err, ProtocolError):
                    raise ProtocolError(f"{err} from {self.remote[0]}:{self.remote[1]}")
                raise ChannelClosed(f"{self._where()} failed: {err}")
            if proto.eof:
                await self.close()
                raise ChannelClosed(f"{self._where()} closed by the peer")
            await proto.wait_readable()

    def recv_nowait(self) -> bytes | None:
        """The next message if one is already queued, else None (never waits, never raises:
        end of stream and errors are reported by ``recv()``). Lets a busy consumer take
        buffered messages without a task and a wake-up per message."""
        if self._closed:
            return None
        return self._proto.pop()

    @property
    def preauth(self) -> bool:
        """True while pre-authentication limits apply to what the peer sends."""
        return self._proto.preauth

    def authenticated(self) -> None:
        """The channel layer's word that the peer is authenticated and trusted: lifts the
        pre-auth limits and frees the half-open slot. Idempotent."""
        hook, self._on_authenticated = self._on_authenticated, None
        if hook is not None:
            hook(self)
        self._proto.end_preauth()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.release()
        trim_freed_memory_soon()
        self._transport.close()  # flushes what is buffered, then closes
        self._proto._wake()
        await asyncio.sleep(0)  # let the loop run the close callbacks

    def abort(self) -> None:
        """Drop the connection at once (RST), discarding anything unsent. Never raises."""
        if self._closed:
            return
        self._closed = True
        self._pool.release()
        trim_freed_memory_soon()
        self._transport.abort()
        self._proto._wake()


class TcpListener:
    transport = "tcp"

    def __init__(self, handler: PipeHandler, *, preauth: bool = True) -> None:
        self._handler = handler
        self._preauth = preauth
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pipes: set[TcpPipe] = set()
        # half-open (accepted, not yet authenticated) pipes by remote address, oldest first
        self._half_open: dict[str, dict[TcpPipe, asyncio.TimerHandle]] = {}
        self._half_open_count = 0
        self.refused_connections = 0  # over MAX_HALF_OPEN_PER_IP
        self.evicted_connections = 0  # pushed out by a newer one at MAX_HALF_OPEN_TOTAL
        self.expired_connections = 0  # did not authenticate within PREAUTH_DEADLINE_S
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL_S

    @property
    def half_open(self) -> int:
        """Accepted connections that have not authenticated yet."""
        return self._half_open_count

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _make_protocol(self) -> _FrameProtocol:
        proto = _FrameProtocol(preauth=self._preauth)
        task = asyncio.get_running_loop().create_task(self._serve(proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proto

    async def _serve(self, proto: _FrameProtocol) -> None:
        try:
            await proto.connected
        except ChannelClosed:
            return
        pipe = TcpPipe(proto)
        if self._preauth and not self._admit(pipe):
            pipe.abort()
            return
        self._pipes.add(pipe)
        try:
            await self._handler(pipe)
        except asyncio.CancelledError:
            pass  # listener closing
        except P2PError as exc:  # expected: peer closed, refused, broke the protocol
            log.info("tcp connection from %s:%d ended: %s", *pipe.remote, exc)
        except Exception:  # a handler bug or a hostile peer must not kill the listener
            log.warning("tcp handler for %s:%d failed", *pipe.remote, exc_info=True)
        finally:
            self._leave_half_open(pipe)
            await pipe.close()
            self._pipes.discard(pipe)

    # -- half-open accounting ----------------------------------------------------------
    def _admit(self, pipe: TcpPipe) -> bool:
        """Take a half-open slot for `pipe`, evicting another at the total cap; False if
        its address holds MAX_HALF_OPEN_PER_IP already."""
        ip = pipe.remote[0]
        same = self._half_open.get(ip)
        if same is not None and len(same) >= MAX_HALF_OPEN_PER_IP:
            self.refused_connections += 1
            self._log_refusal(f"refused tcp connection from {ip}: {len(same)} connections "
                              f"from it are still unauthenticated (limit "
                              f"{MAX_HALF_OPEN_PER_IP})")
            return False
        if self._half_open_count >= MAX_HALF_OPEN_TOTAL:
            self._evict()
        timer = asyncio.get_running_loop().call_later(PREAUTH_DEADLINE_S, self._expire, pipe)
        self._half_open.setdefault(ip, {})[pipe] = timer
        self._half_open_count += 1
        pipe._on_authenticated = self._leave_half_open
        return True

    def _evict(self) -> None:
        # the address holding the most slots pays, oldest connection first
        ip = max(self._half_open, key=lambda k: len(self._half_open[k]))
        victim = next(iter(self._half_open[ip]))
        self.evicted_connections += 1
        self._log_refusal(f"{MAX_HALF_OPEN_TOTAL} tcp connections are unauthenticated; "
                          f"dropping the oldest from {ip}")
        self._leave_half_open(victim)
        victim.abort()

    def _expire(self, pipe: TcpPipe) -> None:
        self.expired_connections += 1
        log.info("tcp connection from %s:%d did not authenticate within %g s; closed",
                 *pipe.remote, PREAUTH_DEADLINE_S)
        self._leave_half_open(pipe)
        pipe.abort()

    def _leave_half_open(self, pipe: TcpPipe) -> None:
        pipe._on_authenticated = None
        ip = pipe.remote[0]
        same = self._half_open.get(ip)
        if same is None or pipe not in same:
            return
        same.pop(pipe).cancel()
        if not same:
            del self._half_open[ip]
        self._half_open_count -= 1

    def _log_refusal(self, message: str) -> None:
        # a flood must not become a flood of log lines: one line per interval
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
            self._last_refusal_log = now
            log.warning("%s (further refusals for %g s are only counted)", message,
                        REFUSAL_LOG_INTERVAL_S)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self._pipes):
            await pipe.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()


async def listen(host: str, port: int, handler: PipeHandler, *,
                 preauth: bool = True) -> TcpListener:
    """Accept connections; with ``preauth`` (the default) each is held to the pre-auth
    limits until ``pipe.authenticated()`` (see the module docstring)."""
    listener = TcpListener(handler, preauth=preauth)
    loop = asyncio.get_running_loop()
    with bind_errors("tcp", host, port):
        listener._server = await loop.create_server(listener._make_protocol, host, port)
    return listener


async def connect(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S) -> TcpPipe:
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(_FrameProtocol, host, port), timeout
        )
    except TimeoutError:
        raise PeerUnreachable(
            f"tcp connect to {host}:{port} timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise PeerUnreachable(
            f"cannot reach {host}:{port} over tcp: {exc.strerror or exc.__class__.__name__}"
        ) from None
    return TcpPipe(proto)

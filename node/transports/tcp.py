"""TCP transport: asyncio streams carrying u32 big-endian length-prefixed messages.

Implements the Pipe/Listener interface of ``node/transports/base.py``. Knows
nothing about identities, trust or encryption (``node/channel.py`` adds those);
must not import channel, secure, trust or anything above the transports.

* A header announcing more than ``MAX_MESSAGE_BYTES`` is refused before any
  payload is buffered (ProtocolError, the pipe is closed).
* ``send`` writes header and payload with ``writelines`` (no concatenation
  copy) and awaits ``drain()``: backpressure once the kernel and transport
  buffers pass ``WRITE_HIGH_WATER_BYTES``.
* The stream reader pauses the socket past ``2 * READ_LIMIT_BYTES`` of unread data.
* A handler's exception is logged and its pipe closed; the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from node.errors import ChannelClosed, LocalIOError, P2PError, PeerUnreachable, ProtocolError
from node.transports.base import CONNECT_TIMEOUT_S, MAX_MESSAGE_BYTES, PipeHandler

log = logging.getLogger(__name__)

name = "tcp"
HEADER = struct.Struct(">I")
READ_LIMIT_BYTES = 1 << 20
WRITE_HIGH_WATER_BYTES = 4 << 20
WRITE_LOW_WATER_BYTES = 1 << 20


def _tune_socket(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not every socket family supports it; not fatal
            pass
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES,
                                             low=WRITE_LOW_WATER_BYTES)


class TcpPipe:
    """One TCP connection as a message pipe."""

    transport = "tcp"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False
        peer: Any = writer.get_extra_info("peername")
        self.remote: tuple[str, int] = (
            (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("?", 0)
        )
        _tune_socket(writer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed(f"tcp connection to {self.remote[0]}:{self.remote[1]} is closed")
        n = len(data)
        if n > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            self._writer.writelines((HEADER.pack(n), data))
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            await self.close()
            raise ChannelClosed(f"tcp connection to {self.remote[0]}:{self.remote[1]} "
                                f"failed: {exc.__class__.__name__}") from None

    async def recv(self) -> bytes:
        if self._closed:
            raise ChannelClosed(f"tcp connection to {self.remote[0]}:{self.remote[1]} is closed")
        try:
            header = await self._reader.readexactly(HEADER.size)
            (n,) = HEADER.unpack(header)
            if n > MAX_MESSAGE_BYTES:
                await self.close()
                raise ProtocolError(
                    f"peer {self.remote[0]}:{self.remote[1]} announced a {n}-byte message "
                    f"(limit {MAX_MESSAGE_BYTES})"
                )
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            await self.close()
            raise ChannelClosed(f"tcp connection to {self.remote[0]}:{self.remote[1]} "
                                "closed by the peer") from None
        except (ConnectionError, OSError) as exc:
            await self.close()
            raise ChannelClosed(f"tcp connection to {self.remote[0]}:{self.remote[1]} "
                                f"failed: {exc.__class__.__name__}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
            await self._writer.wait_closed()
        except (ConnectionError, OSError, RuntimeError):
            pass  # the peer may already have reset the connection; closing is best effort


class TcpListener:
    transport = "tcp"

    def __init__(self, handler: PipeHandler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pipes: set[TcpPipe] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        pipe = TcpPipe(reader, writer)
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
            await pipe.close()
            self._pipes.discard(pipe)
            if task is not None:
                self._tasks.discard(task)

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


async def listen(host: str, port: int, handler: PipeHandler) -> TcpListener:
    listener = TcpListener(handler)
    try:
        listener._server = await asyncio.start_server(
            listener._on_connect, host, port, limit=READ_LIMIT_BYTES
        )
    except OSError as exc:
        raise LocalIOError(f"cannot listen on tcp {host}:{port}: {exc.strerror}") from None
    return listener


async def connect(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S) -> TcpPipe:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=READ_LIMIT_BYTES), timeout
        )
    except asyncio.TimeoutError:
        raise PeerUnreachable(
            f"tcp connect to {host}:{port} timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise PeerUnreachable(
            f"cannot reach {host}:{port} over tcp: {exc.strerror or exc.__class__.__name__}"
        ) from None
    return TcpPipe(reader, writer)

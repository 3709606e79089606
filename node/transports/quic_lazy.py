"""The `quic` transport as the node registers it: qh3 is imported only once QUIC is used.

``node/transports/quic.py`` imports qh3 (and builds a TLS certificate) as soon as
it is imported: about 6 MB of resident memory that a node which never speaks QUIC
would carry for nothing. This module has the same ``listen``/``connect`` API
without importing it:

* ``connect`` imports the real module on the first dial;
* ``listen`` binds the UDP socket at once (a busy port fails at start, as
  before) with a small waiting protocol. The first datagram that arrives starts
  the real listener on a duplicate of the same socket (so no datagram the kernel
  queued is lost), then the waiting protocol closes and hands over what it held:
  at most ``MAX_HELD_DATAGRAMS`` datagrams (a QUIC client retransmits anything
  dropped). QUIC tolerates the reordering this may cause.

The real listener serves the certificate pair kept in ``cert_home`` (set once by
the daemon, ``use_cert_home``; node/transports/certs.py), or an in-memory one
when it is None (tests, benchmarks).

Imports only errors and transports.base; must not import qh3 at module level.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from node.errors import bind_errors
from node.transports.base import CONNECT_TIMEOUT_S, Pipe

log = logging.getLogger(__name__)

name = "quic"
REAL_MODULE = "node.transports.quic"
MAX_HELD_DATAGRAMS = 64
MAX_HELD_BYTES = 256 * 1024

PipeHandler = Callable[[Pipe], Awaitable[None]]

# the home dir whose certificate pair a lazily started listener serves (None: in memory)
cert_home: Path | None = None

if importlib.util.find_spec("qh3") is None:  # the registry reports quic as unavailable
    raise ImportError("the QUIC library qh3 is not installed", name="qh3")


def use_cert_home(home: Path | None) -> None:
    """Serve the pair in `home` (created there if missing) from listeners started later."""
    global cert_home
    cert_home = home


def _real() -> ModuleType:
    return importlib.import_module(REAL_MODULE)


class _Waiting(asyncio.DatagramProtocol):
    """Holds the first datagrams until the real listener is up."""

    def __init__(self, listener: LazyQuicListener) -> None:
        self._listener = listener
        self.held: list[tuple[bytes, Any]] = []
        self.held_bytes = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if (len(self.held) < MAX_HELD_DATAGRAMS
                and self.held_bytes + len(data) <= MAX_HELD_BYTES):
            self.held.append((data, addr))
            self.held_bytes += len(data)
        self._listener._wake()

    def error_received(self, exc: Exception) -> None:
        log.debug("QUIC socket error before the first connection: %s", exc)


class LazyQuicListener:
    """A bound UDP socket that becomes a ``quic.QuicListener`` at its first datagram."""

    transport = "quic"

    def __init__(self, handler: PipeHandler, sock: socket.socket) -> None:
        self._handler = handler
        self._sock = sock
        self._port = int(sock.getsockname()[1])
        self._waiting: _Waiting | None = None
        self._waiting_transport: asyncio.DatagramTransport | None = None
        self._upgrade: asyncio.Task[None] | None = None
        self.real: Any = None  # the quic.QuicListener once started
        self._closed = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def started(self) -> bool:
        """True once the first datagram made this a real QUIC listener (qh3 imported)."""
        return self.real is not None

    def _wake(self) -> None:
        if self._upgrade is None and not self._closed:
            self._upgrade = asyncio.get_running_loop().create_task(self._start_real())

    async def _start_real(self) -> None:
        try:
            # the import takes ~0.2 s of CPU: off the event loop
            real = await asyncio.to_thread(_real)
            if self._closed:
                return
            dup = self._sock.dup()
            try:
                # a home that is gone (an in-process test's) falls back to an in-memory pair
                home = cert_home if cert_home is not None and cert_home.is_dir() else None
                self.real = await real.listen_on_socket(dup, self._handler, home=home)
            except BaseException:
                dup.close()
                raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("cannot start the QUIC listener on port %d", self._port, exc_info=True)
            return
        waiting, self._waiting = self._waiting, None
        if self._waiting_transport is not None:
            self._waiting_transport.close()  # our copy of the socket; the dup stays open
            self._waiting_transport = None
        if waiting is not None:
            server = self.real._server
            for data, addr in waiting.held:
                server.datagram_received(data, addr)
            waiting.held.clear()
        log.info("QUIC listener on port %d started at its first datagram", self._port)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._upgrade is not None and not self._upgrade.done():
            self._upgrade.cancel()
            await asyncio.gather(self._upgrade, return_exceptions=True)
        if self._waiting_transport is not None:
            self._waiting_transport.close()
            self._waiting_transport = None
        if self.real is not None:
            await self.real.close()
        await asyncio.sleep(0)  # let the transport close its socket


async def listen(host: str, port: int, handler: PipeHandler, **kwargs: Any) -> Any:
    """Bind host:port now; start QUIC (qh3) at the first datagram. With keyword
    arguments (``home=``) the real listener starts at once."""
    if kwargs:
        return await _real().listen(host, port, handler, **kwargs)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    with bind_errors("quic", host, port):
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    listener = LazyQuicListener(handler, sock)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Waiting(listener), sock=sock)
    listener._waiting_transport = transport
    listener._waiting = proto
    return listener


async def connect(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S) -> Pipe:
    pipe: Pipe = await _real().connect(host, port, timeout=timeout)
    return pipe

"""TCP before authentication: handshake-sized frames, half-open caps per address and in
total, a deadline, a bounded read queue, and trusted peers still served meanwhile.

Attackers connect from other loopback addresses (127.0.0.2, 127.0.0.3) so that the
per-address cap can be told apart from the honest client on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from node.channel import accept_channel, open_channel
from node.errors import P2PError, ProtocolError
from node.identity import Identity
from node.transports import tcp
from node.transports.base import Pipe
from tests.helpers import trusting

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
HOST = "127.0.0.1"
WAIT_S = 5.0


async def until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Server:
    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.listener: tcp.TcpListener | None = None

    async def handler(self, pipe: Pipe) -> None:
        try:
            ch = await accept_channel(pipe, BOB, authorize=trusting(ALICE), timeout_s=WAIT_S)
        except P2PError as exc:
            self.events.put_nowait(("handshake-failed", exc))
            return
        try:
            while True:
                await ch.send(await ch.recv())
        except P2PError:
            pass
        finally:
            await ch.close()

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    async def honest_round_trip(self, size: int = 100) -> None:
        ch = await open_channel(await tcp.connect(HOST, self.port), ALICE,
                                expected_peer=BOB.peer_id, authorize=trusting(BOB),
                                timeout_s=WAIT_S)
        try:
            await ch.send(b"h" * size)
            assert await asyncio.wait_for(ch.recv(), WAIT_S) == b"h" * size
        finally:
            await ch.close()


@pytest.fixture
async def server() -> Any:
    srv = Server()
    srv.listener = await tcp.listen(HOST, 0, srv.handler)
    yield srv
    await srv.listener.close()


def raw_from(source_ip: str, port: int) -> socket.socket:
    """A blocking TCP connection to the listener from `source_ip` (a loopback address)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source_ip, 0))
    s.settimeout(WAIT_S)
    s.connect((HOST, port))
    return s


def hung_up(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("announced", [tcp.MAX_PREAUTH_FRAME_BYTES + 1, 8 * 1024 * 1024])
async def test_oversize_frame_before_authentication_is_refused(server: Server,
                                                               announced: int) -> None:
    s = raw_from(HOST, server.port)
    try:
        s.sendall(announced.to_bytes(4, "big") + b"\x00" * 1000)
        kind, exc = await asyncio.wait_for(server.events.get(), WAIT_S)
        assert kind == "handshake-failed" and isinstance(exc, ProtocolError)
        assert "before authenticating" in str(exc)
        await until(lambda: hung_up(s))
    finally:
        s.close()
    assert server.listener is not None
    await until(lambda: server.listener.half_open == 0)  # type: ignore[union-attr]
    await server.honest_round_trip()


async def test_full_size_frames_once_authenticated(server: Server) -> None:
    await server.honest_round_trip(size=2 * 1024 * 1024)
    assert server.listener is not None and server.listener.half_open == 0


async def test_per_address_cap_refuses_more_and_serves_others(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "MAX_HALF_OPEN_PER_IP", 4)
    lst = server.listener
    assert lst is not None
    socks = []
    try:
        for _ in range(7):
            socks.append(raw_from("127.0.0.2", server.port))
        await until(lambda: lst.half_open + lst.refused_connections == 7)
        assert lst.half_open == 4 and lst.refused_connections == 3
        await until(lambda: sum(hung_up(s) for s in socks) == 3)
        await server.honest_round_trip()  # from 127.0.0.1, while 127.0.0.2 holds its slots
    finally:
        for s in socks:
            s.close()
    await until(lambda: lst.half_open == 0)


async def test_total_cap_evicts_the_oldest_of_the_busiest_address(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "MAX_HALF_OPEN_PER_IP", 4)
    monkeypatch.setattr(tcp, "MAX_HALF_OPEN_TOTAL", 6)
    lst = server.listener
    assert lst is not None
    busy = [raw_from("127.0.0.2", server.port) for _ in range(4)]
    await until(lambda: lst.half_open == 4)
    other = [raw_from("127.0.0.3", server.port) for _ in range(2)]
    try:
        await until(lambda: lst.half_open == 6)
        await server.honest_round_trip()  # takes a slot: the oldest of 127.0.0.2 goes
        assert lst.evicted_connections == 1
        await until(lambda: hung_up(busy[0]))
        assert not any(hung_up(s) for s in busy[1:] + other)
        assert lst.half_open == 5
    finally:
        for s in busy + other:
            s.close()
    await until(lambda: lst.half_open == 0)


async def test_half_open_connection_expires(server: Server,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "PREAUTH_DEADLINE_S", 0.2)
    lst = server.listener
    assert lst is not None
    s = raw_from("127.0.0.2", server.port)
    try:
        await until(lambda: lst.expired_connections == 1)
        assert lst.half_open == 0
        await until(lambda: hung_up(s))
    finally:
        s.close()


async def test_unread_frames_before_authentication_stop_reading_early() -> None:
    held: list[tcp.TcpPipe] = []
    release = asyncio.Event()

    async def never_reads(pipe: Pipe) -> None:
        held.append(pipe)  # type: ignore[arg-type]
        await release.wait()

    lst = await tcp.listen(HOST, 0, never_reads)
    s = raw_from(HOST, lst.port)
    try:
        frame = tcp.MAX_PREAUTH_FRAME_BYTES.to_bytes(4, "big") + b"f" * tcp.MAX_PREAUTH_FRAME_BYTES
        s.setblocking(False)
        for _ in range(64):  # 256 KiB: far more than the pre-auth queue may hold
            try:
                s.send(frame)
            except BlockingIOError:
                break
        await until(lambda: bool(held) and held[0]._proto._reading_paused)
        queued = held[0]._proto.queued_bytes
        assert queued <= tcp.PREAUTH_READ_HIGH_WATER_BYTES + tcp.MAX_PREAUTH_FRAME_BYTES
    finally:
        release.set()
        s.close()
        await lst.close()

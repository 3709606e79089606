"""UDP before authentication, on real sockets: a connection made from a valid cookie is
held to handshake-sized messages and a small window until the channel authenticates it,
at most MAX_PREAUTH_PER_IP exist per address and MAX_PREAUTH_TOTAL in all (evicting the
busiest address's oldest), each with a deadline; trusted peers are served meanwhile.

Attackers complete the cookie exchange from 127.0.0.2 / 127.0.0.3 (loopback only), so the
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
from node.errors import ChannelClosed, P2PError
from node.identity import Identity
from node.transports import udp
from node.transports import udp_machine as um
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
        self.listener: udp.UdpListener | None = None
        self.pipes: list[Any] = []

    async def handler(self, pipe: Pipe) -> None:
        self.pipes.append(pipe)
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
        ch = await open_channel(await udp.connect(HOST, self.port), ALICE,
                                expected_peer=BOB.peer_id, authorize=trusting(BOB),
                                timeout_s=WAIT_S)
        try:
            await ch.send(b"h" * size)
            assert await asyncio.wait_for(ch.recv(), 10) == b"h" * size
        finally:
            await ch.close()


@pytest.fixture
async def server() -> Any:
    srv = Server()
    srv.listener = await udp.listen(HOST, 0, srv.handler)
    yield srv
    await srv.listener.close()


async def cookie_connection(source_ip: str, port: int) -> socket.socket:
    """A raw socket from `source_ip` that completed INIT / INIT_ACK / COOKIE_ECHO and
    then says nothing: a pre-auth connection on the server, owned by a real address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source_ip, 0))
    s.setblocking(False)
    client = um.UdpConnection.client(0.0)
    s.sendto(client.datagrams_to_send(0.0)[0], (HOST, port))
    reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 2048), WAIT_S)
    client.receive_datagram(reply, 0.001)
    s.sendto(client.datagrams_to_send(0.001)[0], (HOST, port))  # the COOKIE_ECHO
    return s


async def test_preauth_message_above_handshake_size_is_refused(server: Server) -> None:
    pipe = await udp.connect(HOST, server.port)
    try:
        await pipe.send(b"x" * (um.MAX_PREAUTH_MESSAGE_BYTES + 1))
        with pytest.raises(ChannelClosed, match="reset by peer"):
            await asyncio.wait_for(pipe.recv(), WAIT_S)
        kind, _ = await asyncio.wait_for(server.events.get(), WAIT_S)
        assert kind == "handshake-failed"
        assert "before authenticating" in server.pipes[0].close_reason
    finally:
        await pipe.close()
    await server.honest_round_trip(size=2_000_000)  # the limits lift once authenticated
    assert server.listener is not None and server.listener.preauth_connections == 0


async def test_per_address_cap_and_honest_client_served(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "MAX_PREAUTH_PER_IP", 3)
    lst = server.listener
    assert lst is not None
    socks = []
    try:
        for _ in range(5):
            socks.append(await cookie_connection("127.0.0.2", server.port))
        await until(lambda: lst.preauth_connections + lst.refused_connections == 5)
        assert lst.preauth_connections == 3 and lst.refused_connections == 2
        await server.honest_round_trip()  # from 127.0.0.1
        assert lst.preauth_connections == 3
    finally:
        for s in socks:
            s.close()


async def test_total_cap_evicts_the_oldest_of_the_busiest_address(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "MAX_PREAUTH_PER_IP", 3)
    monkeypatch.setattr(udp, "MAX_PREAUTH_TOTAL", 4)
    lst = server.listener
    assert lst is not None
    socks = [await cookie_connection("127.0.0.2", server.port) for _ in range(3)]
    await until(lambda: lst.preauth_connections == 3)
    socks.append(await cookie_connection("127.0.0.3", server.port))
    try:
        await until(lambda: lst.preauth_connections == 4)
        await server.honest_round_trip()  # takes a slot: one of 127.0.0.2's goes
        assert lst.evicted_connections == 1
        assert lst.preauth_connections == 3
        assert lst.connections == 3  # the evicted one is gone, the honest one closed
    finally:
        for s in socks:
            s.close()


async def test_preauth_connection_expires(server: Server,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "PREAUTH_DEADLINE_S", 0.2)
    lst = server.listener
    assert lst is not None
    s = await cookie_connection("127.0.0.2", server.port)
    try:
        await until(lambda: lst.expired_connections == 1)
        assert lst.preauth_connections == 0 and lst.connections == 0
    finally:
        s.close()

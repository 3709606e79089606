"""The UDP transport on real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import time

import pytest

from node.errors import ChannelClosed, PeerUnreachable, ProtocolError
from node.transports import udp
from node.transports import udp_machine as um
from node.transports.base import MAX_MESSAGE_BYTES


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay between one client and a server: drops and reorders datagrams."""

    def __init__(self, server_port: int, loss: float, reorder: float, seed: int) -> None:
        self.server = ("127.0.0.1", server_port)
        self.client: tuple[str, int] | None = None
        self.loss, self.reorder = loss, reorder
        self.rng = random.Random(seed)
        self.transport: asyncio.DatagramTransport | None = None
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.dropped = self.reordered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr != self.server:
            self.client = addr
            dest = self.server
        elif self.client is not None:
            dest = self.client
        else:
            return
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.rng.random() < self.reorder:
            self.held.append((data, dest))  # overtaken by the next datagram
            self.reordered += 1
            return
        self.transport.sendto(data, dest)
        while self.held:
            self.transport.sendto(*self.held.pop())


async def start_relay(server_port: int, loss: float, reorder: float, seed: int = 1):
    loop = asyncio.get_running_loop()
    transport, relay = await loop.create_datagram_endpoint(
        lambda: LossyRelay(server_port, loss, reorder, seed), local_addr=("127.0.0.1", 0))
    return transport, relay


async def test_echo_and_message_boundaries() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        while True:
            await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port)
    try:
        assert pipe.transport == "udp" and pipe.remote == ("127.0.0.1", listener.port)
        msgs = [b"", b"a", os.urandom(1452), os.urandom(100_000), os.urandom(3)]
        for m in msgs:
            await pipe.send(m)
        assert [await pipe.recv() for _ in msgs] == msgs
    finally:
        await pipe.close()
        await listener.close()
    assert pipe.closed


async def test_20_mb_exchange_through_lossy_reordering_relay_is_byte_identical() -> None:
    total = 20 * 1024 * 1024
    digest_rx: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    payload = os.urandom(total)

    async def server(pipe: udp.UdpPipe) -> None:
        h = hashlib.sha256()
        got = 0
        while got < total:
            m = await pipe.recv()
            h.update(m)
            got += len(m)
        await pipe.send(h.digest())
        digest_rx.set_result(h.hexdigest())
        # answer with 2 MB the other way so both directions cross the relay
        for off in range(0, 2_000_000, 250_000):
            await pipe.send(payload[off:off + 250_000])
        await pipe.recv()  # until the client closes

    listener = await udp.listen("127.0.0.1", 0, server, preauth=False)
    relay_tr, relay = await start_relay(listener.port, loss=0.05, reorder=0.05)
    port = relay_tr.get_extra_info("sockname")[1]
    # Ethernet-sized datagrams (loopback would pick 65000-byte ones): ~15,000 packets, so 5 %
    # loss and reordering hit hundreds of them
    pipe = await udp.connect("127.0.0.1", port, datagram_bytes=um.DEFAULT_DATAGRAM_BYTES)
    try:
        for off in range(0, total, 300_000):
            await pipe.send(payload[off:off + 300_000])
        assert await asyncio.wait_for(pipe.recv(), 60) == hashlib.sha256(payload).digest()
        back = b"".join([await pipe.recv() for _ in range(8)])
        assert back == payload[:2_000_000]
        assert digest_rx.result() == hashlib.sha256(payload).hexdigest()
        assert relay.dropped > 100 and relay.reordered > 100
        assert pipe.machine.retransmitted_packets > 0
    finally:
        await pipe.close()
        relay_tr.close()
        await listener.close()


async def test_connect_to_dead_port_raises_peer_unreachable_quickly() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    start = time.monotonic()
    with pytest.raises(PeerUnreachable, match="udp"):
        await udp.connect("127.0.0.1", port, timeout=3.0)
    assert time.monotonic() - start < 1.0  # ICMP port-unreachable, not the timeout


async def test_connect_to_silent_peer_times_out_with_clear_message() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable, match="timed out after 0.3 s"):
            await udp.connect("127.0.0.1", s.getsockname()[1], timeout=0.3)
        assert time.monotonic() - start < 1.0
    finally:
        s.close()


async def test_close_semantics() -> None:
    server_pipe: asyncio.Future[udp.UdpPipe] = asyncio.get_running_loop().create_future()
    got: list[bytes] = []

    async def handler(pipe: udp.UdpPipe) -> None:
        server_pipe.set_result(pipe)
        try:
            while True:
                got.append(await pipe.recv())
        except ChannelClosed as exc:
            assert "closed by peer" in str(exc)

    listener = await udp.listen("127.0.0.1", 0, handler, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port)
    try:
        big = os.urandom(3_000_000)
        await pipe.send(b"one")
        await pipe.send(big)
        await pipe.close()  # graceful: queued data arrives first
        assert pipe.closed
        await pipe.close()  # idempotent
        with pytest.raises(ChannelClosed):
            await pipe.send(b"late")
        with pytest.raises(ChannelClosed):
            await pipe.recv()
        srv = await asyncio.wait_for(server_pipe, 5)
        for _ in range(100):
            if srv.closed:
                break
            await asyncio.sleep(0.02)
        assert srv.closed and got == [b"one", big]
        with pytest.raises(ProtocolError):
            await srv.send(b"x" * (MAX_MESSAGE_BYTES + 1))
    finally:
        await listener.close()


async def test_abort_resets_peer_and_listener_close_ends_pipes() -> None:
    reasons: list[str] = []

    async def handler(pipe: udp.UdpPipe) -> None:
        try:
            await pipe.recv()
        except ChannelClosed as exc:
            reasons.append(str(exc))

    listener = await udp.listen("127.0.0.1", 0, handler, preauth=False)
    p1 = await udp.connect("127.0.0.1", listener.port)
    p1.abort()
    p2 = await udp.connect("127.0.0.1", listener.port)
    try:
        await p2.send(b"hello")  # the server reads it and returns; its pipe closes
        for _ in range(100):
            if reasons and p2.closed:
                break
            await asyncio.sleep(0.02)
        assert any("reset by peer" in r for r in reasons)
        assert p2.closed
        p3 = await udp.connect("127.0.0.1", listener.port)
        await asyncio.sleep(0.05)
        await listener.close()
        with pytest.raises(ChannelClosed, match="reset by peer"):
            await asyncio.wait_for(p3.recv(), 5)
    finally:
        await p2.close()
        await listener.close()


async def test_garbage_flood_does_not_crash_the_listener() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        while True:
            await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo)
    pipe = await udp.connect("127.0.0.1", listener.port)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rng = random.Random(9)
        cid = pipe.machine.peer_cid
        for i in range(3000):
            n = rng.randrange(0, 1500)
            junk = rng.randbytes(n)
            if i % 3 == 0:  # well-formed headers with the live connection id
                junk = bytes([um.MAGIC, rng.randrange(0, 12)]) + cid + junk
            elif i % 3 == 1:  # INIT-shaped packets with random cids
                junk = bytes([um.MAGIC, 1]) + bytes(8) + rng.randbytes(8) + b"\x05\xac" + bytes(44)
            flood.sendto(junk, ("127.0.0.1", listener.port))
            if i % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.1)
        assert listener.dropped_datagrams > 500
        await pipe.send(b"still alive")
        assert await asyncio.wait_for(pipe.recv(), 5) == b"still alive"
        assert listener.inits_answered > 100
        assert listener.connections == 1  # answered INITs leave nothing behind
    finally:
        flood.close()
        await pipe.close()
        await listener.close()


async def test_backpressure_bounds_the_send_buffer() -> None:
    release = asyncio.Event()

    async def slow(pipe: udp.UdpPipe) -> None:
        await release.wait()
        while True:
            await pipe.recv()

    listener = await udp.listen("127.0.0.1", 0, slow, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port)
    try:
        chunk = b"b" * 1_000_000
        sent = 0

        async def writer() -> None:
            nonlocal sent
            for _ in range(64):
                await pipe.send(chunk)
                sent += 1

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.5)
        assert not task.done()  # the unread peer's window plus our buffer is full
        assert pipe.machine.send_buffered_bytes <= udp.SEND_HIGH_WATER_BYTES + len(chunk)
        release.set()
        await asyncio.wait_for(task, 30)
        assert sent == 64
    finally:
        await pipe.close()
        await listener.close()


async def test_large_datagrams_on_loopback() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        while True:
            await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo, datagram_bytes=60000, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port, datagram_bytes=60000, loss_rate=0.05)
    try:
        assert pipe.machine.datagram_bytes == 60000
        data = os.urandom(4_000_000)
        await pipe.send(data)
        assert await asyncio.wait_for(pipe.recv(), 20) == data
    finally:
        await pipe.close()
        await listener.close()


async def test_loopback_peers_pick_the_largest_datagrams_unless_told_otherwise() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        while True:
            await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    auto = await udp.connect("127.0.0.1", listener.port)
    fixed = await udp.connect("127.0.0.1", listener.port, datagram_bytes=1200)
    try:
        assert auto.machine.datagram_bytes == um.LOOPBACK_DATAGRAM_BYTES
        assert fixed.machine.datagram_bytes == 1200
        data = os.urandom(300_000)
        for pipe in (auto, fixed):
            await pipe.send(data)
            assert await asyncio.wait_for(pipe.recv(), 20) == data
    finally:
        await auto.close()
        await fixed.close()
        await listener.close()


def test_works_on_uvloop() -> None:
    import uvloop

    async def main() -> bytes:
        async def echo(pipe: udp.UdpPipe) -> None:
            while True:
                await pipe.send(await pipe.recv())

        listener = await udp.listen("127.0.0.1", 0, echo, preauth=False)
        pipe = await udp.connect("127.0.0.1", listener.port, loss_rate=0.05)
        try:
            await pipe.send(b"u" * 2_000_000)
            return await asyncio.wait_for(pipe.recv(), 20)
        finally:
            await pipe.close()
            await listener.close()

    assert uvloop.run(main()) == b"u" * 2_000_000


async def test_late_duplicate_init_does_not_open_a_ghost_connection() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        while True:
            await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port)
    try:
        await pipe.send(b"hi")
        assert await pipe.recv() == b"hi"
        m = pipe.machine
        init = um._INIT.pack(um.MAGIC, um.T_INIT, bytes(8), m.local_cid, m.datagram_bytes)
        init += bytes(um.INIT_BYTES - len(init))
        # replay the INIT from the client's own address, as a delayed duplicate would arrive
        pipe._send_dgrams([init], None)
        await asyncio.sleep(0.05)
        assert listener.connections == 1
        await pipe.send(b"again")
        assert await pipe.recv() == b"again"
    finally:
        await pipe.close()
        await listener.close()


async def test_connect_by_name_tries_each_address() -> None:
    async def echo(pipe: udp.UdpPipe) -> None:
        await pipe.send(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    try:
        pipe = await udp.connect("localhost", listener.port, timeout=3.0)
        try:
            await pipe.send(b"by name")
            assert await pipe.recv() == b"by name"
        finally:
            await pipe.close()
    finally:
        await listener.close()


async def _echo(pipe: udp.UdpPipe) -> None:
    while True:
        await pipe.send(await pipe.recv())


def _spoofed_init(rng: random.Random) -> bytes:
    init = um._INIT.pack(um.MAGIC, um.T_INIT, bytes(8), rng.randbytes(8), 1452)
    return init + bytes(um.INIT_BYTES - len(init))


async def test_spoofed_init_flood_keeps_no_state_and_new_channels_open_meanwhile() -> None:
    # regression: 300 INITs that never came back filled one shared half-open cap and
    # made every new udp channel fail for the 10 s handshake timeout
    listener = await udp.listen("127.0.0.1", 0, _echo)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    rng = random.Random(5)
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for i in range(10_000):
                try:
                    socks[i % len(socks)].sendto(_spoofed_init(rng), ("127.0.0.1", listener.port))
                    sent += 1
                except BlockingIOError:
                    pass
                if i % 200 == 0:
                    await asyncio.sleep(0)

        task = asyncio.create_task(flood())
        while sent < 1000:  # well past the old cap of 256 half-open connections
            await asyncio.sleep(0.001)
        assert listener.connections == 0
        pipe = await udp.connect("127.0.0.1", listener.port, timeout=3.0)
        await pipe.send(b"during the flood")
        assert await asyncio.wait_for(pipe.recv(), 5) == b"during the flood"
        await task
        assert listener.inits_answered > 1000
        assert listener.connections == 1
        await pipe.close()
    finally:
        for s in socks:
            s.close()
        await listener.close()


async def test_forged_cookie_echo_creates_no_connection() -> None:
    listener = await udp.listen("127.0.0.1", 0, _echo)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.sendto(_spoofed_init(random.Random(1)), ("127.0.0.1", listener.port))
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 2048), 5)
        assert len(reply) == um._INIT_ACK.size < um.INIT_BYTES  # no amplification
        _, _, ccid, scid, size, issued, tag = um._INIT_ACK.unpack(reply)
        bad = um._ECHO.pack(um.MAGIC, um.T_COOKIE_ECHO, scid, ccid, size, issued,
                            bytes(len(tag)), 0)
        good = um._ECHO.pack(um.MAGIC, um.T_COOKIE_ECHO, scid, ccid, size, issued, tag, 0)
        s.sendto(bad, ("127.0.0.1", listener.port))
        deadline = time.monotonic() + 5
        while listener.rejected_cookies < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert listener.connections == 0
        s.sendto(good, ("127.0.0.1", listener.port))  # the real cookie, from its address
        while listener.connections < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        s.close()
        await listener.close()


async def test_init_from_an_old_wire_version_is_logged_clearly(
        caplog: pytest.LogCaptureFixture) -> None:
    listener = await udp.listen("127.0.0.1", 0, _echo)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        old = bytearray(_spoofed_init(random.Random(2)))
        old[0] = 0xD1
        with caplog.at_level("WARNING", logger="node.transports.udp"):
            s.sendto(bytes(old), ("127.0.0.1", listener.port))
            deadline = time.monotonic() + 5
            while listener.dropped_datagrams < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        assert any("wire version 1" in r.getMessage() and "version 2" in r.getMessage()
                   for r in caplog.records)
        assert listener.connections == 0
    finally:
        s.close()
        await listener.close()


async def test_large_messages_travel_in_pooled_buffers_the_receiver_owns() -> None:
    """send_frame builds a message in a pooled buffer; the receiver gets a large message as
    a bytearray of its own (``recv_buffers_owned``: the channel opens it in place), which
    goes back to the pool once dropped; small messages stay bytes."""
    from node.transports.tcp import buffer_pool

    users = buffer_pool().users
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def sink(pipe: udp.UdpPipe) -> None:
        while True:
            await got.put(await pipe.recv())

    listener = await udp.listen("127.0.0.1", 0, sink, preauth=False)
    pipe = await udp.connect("127.0.0.1", listener.port)
    try:
        assert udp.UdpPipe.recv_buffers_owned
        big = os.urandom(1 << 20)

        def fill(buf: bytearray, at: int) -> int:
            buf[at:at + len(big)] = big
            return len(big)

        for _ in range(3):
            await pipe.send_frame(len(big), fill)
        await pipe.send(b"small")
        msgs = [await asyncio.wait_for(got.get(), 10) for _ in range(4)]
        assert [type(m) for m in msgs] == [bytearray] * 3 + [bytes]
        assert msgs[:3] == [big] * 3 and msgs[3] == b"small"
    finally:
        await pipe.close()
        await listener.close()
    await asyncio.sleep(0.1)
    assert buffer_pool().users == users  # every pipe that took the pool gave it back

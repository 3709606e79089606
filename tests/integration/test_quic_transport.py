"""Integration tests of the QUIC transport on 127.0.0.1 with real sockets and real TLS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from node.channel import SecureChannel, accept_channel, open_channel
from node.errors import ChannelClosed, PeerUnreachable, ProtocolError
from node.identity import Identity
from node.transports import quic
from node.transports.base import MAX_MESSAGE_BYTES, Pipe
from node.transports.tcp import buffer_pool
from tests.helpers import trusting

Handler = Callable[[Pipe], Awaitable[None]]


async def echo(pipe: Pipe) -> None:
    try:
        while True:
            await pipe.send(await pipe.recv())
    except ChannelClosed:
        pass


class Server:
    """A listener plus the pipes its handler saw and how each handler ended."""

    def __init__(self) -> None:
        self.pipes: list[Pipe] = []
        self.outcomes: asyncio.Queue[object] = asyncio.Queue()
        self.listener: quic.QuicListener | None = None

    def wrap(self, handler: Handler) -> Handler:
        async def run(pipe: Pipe) -> None:
            self.pipes.append(pipe)
            try:
                await handler(pipe)
            except BaseException as exc:
                self.outcomes.put_nowait(exc)
                raise
            self.outcomes.put_nowait("returned")

        return run

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        server = Server()
        server.listener = await quic.listen("127.0.0.1", 0, server.wrap(handler))
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.listener is not None
        await server.listener.close()


@pytest.fixture
async def pipes() -> AsyncIterator[list[quic.QuicPipe]]:
    opened: list[quic.QuicPipe] = []
    yield opened
    for p in opened:
        await p.close()


async def test_echo_many_sizes_including_the_maximum(start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    assert pipe.transport == "quic" and pipe.remote == ("127.0.0.1", server.port)
    sizes = [0, 1, 3, 4, 5, 1000, 1451, 1452, 65535, 65536, 1 << 20, MAX_MESSAGE_BYTES]
    for size in sizes:
        msg = os.urandom(size)
        await pipe.send(msg)
        assert await pipe.recv() == msg
    assert server.pipes[0].transport == "quic"
    assert server.pipes[0].remote[0] == "127.0.0.1"


class NoConnection:
    _quic = None


@pytest.mark.parametrize("side", ["accepted", "dialled", "accepted+authenticated"])
def test_records_cut_at_any_offset_reassemble_exactly(side: str) -> None:
    """Large messages go straight into buffers of their own (handed over as bytearrays)
    on a dialled pipe and on an accepted one once its peer authenticated; before that,
    and for small messages, through the reassembly buffer as bytes."""
    owned = side != "accepted"
    big = quic.OWNED_MIN_BYTES
    msgs = [b"", b"a", os.urandom(3), os.urandom(70_000), b"", os.urandom(5), os.urandom(4),
            os.urandom(big), os.urandom(big - 1), os.urandom(200_000)]
    stream = quic.RECORD_HEADER.pack(quic.CREDIT_FLAG) + b"".join(
        quic.RECORD_HEADER.pack(len(m)) + m for m in msgs)
    rng = random.Random(7)
    for cuts in ([1], [2, 3], [4], [5, 1000], [65536], [1, 7, 4096, 70_004], [len(stream)]):
        pipe = quic.QuicPipe(NoConnection(), ("127.0.0.1", 1),  # type: ignore[arg-type]
                             owns_socket=side == "dialled")
        if side == "accepted+authenticated":
            pipe.authenticated()
        pos = 0
        while pos < len(stream):
            n = rng.choice(cuts)
            pipe._feed(stream[pos : pos + n])
            pos += n
        assert list(pipe._inbox) == msgs
        for m in pipe._inbox:
            assert type(m) is (bytearray if owned and len(m) >= big else bytes), len(m)
        assert not pipe._rbuf and pipe._rneed == -1 and pipe._rmsg is None
        pipe._pool.release()


def test_an_announced_size_costs_nothing_before_authentication() -> None:
    """On an accepted pipe a header alone allocates nothing (the bytes come in as they
    arrive, within the window), as before; once authenticated it reserves the buffer."""
    size = 4 * 1024 * 1024
    header = quic.RECORD_HEADER.pack(size)
    pipe = quic.QuicPipe(NoConnection(), ("127.0.0.1", 1), owns_socket=False)  # type: ignore[arg-type]
    pipe._feed(header + b"x" * 10)
    assert pipe._rmsg is None and len(pipe._rbuf) == 10 and pipe._rneed == size
    trusted = quic.QuicPipe(NoConnection(), ("127.0.0.1", 1), owns_socket=False)  # type: ignore[arg-type]
    trusted.authenticated()
    trusted._feed(header + b"x" * 10)
    assert trusted._rmsg is not None and len(trusted._rmsg) == size and trusted._rfill == 10
    for p in (pipe, trusted):
        p._pool.release()


def test_datagram_size_follows_the_route_mtu() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert quic.route_datagram_bytes(s) == quic.SAFE_DATAGRAM_BYTES  # not connected
        s.connect(("127.0.0.1", 9))  # loopback: MTU 65536
        assert quic.route_datagram_bytes(s) == quic.LARGE_DATAGRAM_CAP_BYTES

    class FarSocket:  # a route with a jumbo first hop to a non-loopback peer (no real socket)
        family = socket.AF_INET

        def getpeername(self) -> tuple[str, int]:
            return ("192.0.2.1", 9)

        def getsockopt(self, *args: int) -> int:
            return 9000

    # off loopback QUIC's minimum, whatever the first hop's MTU: qh3 does not validate the path
    assert quic.route_datagram_bytes(FarSocket()) == quic.SAFE_DATAGRAM_BYTES == 1200  # type: ignore[arg-type]


def test_server_datagram_size_follows_the_client_address() -> None:
    assert quic.server_datagram_bytes(("198.18.0.7", 4433)) == quic.SAFE_DATAGRAM_BYTES
    assert quic.server_datagram_bytes(("2001:db8::1", 4433, 0, 0)) == quic.SAFE_DATAGRAM_BYTES
    assert quic.server_datagram_bytes(("127.0.0.1", 4433)) == quic.MAX_DATAGRAM_BYTES
    assert quic.server_datagram_bytes(("::ffff:127.0.0.1", 4433, 0, 0)) == quic.MAX_DATAGRAM_BYTES
    assert quic.server_datagram_bytes(("::1", 4433, 0, 0)) == quic.MAX_DATAGRAM_BYTES


async def test_loopback_client_sends_large_datagrams(start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    assert pipe._quic._configuration.max_datagram_size == quic.LARGE_DATAGRAM_CAP_BYTES
    await pipe.send(b"open")
    assert await asyncio.wait_for(pipe.recv(), 20) == b"open"
    (server_proto,) = server.listener._protocols
    assert server_proto._quic._configuration.max_datagram_size == quic.MAX_DATAGRAM_BYTES
    # both sockets hold more than three such datagrams (Linux reports twice what was set)
    for transport in (pipe._proto._transport, server.listener._server._transport):
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= \
            2 * quic.SOCKET_RECEIVE_BUFFER_BYTES
    msg = os.urandom(1 << 20)
    await pipe.send(msg)
    assert await asyncio.wait_for(pipe.recv(), 20) == msg


async def test_order_is_kept_both_ways_with_concurrent_traffic(start_server, pipes) -> None:
    count = 3000

    async def talker(pipe: Pipe) -> None:
        async def send_all() -> None:
            for i in range(count):
                await pipe.send(b"s%d" % i + b"." * (i % 700))

        sender = asyncio.create_task(send_all())
        for i in range(count):
            assert (await pipe.recv()).split(b".")[0] == b"c%d" % i
        await sender

    server = await start_server(talker)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)

    async def send_all() -> None:
        for i in range(count):
            await pipe.send(b"c%d" % i + b"." * (i % 900))

    sender = asyncio.create_task(send_all())
    for i in range(count):
        assert (await pipe.recv()).split(b".")[0] == b"s%d" % i
    await sender
    assert await asyncio.wait_for(server.outcomes.get(), 5) == "returned"


async def test_large_transfer_arrives_intact_with_bounded_send_buffer(start_server, pipes) -> None:
    total = 32 * 1024 * 1024
    msg_bytes = 256 * 1024

    async def digest(pipe: Pipe) -> None:
        h = hashlib.blake2b()
        got = 0
        while got < total:
            m = await pipe.recv()
            got += len(m)
            h.update(m)
            assert quic.RECV_WINDOW_BYTES >= len(pipe._rbuf) + sum(map(len, pipe._inbox))
        await pipe.send(h.digest())

    server = await start_server(digest)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    block = os.urandom(msg_bytes)
    h = hashlib.blake2b()
    peak_queued = 0
    for i in range(total // msg_bytes):
        m = block[i % 97 :] + block[: i % 97]
        h.update(m)
        await pipe.send(m)
        peak_queued = max(peak_queued, pipe._quic.get_send_buffer_size(0))
    assert await asyncio.wait_for(pipe.recv(), 60) == h.digest()
    # send() waited instead of queueing the whole 32 MiB inside the QUIC library
    assert peak_queued <= quic.SEND_HIGH_WATER_BYTES + msg_bytes + 8


async def test_send_blocks_when_the_peer_does_not_read(start_server, pipes) -> None:
    release = asyncio.Event()
    received: list[int] = []

    async def lazy(pipe: Pipe) -> None:
        await release.wait()
        while True:
            received.append(len(await pipe.recv()))

    server = await start_server(lazy)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    msg = os.urandom(64 * 1024)
    accepted = 0
    while True:
        try:
            await asyncio.wait_for(pipe.send(msg), 0.5)
        except TimeoutError:
            break
        accepted += len(msg)
        assert accepted <= 4 * quic.RECV_WINDOW_BYTES, "send() never blocked"
    # the peer's application read nothing: we may have sent at most its window
    assert 0 < accepted <= quic.RECV_WINDOW_BYTES
    release.set()
    await asyncio.wait_for(pipe.send(msg), 10)  # unblocks once the reader consumes
    deadline = time.monotonic() + 10
    while sum(received) < accepted + len(msg) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sum(received) >= accepted  # the message cut by the timeout may or may not count


async def test_sender_leaves_at_most_its_send_window_unread(start_server, pipes) -> None:
    """A bulk sender keeps SEND_WINDOW_BYTES (not the receiver's whole 9 MiB window) in the
    peer's memory, and a maximal message still goes once the reader has caught up."""
    release = asyncio.Event()
    got: list[int] = []

    async def lazy(pipe: Pipe) -> None:
        await release.wait()
        while True:
            got.append(len(await pipe.recv()))

    server = await start_server(lazy)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    msg = os.urandom(256 * 1024)
    accepted = 0
    while True:
        try:
            await asyncio.wait_for(pipe.send(msg), 0.5)
        except TimeoutError:
            break
        accepted += len(msg)
        assert accepted <= quic.RECV_WINDOW_BYTES, "send() did not stop at its send window"
    assert 0 < accepted <= quic.SEND_WINDOW_BYTES
    release.set()
    await asyncio.wait_for(pipe.send(os.urandom(MAX_MESSAGE_BYTES)), 20)
    deadline = time.monotonic() + 20
    while MAX_MESSAGE_BYTES not in got and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert MAX_MESSAGE_BYTES in got


async def test_connect_to_a_dead_port_fails_fast() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    users = buffer_pool().users
    t0 = time.monotonic()
    with pytest.raises(PeerUnreachable, match="refused"):
        await quic.connect("127.0.0.1", port, timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    # the failed dial's pipe gives its share of the buffer pool back (else the pool never
    # empties again in this process)
    assert buffer_pool().users == users


async def test_connect_to_a_silent_port_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        t0 = time.monotonic()
        users = buffer_pool().users
        with pytest.raises(PeerUnreachable, match="timed out"):
            await quic.connect("127.0.0.1", silent.getsockname()[1], timeout=0.3)
        assert time.monotonic() - t0 < 2.0
        assert buffer_pool().users == users  # the abandoned dial holds no share of the pool


async def test_oversize_message_is_refused_on_send(start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    with pytest.raises(ProtocolError, match="exceeds"):
        await pipe.send(b"\0" * (MAX_MESSAGE_BYTES + 1))
    await pipe.send(b"still fine")
    assert await pipe.recv() == b"still fine"


async def test_oversize_announcement_kills_the_channel_not_the_listener(
        start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    # forge a record header announcing one byte more than allowed (bypassing send's check)
    pipe._quic.send_stream_data(0, quic.RECORD_HEADER.pack(MAX_MESSAGE_BYTES + 1))
    pipe._proto.transmit()
    outcome = await asyncio.wait_for(server.outcomes.get(), 5)
    assert isinstance(outcome, ProtocolError)
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pipe.recv(), 5)
    fresh = await quic.connect("127.0.0.1", server.port)
    pipes.append(fresh)
    await fresh.send(b"after")
    assert await fresh.recv() == b"after"


async def test_forged_credit_is_a_protocol_error(start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    pipe._quic.send_stream_data(0, quic.RECORD_HEADER.pack(quic.CREDIT_FLAG | 1000))
    pipe._proto.transmit()
    outcome = await asyncio.wait_for(server.outcomes.get(), 5)
    assert isinstance(outcome, ProtocolError) and "credit" in str(outcome)


async def test_window_overrun_is_a_protocol_error(start_server, pipes) -> None:
    client_saw_close = asyncio.Event()

    async def reads_after_the_overrun(pipe: Pipe) -> None:
        await client_saw_close.wait()
        await pipe.recv()

    server = await start_server(reads_after_the_overrun)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    # a peer ignoring its window: raw records past the RECV_WINDOW_BYTES the reader granted
    chunk = b"\0" * (1 << 20)
    for _ in range(quic.RECV_WINDOW_BYTES // len(chunk) + 1):
        pipe._quic.send_stream_data(0, quic.RECORD_HEADER.pack(len(chunk)))
        pipe._quic.send_stream_data(0, chunk)
    pipe._proto.transmit()
    with pytest.raises(ChannelClosed, match="protocol violation"):
        await asyncio.wait_for(pipe.recv(), 20)
    client_saw_close.set()
    outcome = await asyncio.wait_for(server.outcomes.get(), 5)
    assert isinstance(outcome, ProtocolError) and "window" in str(outcome)


async def test_garbage_datagrams_do_not_kill_the_listener(start_server, pipes) -> None:
    server = await start_server(echo)
    live = await quic.connect("127.0.0.1", server.port)
    pipes.append(live)
    await live.send(b"before")
    assert await live.recv() == b"before"
    garbage = [b"", b"\x00", os.urandom(20), os.urandom(1500), b"\xc0" + os.urandom(1250),
               b"\xc0\x00\x00\x00\x01\x08" + os.urandom(1300), b"\x40" + os.urandom(40)]
    garbage += [os.urandom(n) for n in range(1, 1400, 37)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for g in garbage:
            s.sendto(g, ("127.0.0.1", server.port))
    await asyncio.sleep(0.1)
    await live.send(b"during")
    assert await live.recv() == b"during"
    fresh = await quic.connect("127.0.0.1", server.port)
    pipes.append(fresh)
    await fresh.send(b"after")
    assert await fresh.recv() == b"after"


async def test_client_close_reaches_the_server_after_pending_messages(start_server, pipes) -> None:
    seen: list[bytes] = []

    async def collect(pipe: Pipe) -> None:
        while True:
            seen.append(await pipe.recv())

    server = await start_server(collect)
    pipe = await quic.connect("127.0.0.1", server.port)
    for i in range(3):
        await pipe.send(b"m%d" % i + b"x" * 200_000)
    await pipe.close()
    assert pipe.closed
    outcome = await asyncio.wait_for(server.outcomes.get(), 5)
    assert isinstance(outcome, ChannelClosed)
    assert [m[:2] for m in seen] == [b"m0", b"m1", b"m2"]
    with pytest.raises(ChannelClosed):
        await pipe.send(b"late")
    with pytest.raises(ChannelClosed):
        await pipe.recv()
    await pipe.close()  # idempotent


async def test_server_close_reaches_the_client(start_server, pipes) -> None:
    async def say_bye(pipe: Pipe) -> None:
        await pipe.send(b"bye")
        await pipe.close()

    server = await start_server(say_bye)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    assert await asyncio.wait_for(pipe.recv(), 5) == b"bye"
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pipe.recv(), 5)
    with pytest.raises(ChannelClosed):
        await pipe.send(b"x")


async def test_failing_handler_closes_its_pipe_and_the_listener_lives(start_server, pipes) -> None:
    calls = 0

    async def flaky(pipe: Pipe) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(pipe)

    server = await start_server(flaky)
    first = await quic.connect("127.0.0.1", server.port)
    pipes.append(first)
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(first.recv(), 5)
    second = await quic.connect("127.0.0.1", server.port)
    pipes.append(second)
    await second.send(b"ok")
    assert await second.recv() == b"ok"


async def test_listener_close_ends_live_pipes_and_refuses_new_ones() -> None:
    listener = await quic.listen("127.0.0.1", 0, echo)
    pipe = await quic.connect("127.0.0.1", listener.port)
    try:
        await pipe.send(b"hi")
        assert await pipe.recv() == b"hi"
        await listener.close()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(pipe.recv(), 5)
        with pytest.raises(PeerUnreachable):
            await quic.connect("127.0.0.1", listener.port, timeout=1.0)
    finally:
        await pipe.close()
        await listener.close()


async def test_many_concurrent_pipes_on_one_listener(start_server, pipes) -> None:
    server = await start_server(echo)
    opened = await asyncio.gather(*(quic.connect("127.0.0.1", server.port) for _ in range(8)))
    pipes.extend(opened)

    async def talk(i: int, p: quic.QuicPipe) -> None:
        for j in range(20):
            msg = b"%d:%d" % (i, j) * 50
            await p.send(msg)
            assert await p.recv() == msg

    await asyncio.gather(*(talk(i, p) for i, p in enumerate(opened)))


async def test_a_second_stream_is_refused(start_server, pipes) -> None:
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    await pipe.send(b"one")
    assert await pipe.recv() == b"one"
    pipe._quic.send_stream_data(4, b"\x00\x00\x00\x01x")  # client bidi stream 1
    pipe._proto.transmit()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pipe.recv(), 5)


async def test_quiet_pipe_outlives_the_idle_timeout_thanks_to_keepalive(
        start_server, pipes, monkeypatch) -> None:
    monkeypatch.setattr(quic, "IDLE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(quic, "KEEPALIVE_INTERVAL_S", 0.15)
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    await asyncio.sleep(1.5)
    await pipe.send(b"still here")
    assert await asyncio.wait_for(pipe.recv(), 5) == b"still here"


async def test_vanished_peer_ends_the_pipe_after_the_idle_timeout(
        start_server, pipes, monkeypatch) -> None:
    monkeypatch.setattr(quic, "IDLE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(quic, "KEEPALIVE_INTERVAL_S", 0.15)
    server = await start_server(echo)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    await pipe.send(b"hi")
    assert await pipe.recv() == b"hi"
    # the server goes silent without a CONNECTION_CLOSE (as if unplugged)
    assert server.listener is not None
    for proto in list(server.listener._protocols):
        proto.stop_timers()
        proto.start_keepalive = lambda: None  # type: ignore[method-assign]
    server.listener._server._transport.pause_reading()
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pipe.recv(), 5)
    assert time.monotonic() - t0 < 3.0
    server.listener._server._transport.resume_reading()


# --- channel binding: the handshake is bound to the QUIC connection --------------------


async def test_both_ends_export_the_same_binding_and_other_connections_differ(
        start_server, pipes) -> None:
    server = await start_server(echo)
    one = await quic.connect("127.0.0.1", server.port)
    two = await quic.connect("127.0.0.1", server.port)
    pipes.extend([one, two])
    for p in (one, two):
        await p.send(b"open")
        assert await p.recv() == b"open"
    assert len(one.channel_binding) == quic.CHANNEL_BINDING_BYTES
    assert {bytes(p.channel_binding) for p in server.pipes} == {one.channel_binding,
                                                                two.channel_binding}
    assert one.channel_binding != two.channel_binding


async def test_secure_channel_over_quic_is_bound_and_not_encrypted_twice(start_server,
                                                                         pipes) -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    seen: list[bytes] = []
    accepted: asyncio.Queue[SecureChannel] = asyncio.Queue()

    class Recording:
        """Wraps the server's pipe to record what actually crosses it after the handshake."""

        def __init__(self, pipe: Pipe) -> None:
            self._pipe = pipe
            self.transport, self.remote = pipe.transport, pipe.remote
            self.channel_binding = pipe.channel_binding  # type: ignore[attr-defined]

        async def send(self, data: bytes) -> None:
            await self._pipe.send(data)

        async def recv(self) -> bytes:
            data = await self._pipe.recv()
            seen.append(bytes(data))
            return data

        async def close(self) -> None:
            await self._pipe.close()

        @property
        def closed(self) -> bool:
            return self._pipe.closed

    async def serve(pipe: Pipe) -> None:
        ch = await accept_channel(Recording(pipe), bob, authorize=trusting(alice))
        accepted.put_nowait(ch)
        try:
            while True:
                await ch.send(await ch.recv())
        except ChannelClosed:
            pass

    server = await start_server(serve)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    ch = await open_channel(pipe, alice, expected_peer=bob.peer_id, authorize=trusting(bob))
    secret = b"payload travels only inside QUIC's own TLS 1.3"
    await ch.send(secret)
    assert await asyncio.wait_for(ch.recv(), 5) == secret
    server_ch = await asyncio.wait_for(accepted.get(), 5)
    assert not ch._session.frames_encrypted and not server_ch._session.frames_encrypted
    assert seen[-1] == secret  # no second AEAD on the frame
    await ch.close()


async def test_transmit_hands_the_socket_bounded_batches(start_server, pipes) -> None:
    """A bulk sender's transmit() passes the socket layer batches of about
    TRANSMIT_BATCH_BYTES, not every datagram qh3 has ready at once (a transient list
    of megabytes next to the same bytes in qh3's own send buffer)."""
    async def sink(pipe: Pipe) -> None:
        while True:
            await pipe.recv()

    server = await start_server(sink)
    pipe = await quic.connect("127.0.0.1", server.port)
    pipes.append(pipe)
    proto = pipe._proto
    send_many = proto._sendto_many
    assert send_many is not None
    batches: list[int] = []

    def recording(datagrams: list[bytes], addr: object) -> None:
        batches.append(sum(map(len, datagrams)))
        send_many(datagrams, addr)

    block = os.urandom(1 << 20)
    for _ in range(16):  # let the congestion window open
        await pipe.send(block)
    deadline = time.monotonic() + 10
    while not pipe._drained() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    proto._sendto_many = recording
    # two messages queued without yielding: the next transmit() finds 2 MiB to send at once
    await pipe.send(block)
    await pipe.send(block)
    while not pipe._drained() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sum(batches) >= 2 << 20
    # (one datagram may cross the threshold: at most the loopback datagram size over)
    assert max(batches) < quic.TRANSMIT_BATCH_BYTES + quic.LARGE_DATAGRAM_CAP_BYTES


async def test_closing_a_pipe_releases_idle_pooled_buffers(start_server, pipes) -> None:
    """The receive-buffer pool is shared by every pipe of the event loop; a long-lived
    pipe (a node's gossip channel) must not keep the buffers a finished bulk transfer
    grew it to."""
    done = asyncio.Event()

    async def sink(pipe: Pipe) -> None:
        assert isinstance(pipe, quic.QuicPipe)
        pipe.authenticated()
        try:
            while True:
                await pipe.recv()
        finally:
            done.set()

    server = await start_server(sink)
    pool = quic.buffer_pool()
    pool.retain()  # stands for the gossip channel that stays open
    try:
        pipe = await quic.connect("127.0.0.1", server.port)
        pipes.append(pipe)
        block = os.urandom(1 << 20)
        for _ in range(32):
            await pipe.send(block)
        await asyncio.sleep(0.2)
        assert sum(pool._caps) >= 1 << 20  # the receiver pooled its 1 MiB messages
        await pipe.close()
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.05)  # the server's handler closes its pipe on return
        assert sum(pool._caps) == 0
    finally:
        pool.release()

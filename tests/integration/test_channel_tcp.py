"""SecureChannel over the real TCP transport on 127.0.0.1: trust, refusal, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from node.channel import MAX_PLAINTEXT_BYTES, SecureChannel, accept_channel, open_channel
from node.errors import (
    ChannelClosed,
    ConfigError,
    HandshakeError,
    P2PError,
    PeerNotTrusted,
    PeerUnreachable,
    ProtocolError,
)
from node.identity import Identity, PeerId
from node.transports import TRANSPORT_NAMES, get_transport
from node.transports.base import Pipe

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
CAROL = Identity.generate("carol")
HOST = "127.0.0.1"
WAIT_S = 5.0


def trusting(*ids: Identity) -> Callable[[PeerId], None]:
    allowed = {i.peer_id for i in ids}

    def authorize(peer: PeerId) -> None:
        if peer not in allowed:
            raise PeerNotTrusted(f"{peer.short} not in trust list")

    return authorize


class EchoServer:
    """Accepts secure channels and echoes; records each outcome in `events`."""

    def __init__(self, identity: Identity, authorize: Callable[[PeerId], None]) -> None:
        self.identity = identity
        self.authorize = authorize
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.listener: Any = None

    async def handler(self, pipe: Pipe) -> None:
        try:
            ch = await accept_channel(pipe, self.identity, authorize=self.authorize,
                                      timeout_s=WAIT_S)
        except P2PError as exc:
            self.events.put_nowait(("handshake-failed", exc))
            return
        self.events.put_nowait(("accepted", ch))
        try:
            while True:
                await ch.send(await ch.recv())
        except P2PError as exc:
            self.events.put_nowait(("ended", exc))
        finally:
            await ch.close()

    async def start(self, transport: str = "tcp") -> int:
        self.listener = await get_transport(transport).listen(HOST, 0, self.handler)
        return int(self.listener.port)

    async def next_event(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.events.get(), WAIT_S)

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()


async def connect(port: int, me: Identity = ALICE, *, expect: Identity | None = BOB,
                  authorize: Callable[[PeerId], None] | None = None,
                  timeout_s: float = WAIT_S) -> SecureChannel:
    pipe = await get_transport("tcp").connect(HOST, port)
    return await open_channel(pipe, me, expected_peer=expect.peer_id if expect else None,
                              authorize=authorize or trusting(BOB), timeout_s=timeout_s)


@pytest.fixture
async def server() -> Any:
    srv = EchoServer(BOB, trusting(ALICE))
    await srv.start()
    yield srv
    await srv.close()


async def test_trusted_peers_exchange_messages(server: EchoServer) -> None:
    ch = await connect(server.listener.port)
    try:
        assert ch.peer == BOB.peer_id and ch.peer_name == "bob"
        assert ch.transport == "tcp" and ch.remote == (HOST, server.listener.port)
        kind, srv_ch = await server.next_event()
        assert kind == "accepted" and srv_ch.peer == ALICE.peer_id
        assert srv_ch.peer_name == "alice" and srv_ch.transcript_hash == ch.transcript_hash
        for msg in (b"", b"hello", bytes(range(256)) * 1000):
            await ch.send(msg)
            assert await ch.recv() == msg
    finally:
        await ch.close()
    assert (await server.next_event())[0] == "ended"
    with pytest.raises(ChannelClosed):
        await ch.recv()
    with pytest.raises(ChannelClosed):
        await ch.send(b"x")


async def test_many_messages_in_order_with_concurrent_reader(server: EchoServer) -> None:
    ch = await connect(server.listener.port)
    n = 500

    async def reader() -> list[bytes]:
        return [await ch.recv() for _ in range(n)]

    task = asyncio.create_task(reader())
    for i in range(n):
        await ch.send(i.to_bytes(4, "big") * (1 + i % 50))
    got = await asyncio.wait_for(task, WAIT_S)
    assert got == [i.to_bytes(4, "big") * (1 + i % 50) for i in range(n)]
    await ch.close()


async def test_largest_message_passes_and_oversize_is_refused_locally(server: EchoServer) -> None:
    ch = await connect(server.listener.port)
    big = b"\xab" * MAX_PLAINTEXT_BYTES
    await ch.send(big)
    assert await ch.recv() == big
    with pytest.raises(ProtocolError, match="exceeds"):
        await ch.send(b"x" * (MAX_PLAINTEXT_BYTES + 1))
    await ch.send(b"still open")
    assert await ch.recv() == b"still open"
    await ch.close()


async def test_responder_refuses_untrusted_initiator_with_clear_messages() -> None:
    srv = EchoServer(BOB, trusting())  # bob trusts nobody
    port = await srv.start()
    try:
        with pytest.raises(PeerNotTrusted) as info:
            await connect(port)
        msg = str(info.value)
        assert msg.startswith(f"peer {ALICE.peer_id.short} (this node) is not trusted by peer "
                              f"{BOB.peer_id}")
        assert f"node trust {ALICE.peer_id}" in msg
        kind, exc = await srv.next_event()
        assert kind == "handshake-failed" and isinstance(exc, PeerNotTrusted)
        assert str(exc) == (f"peer {ALICE.peer_id} is not trusted; "
                            f"run `node trust {ALICE.peer_id}`")
    finally:
        await srv.close()


async def test_initiator_refuses_untrusted_responder_with_clear_messages(
        server: EchoServer) -> None:
    with pytest.raises(PeerNotTrusted) as info:
        await connect(server.listener.port, authorize=trusting())  # alice trusts nobody
    assert str(info.value) == f"peer {BOB.peer_id} is not trusted; run `node trust {BOB.peer_id}`"
    kind, exc = await server.next_event()
    assert kind == "handshake-failed" and isinstance(exc, PeerNotTrusted)
    assert str(exc).startswith(f"peer {BOB.peer_id.short} (this node) is not trusted by peer "
                               f"{ALICE.peer_id}")


async def test_refusals_are_logged(server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PeerNotTrusted):
        await connect(server.listener.port, authorize=trusting())
    await server.next_event()
    assert any("refused channel with untrusted peer" in r.getMessage() for r in caplog.records)


async def test_responder_with_other_key_than_expected_is_refused(server: EchoServer) -> None:
    with pytest.raises(HandshakeError, match="peer presented a different key than its record"):
        await connect(server.listener.port, expect=CAROL, authorize=trusting(BOB, CAROL))
    kind, _ = await server.next_event()
    assert kind == "handshake-failed"


async def test_expected_peer_none_accepts_any_authorized_key(server: EchoServer) -> None:
    ch = await connect(server.listener.port, expect=None)
    assert ch.peer == BOB.peer_id
    await ch.close()


async def test_listener_serves_next_client_after_failures(server: EchoServer) -> None:
    for _ in range(3):
        with pytest.raises(PeerNotTrusted):
            await connect(server.listener.port, me=CAROL, authorize=trusting(BOB))
        assert (await server.next_event())[0] == "handshake-failed"
    ch = await connect(server.listener.port)
    await ch.send(b"ok")
    assert await ch.recv() == b"ok"
    await ch.close()


async def test_handshake_timeout_is_peer_unreachable() -> None:
    hold = asyncio.Event()

    async def silent(pipe: Pipe) -> None:
        await hold.wait()

    lst = await get_transport("tcp").listen(HOST, 0, silent)
    try:
        with pytest.raises(PeerUnreachable, match="timed out"):
            await connect(lst.port, timeout_s=0.3)
    finally:
        hold.set()
        await lst.close()


async def test_client_closing_mid_handshake_ends_cleanly() -> None:
    srv = EchoServer(BOB, trusting(ALICE))
    port = await srv.start()
    try:
        _, writer = await asyncio.open_connection(HOST, port)
        writer.close()
        await writer.wait_closed()
        kind, exc = await srv.next_event()
        assert kind == "handshake-failed" and isinstance(exc, ChannelClosed)
    finally:
        await srv.close()


async def test_connect_to_closed_port_is_peer_unreachable() -> None:
    lst = await get_transport("tcp").listen(HOST, 0, lambda pipe: asyncio.sleep(0))
    port = lst.port
    await lst.close()
    with pytest.raises(PeerUnreachable, match="cannot reach"):
        await get_transport("tcp").connect(HOST, port)


async def test_registry() -> None:
    assert TRANSPORT_NAMES == ("tcp", "udp", "quic")
    tcp = get_transport("tcp")
    assert tcp.name == "tcp"
    with pytest.raises(ConfigError, match="unknown transport 'carrier-pigeon'"):
        get_transport("carrier-pigeon")


async def test_tcp_pipe_roundtrip_and_backpressure() -> None:
    """A writer far ahead of a paused reader is held back by drain(), not buffered."""
    got: asyncio.Queue[bytes] = asyncio.Queue()
    release = asyncio.Event()

    async def slow(pipe: Pipe) -> None:
        await release.wait()
        try:
            while True:
                got.put_nowait(await pipe.recv())
        except ChannelClosed:
            pass

    tcp = get_transport("tcp")
    lst = await tcp.listen(HOST, 0, slow)
    pipe = await tcp.connect(HOST, lst.port)
    try:
        chunk = b"z" * (1 << 20)
        sent = 0

        async def writer() -> None:
            nonlocal sent
            for _ in range(200):
                await pipe.send(chunk)
                sent += 1

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.3)
        assert sent < 100  # stuck in drain(): bounded by socket + transport buffers
        release.set()
        await asyncio.wait_for(task, 20)
        for _ in range(200):
            assert await asyncio.wait_for(got.get(), WAIT_S) == chunk
    finally:
        release.set()
        await pipe.close()
        await lst.close()


def test_channel_under_uvloop() -> None:
    """The daemon and the benchmark run uvloop, whose transports differ from asyncio's."""
    import uvloop

    async def scenario() -> None:
        srv = EchoServer(BOB, trusting(ALICE))
        port = await srv.start()
        try:
            ch = await connect(port)
            for size in (0, 10, 70_000, 3 << 20):
                await ch.send(b"u" * size)
                assert await ch.recv() == b"u" * size
            await ch.close()
            with pytest.raises(PeerNotTrusted):
                await connect(port, me=CAROL)
        finally:
            await srv.close()

    uvloop.run(scenario())

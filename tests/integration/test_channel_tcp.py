"""SecureChannel over the real TCP transport on 127.0.0.1: trust, refusal, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from node import channel as channel_module
from node import secure
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
from node.wire import packb
from tests.helpers import trusting

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
CAROL = Identity.generate("carol")
HOST = "127.0.0.1"
WAIT_S = 5.0


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


async def _poll_nowait(ch: SecureChannel) -> bytes:
    """recv_nowait until a message is there (deadline WAIT_S): it never waits itself."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (got := ch.recv_nowait()) is None:
        assert loop.time() < deadline, "no message reached recv_nowait"
        await asyncio.sleep(0.005)
    return bytes(got)


async def test_recv_nowait_takes_queued_messages_in_order(server: EchoServer) -> None:
    ch = await connect(server.listener.port)
    try:
        assert ch.recv_nowait() is None  # nothing sent yet: None, no waiting
        big = bytes(range(256)) * 1024  # opened in place (>= IN_PLACE_MIN_BYTES)
        for msg in (b"one", big, b"three"):
            await ch.send(msg)
        assert await _poll_nowait(ch) == b"one"
        assert await _poll_nowait(ch) == big
        assert await asyncio.wait_for(ch.recv(), WAIT_S) == b"three"  # mixes with recv()
        assert ch.recv_nowait() is None
    finally:
        await ch.close()


async def test_send_many_delivers_each_message_in_order(server: EchoServer) -> None:
    ch = await connect(server.listener.port)
    try:
        msgs = [b"a", b"", b"ccc" * 100, bytes(range(256)) * 40]
        await ch.send(b"before")
        await ch.send_many(msgs)
        await ch.send(b"after")
        got = [await asyncio.wait_for(ch.recv(), WAIT_S) for _ in range(len(msgs) + 2)]
        assert [bytes(g) for g in got] == [b"before", *msgs, b"after"]
        with pytest.raises(ProtocolError, match="exceeds"):
            await ch.send_many([b"ok", bytes(MAX_PLAINTEXT_BYTES + 1)])
        assert not ch.closed  # refused before anything was sealed or sent
        await ch.send(b"still")
        assert await asyncio.wait_for(ch.recv(), WAIT_S) == b"still"
    finally:
        await ch.close()


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
    lst = await tcp.listen(HOST, 0, slow, preauth=False)  # a raw pipe: no handshake
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


# --- zero-copy large frames: pooled buffers must never be overwritten while in use ------


def _run_on(loop: str, scenario: Callable[[], Any]) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


def _pattern(i: int, size: int) -> bytes:
    return bytes([i % 251]) * (size - 8) + i.to_bytes(8, "big") if size >= 8 else b"x" * size


# sizes straddle the pool's size classes and the in-place threshold (64 KiB)
LARGE_SIZES = [65_536 - 16, 65_536, 70_000, 1 << 20, (1 << 20) + 16, 100_000, 3 << 20]


class Collector:
    """Accepts one channel and keeps every message it receives (never drops one)."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.got: list[bytes] = []
        self.done = asyncio.Event()
        self.release = release

    async def handler(self, pipe: Pipe) -> None:
        ch = await accept_channel(pipe, BOB, authorize=trusting(ALICE), timeout_s=WAIT_S)
        try:
            if self.release is not None:
                await self.release.wait()
            while True:
                self.got.append(await ch.recv())
        except ChannelClosed:
            pass
        finally:
            await ch.close()
            self.done.set()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_large_messages_kept_by_the_receiver_are_never_overwritten(loop: str) -> None:
    async def scenario() -> None:
        col = Collector()
        lst = await get_transport("tcp").listen(HOST, 0, col.handler)
        try:
            ch = await connect(lst.port)
            sent = [_pattern(i, LARGE_SIZES[i % len(LARGE_SIZES)]) for i in range(40)]
            for msg in sent:
                await ch.send(msg)
            await ch.close()
            await asyncio.wait_for(col.done.wait(), 20)
        finally:
            await lst.close()
        assert len(col.got) == len(sent)
        assert all(bytes(a) == b for a, b in zip(col.got, sent, strict=True))
        assert len({id(m) for m in col.got}) == len(sent)  # 40 distinct live buffers

    _run_on(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sends_parked_behind_backpressure_are_not_overwritten(loop: str) -> None:
    """The writer runs far ahead of a paused reader: unsent pooled buffers stay intact."""

    async def scenario() -> None:
        release = asyncio.Event()
        col = Collector(release)
        lst = await get_transport("tcp").listen(HOST, 0, col.handler)
        try:
            ch = await connect(lst.port)
            sent = [_pattern(i, (1 << 20) + 7 * i) for i in range(24)]

            async def writer() -> None:
                for msg in sent:
                    await ch.send(msg)

            task = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            assert not task.done()  # held back: the transport holds unsent pooled buffers
            release.set()
            await asyncio.wait_for(task, 20)
            await ch.close()
            await asyncio.wait_for(col.done.wait(), 20)
        finally:
            release.set()
            await lst.close()
        assert [bytes(m) for m in col.got] == sent

    _run_on(loop, scenario)


async def test_large_recv_hands_out_pooled_buffers_and_reuses_dropped_ones() -> None:
    from node.transports import tcp

    srv = EchoServer(BOB, trusting(ALICE))
    port = await srv.start()
    try:
        ch = await connect(port)
        seen: set[int] = set()
        for i in range(30):
            msg = _pattern(i, 1 << 20)
            await ch.send(msg)
            got = await asyncio.wait_for(ch.recv(), WAIT_S)
            assert got == msg
            assert isinstance(got, bytearray)
            assert any(b is got for b in tcp.buffer_pool()._bufs)  # zero copy: the pool's buffer
            seen.add(id(got))
            del got
        # 30 round trips reuse a handful of buffers instead of allocating 30
        assert len(seen) <= tcp.POOL_MAX_BUFFERS // 2
        small = b"s" * 100
        await ch.send(small)
        assert type(await ch.recv()) is bytes  # small messages stay bytes (hashable)
        await ch.close()
    finally:
        await srv.close()


def test_buffer_pool_never_hands_out_a_referenced_buffer() -> None:
    from node.transports.tcp import POOL_MAX_BYTES, _BufferPool

    pool = _BufferPool()
    a = pool.take(100_000)
    assert len(a) == 100_000
    a[:] = b"a" * 100_000
    b = pool.take(100_000)
    assert b is not a and a == b"a" * 100_000
    view = memoryview(b)[10:20]
    del b
    c = pool.take(100_000)
    assert c is not a and view.obj is not c  # a live view pins its buffer
    view.release()
    del a
    d = pool.take(99_000)  # same size class, freed: reused, resized in place
    assert len(d) == 99_000 and any(d is x for x in pool._bufs)
    grown = pool.take(100_050)
    assert len(grown) == 100_050
    held = [pool.take(3 << 20) for _ in range(20)]
    assert sum(pool._caps) <= POOL_MAX_BYTES  # the pool stays bounded; extras are fresh
    assert all(len(h) == 3 << 20 for h in held)
    del c, d, grown, held
    pool.clear()


async def test_closing_the_last_pipe_empties_the_buffer_pool() -> None:
    from node.transports import tcp

    srv = EchoServer(BOB, trusting(ALICE))
    port = await srv.start()
    try:
        ch = await connect(port)
        await ch.send(b"p" * (1 << 20))
        kept = await asyncio.wait_for(ch.recv(), WAIT_S)
        assert tcp.buffer_pool()._bufs  # large messages went through pooled buffers
        await ch.close()
        assert (await srv.next_event())[0] == "accepted"
        assert (await srv.next_event())[0] == "ended"
    finally:
        await srv.close()
    assert tcp.buffer_pool()._bufs == [] and tcp.buffer_pool().users == 0
    assert kept == b"p" * (1 << 20)  # a buffer still held stays valid for its holder


# --- frame crypto over every transport: key updates, old peers -----------------------


def _loadable(name: str) -> bool:
    try:
        get_transport(name)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("transport", [t for t in TRANSPORT_NAMES if _loadable(t)])
async def test_long_exchange_crosses_many_key_updates(transport: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secure, "KEY_UPDATE_FRAMES", 5)
    monkeypatch.setattr(secure, "KEY_UPDATE_BYTES", 100_000)
    srv = EchoServer(BOB, trusting(ALICE))
    port = await srv.start(transport)
    try:
        pipe = await get_transport(transport).connect(HOST, port)
        ch = await open_channel(pipe, ALICE, expected_peer=BOB.peer_id, authorize=trusting(BOB))
        kind, server_ch = await srv.next_event()
        assert kind == "accepted"
        for n in range(120):
            msg = bytes([n]) * (70_000 if n % 10 == 0 else n * 7)  # in-place path too
            await ch.send(msg)
            assert await asyncio.wait_for(ch.recv(), WAIT_S) == msg
        session, peer_session = ch._session, server_ch._session
        if transport == "quic":  # bound to the QUIC connection: no frame AEAD, no epochs
            assert not session.frames_encrypted and session.send_epoch == 0
        else:
            assert session.frames_encrypted and session.aead == peer_session.aead
            assert session.send_epoch == peer_session.recv_epoch >= 24
            assert session.recv_epoch == peer_session.send_epoch >= 24
        await ch.close()
        assert (await srv.next_event())[0] == "ended"
    finally:
        await srv.close()


async def test_version_1_initiator_is_told_the_versions(server: EchoServer) -> None:
    pipe = await get_transport("tcp").connect(HOST, server.listener.port)
    try:
        await pipe.send(packb(["hs1", 1, secure.PROTOCOL_NAME, [1], bytes(32), bytes(32)]))
        reply = msgpack.unpackb(await asyncio.wait_for(pipe.recv(), WAIT_S))
        assert reply[0] == "hs-abort" and "peer speaks protocol v1, this node v2" in reply[2]
    finally:
        await pipe.close()
    kind, exc = await server.next_event()
    assert kind == "handshake-failed" and "peer speaks protocol v1, this node v2" in str(exc)


async def test_version_1_responder_refusal_is_a_clear_version_error() -> None:
    async def old_node(pipe: Pipe) -> None:  # what a version-1 node answers to our hello
        await pipe.recv()
        await pipe.send(secure.ResponderHandshake.abort_message(
            "malformed handshake message: hs1: unsupported version 2"))

    listener = await get_transport("tcp").listen(HOST, 0, old_node)
    try:
        with pytest.raises(HandshakeError, match="peer speaks protocol v1, this node v2"):
            await connect(listener.port)
    finally:
        await listener.close()


async def test_peer_offering_no_common_aead_is_refused_cleanly_on_both_sides(
        server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    class ChachaOnlyResponder(secure.ResponderHandshake):
        def __init__(self, identity: Identity, **kw: Any) -> None:
            super().__init__(identity, aeads=(secure.AEAD_CHACHA20POLY1305,), **kw)

    monkeypatch.setattr(channel_module, "ResponderHandshake", ChachaOnlyResponder)
    monkeypatch.setenv(secure.AEAD_ENV_VAR, "aes256gcm")  # the initiator offers AES only
    with pytest.raises(HandshakeError, match=r"peer refused the handshake: no common frame "
                       r"AEAD: peer offers \['aes256gcm'\], this node \['chacha20poly1305'\]"):
        await connect(server.listener.port)
    kind, exc = await server.next_event()
    assert kind == "handshake-failed" and "no common frame AEAD" in str(exc)

"""Attacks on the SecureChannel through a hostile relay on 127.0.0.1.

Parametrised over every transport the registry can load (tcp always; udp and
quic once they exist). The relay is built on the same transport's Pipe API, so
it can drop, duplicate, reorder, alter or truncate whole messages, or run its
own handshakes (man in the middle). After each attack the server's listener
must still serve an honest client.

Over QUIC such a relay terminates two QUIC connections, and the channel handshake
is bound to each one's TLS exporter: even an honest relay is refused at the
handshake (test_handshake_relayed_onto_another_quic_connection_fails), so the
attacks on frames, which need a relay that got past the handshake, run over tcp
and udp only; over QUIC, QUIC's own TLS 1.3 protects the frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgpack
import nacl.bindings as sodium
import pytest

from node import secure
from node.channel import SecureChannel, accept_channel, open_channel
from node.errors import (
    ChannelClosed,
    ConfigError,
    HandshakeError,
    P2PError,
    PeerNotTrusted,
    ProtocolError,
)
from node.identity import Identity
from node.transports import TRANSPORT_NAMES, get_transport
from node.transports.base import MAX_MESSAGE_BYTES, Pipe
from tests.helpers import trusting


def _loadable(name: str) -> bool:
    try:
        get_transport(name)
    except ConfigError:
        return False
    return True


TRANSPORTS = [name for name in TRANSPORT_NAMES if _loadable(name)]

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
MALLORY = Identity.generate("mallory")
HOST = "127.0.0.1"
WAIT_S = 5.0

# relay message indices: client->server 0=msg1 1=msg3 2=verdict 3..=data;
#                        server->client 0=msg2 1=verdict 2..=data
C2S, S2C = "c2s", "s2c"
FIRST_DATA_C2S = 3

Mutate = Callable[[str, int, bytes], list[bytes]]


class EchoServer:
    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.listener: Any = None

    async def handler(self, pipe: Pipe) -> None:
        try:
            ch = await accept_channel(pipe, BOB, authorize=trusting(ALICE), timeout_s=WAIT_S)
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

    async def next_event(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.events.get(), WAIT_S)

    async def expect_honest_client_served(self) -> None:
        ch = await open_channel(await get_transport(self.transport).connect(HOST, self.port),
                                ALICE, expected_peer=BOB.peer_id, authorize=trusting(BOB))
        await ch.send(b"honest")
        assert await asyncio.wait_for(ch.recv(), WAIT_S) == b"honest"
        await ch.close()
        assert (await self.next_event())[0] == "accepted"
        assert (await self.next_event())[0] == "ended"

    @property
    def port(self) -> int:
        return int(self.listener.port)


class Relay:
    """Forwards whole messages between a client and the server, through `mutate`."""

    def __init__(self, transport: str, target_port: int, mutate: Mutate) -> None:
        self.transport = transport
        self.target_port = target_port
        self.mutate = mutate
        self.listener: Any = None

    async def _pump(self, src: Pipe, dst: Pipe, direction: str) -> None:
        index = 0
        try:
            while True:
                msg = await src.recv()
                for out in self.mutate(direction, index, msg):
                    await dst.send(out)
                index += 1
        except P2PError:
            pass
        finally:
            await dst.close()
            await src.close()

    async def handler(self, client: Pipe) -> None:
        upstream = await get_transport(self.transport).connect(HOST, self.target_port)
        await asyncio.gather(self._pump(client, upstream, C2S),
                             self._pump(upstream, client, S2C))

    @property
    def port(self) -> int:
        return int(self.listener.port)


@pytest.fixture(params=TRANSPORTS)
async def server(request: pytest.FixtureRequest) -> Any:
    srv = EchoServer(request.param)
    srv.listener = await get_transport(request.param).listen(HOST, 0, srv.handler)
    yield srv
    await srv.listener.close()


async def through_relay(server: EchoServer, mutate: Mutate) -> tuple[Relay, Any]:
    relay = Relay(server.transport, server.port, mutate)
    # the relay forwards whole frames without a handshake of its own: no pre-auth phase
    extra = {"preauth": False} if server.transport in ("tcp", "udp") else {}
    relay.listener = await get_transport(server.transport).listen(HOST, 0, relay.handler,
                                                                  **extra)
    return relay, relay.listener


async def open_via(relay: Relay, *, me: Identity = ALICE) -> SecureChannel:
    pipe = await get_transport(relay.transport).connect(HOST, relay.port)
    return await open_channel(pipe, me, expected_peer=BOB.peer_id, authorize=trusting(BOB),
                              timeout_s=WAIT_S)


# transports whose channels are bound to the connection: no relay gets past the handshake
BOUND_TRANSPORTS = {"quic"}


def needs_transparent_relay(server: EchoServer) -> None:
    if server.transport in BOUND_TRANSPORTS:
        pytest.skip(f"a {server.transport} relay is refused at the handshake (channel binding)")


def at(direction: str, index: int, fn: Callable[[bytes], list[bytes]]) -> Mutate:
    def mutate(d: str, i: int, msg: bytes) -> list[bytes]:
        return fn(msg) if (d, i) == (direction, index) else [msg]

    return mutate


def flip_last(msg: bytes) -> list[bytes]:
    return [msg[:-1] + bytes([msg[-1] ^ 0x80])]


def flip_middle(msg: bytes) -> list[bytes]:
    b = bytearray(msg)
    b[len(b) // 2] ^= 0x01
    return [bytes(b)]


# --- sanity: an honest relay changes nothing ------------------------------------------


async def test_honest_relay_passes(server: EchoServer) -> None:
    needs_transparent_relay(server)
    relay, lst = await through_relay(server, lambda d, i, m: [m])
    try:
        ch = await open_via(relay)
        for msg in (b"one", b"two" * 1000):
            await ch.send(msg)
            assert await asyncio.wait_for(ch.recv(), WAIT_S) == msg
        await ch.close()
        assert (await server.next_event())[0] == "accepted"
        assert (await server.next_event())[0] == "ended"
    finally:
        await lst.close()


async def test_handshake_relayed_onto_another_quic_connection_fails() -> None:
    """An honest relay forwards every handshake message unchanged, but over two QUIC
    connections: each side signs its own connection's TLS exporter, so both refuse."""
    if "quic" not in TRANSPORTS:
        pytest.skip("quic transport not available")
    server = EchoServer("quic")
    server.listener = await get_transport("quic").listen(HOST, 0, server.handler)
    relay, lst = await through_relay(server, lambda d, i, m: [m])
    try:
        with pytest.raises(HandshakeError, match="relayed from another connection"):
            await open_via(relay)
        kind, exc = await server.next_event()
        assert kind == "handshake-failed"
        assert isinstance(exc, (HandshakeError, ChannelClosed)), exc
        await server.expect_honest_client_served()  # direct, one connection: bound and fine
    finally:
        await lst.close()
        await server.listener.close()


# --- frames after the handshake -------------------------------------------------------

FRAME_ATTACKS: dict[str, Mutate] = {
    "tampered": at(C2S, FIRST_DATA_C2S, flip_middle),
    "tampered-tag": at(C2S, FIRST_DATA_C2S, flip_last),
    "truncated": at(C2S, FIRST_DATA_C2S, lambda m: [m[:-1]]),
    "truncated-to-nothing": at(C2S, FIRST_DATA_C2S, lambda m: [m[:5]]),
    "replayed": at(C2S, FIRST_DATA_C2S, lambda m: [m, m]),
    "extended": at(C2S, FIRST_DATA_C2S, lambda m: [m + b"\x00"]),
    "injected": at(C2S, FIRST_DATA_C2S, lambda m: [bytes(len(m)), m]),
}


# small frames are opened into a new buffer; large ones are decrypted in place in
# the transport's (reused) receive buffer: both paths must reject every attack
FRAME_PAYLOADS = {"small": b"first data frame", "large": bytes(range(256)) * 800}


@pytest.mark.parametrize("payload", sorted(FRAME_PAYLOADS))
@pytest.mark.parametrize("attack", sorted(FRAME_ATTACKS))
async def test_bad_frame_kills_channel_cleanly(server: EchoServer, attack: str,
                                               payload: str) -> None:
    needs_transparent_relay(server)
    data = FRAME_PAYLOADS[payload]
    relay, lst = await through_relay(server, FRAME_ATTACKS[attack])
    try:
        ch = await open_via(relay)
        assert (await server.next_event())[0] == "accepted"
        await ch.send(data)
        kind, exc = await server.next_event()
        assert kind == "ended" and isinstance(exc, ProtocolError), exc
        assert "failed authentication" in str(exc) or "truncated" in str(exc)
        # the client may see the echo of an accepted first copy (replay) but then the end
        with pytest.raises(ChannelClosed):
            while True:
                assert await asyncio.wait_for(ch.recv(), WAIT_S) == data
        await ch.close()
        await server.expect_honest_client_served()
    finally:
        await lst.close()


async def test_reordered_frames_kill_channel(server: EchoServer) -> None:
    needs_transparent_relay(server)
    held: list[bytes] = []

    def swap(d: str, i: int, msg: bytes) -> list[bytes]:
        if d == C2S and i == FIRST_DATA_C2S:
            held.append(msg)
            return []
        if d == C2S and i == FIRST_DATA_C2S + 1:
            return [msg, *held]
        return [msg]

    relay, lst = await through_relay(server, swap)
    try:
        ch = await open_via(relay)
        assert (await server.next_event())[0] == "accepted"
        await ch.send(b"A")
        await ch.send(b"B")
        kind, exc = await server.next_event()
        assert kind == "ended" and isinstance(exc, ProtocolError)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(ch.recv(), WAIT_S)
        await ch.close()
        await server.expect_honest_client_served()
    finally:
        await lst.close()


async def test_frame_replayed_after_key_updates_kills_channel(
        server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny key-update limits, the relay replays the first data frame (key epoch 0,
    counter 1) in place of the frame with the same counter three key updates later
    (epoch 3, counter 1): only the changed key can tell them apart, and it does."""
    needs_transparent_relay(server)
    monkeypatch.setattr(secure, "KEY_UPDATE_FRAMES", 3)
    monkeypatch.setattr(secure, "KEY_UPDATE_BYTES", 1 << 20)
    first: list[bytes] = []
    # client frames: the verdict is frame 0, the first data frame frame 1, so relay index
    # FIRST_DATA_C2S + 9 carries frame 10 = epoch 3, counter 1
    replay_at = FIRST_DATA_C2S + 9

    def replay(d: str, i: int, msg: bytes) -> list[bytes]:
        if d == C2S and i == FIRST_DATA_C2S:
            first.append(msg)
        if d == C2S and i == replay_at:
            return [first[0]]
        return [msg]

    relay, lst = await through_relay(server, replay)
    try:
        ch = await open_via(relay)
        kind, server_ch = await server.next_event()
        assert kind == "accepted"
        for n in range(replay_at - FIRST_DATA_C2S):
            await ch.send(b"message %d" % n)
            assert await asyncio.wait_for(ch.recv(), WAIT_S) == b"message %d" % n
        assert server_ch._session.recv_epoch >= 3  # several key updates happened
        await ch.send(b"the frame the relay swaps for an old one")
        kind, exc = await server.next_event()
        assert kind == "ended" and isinstance(exc, ProtocolError)
        assert "failed authentication" in str(exc)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(ch.recv(), WAIT_S)
        await ch.close()
        await server.expect_honest_client_served()
    finally:
        await lst.close()


@pytest.mark.parametrize("payload", sorted(FRAME_PAYLOADS))
async def test_tampered_frame_towards_client_raises_protocol_error(server: EchoServer,
                                                                   payload: str) -> None:
    needs_transparent_relay(server)
    relay, lst = await through_relay(server, at(S2C, 2, flip_middle))
    try:
        ch = await open_via(relay)
        await ch.send(FRAME_PAYLOADS[payload])
        with pytest.raises(ProtocolError, match="failed authentication"):
            await asyncio.wait_for(ch.recv(), WAIT_S)
        assert ch.closed
        with pytest.raises(ChannelClosed):
            await ch.recv()
        await _drain_until(server, "ended")
        await server.expect_honest_client_served()
    finally:
        await lst.close()


@pytest.mark.parametrize("payload", sorted(FRAME_PAYLOADS))
async def test_tampered_frame_taken_by_recv_nowait_kills_channel(server: EchoServer,
                                                                 payload: str) -> None:
    """The no-wait path a busy transfer uses checks every frame exactly as recv() does."""
    needs_transparent_relay(server)
    relay, lst = await through_relay(server, at(S2C, 2, flip_middle))
    try:
        ch = await open_via(relay)
        if not hasattr(ch._pipe, "recv_nowait"):
            pytest.skip(f"{server.transport} pipes have no recv_nowait (recv() is the path)")
        await ch.send(FRAME_PAYLOADS[payload])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        with pytest.raises(ProtocolError, match="failed authentication"):
            while ch.recv_nowait() is None:
                assert loop.time() < deadline, "the tampered frame never arrived"
                await asyncio.sleep(0.005)
        assert ch.closed
        with pytest.raises(ChannelClosed):
            await ch.recv()
        await _drain_until(server, "ended")
        await server.expect_honest_client_served()
    finally:
        await lst.close()


async def _drain_until(server: EchoServer, kind: str) -> None:
    while (await server.next_event())[0] != kind:
        pass


# --- the handshake --------------------------------------------------------------------

HANDSHAKE_ATTACKS: dict[str, Mutate] = {
    "msg1-tampered": at(C2S, 0, flip_middle),
    "msg2-tampered": at(S2C, 0, flip_last),
    "msg3-tampered": at(C2S, 1, flip_middle),
    "msg2-dropped": at(S2C, 0, lambda m: []),
    "verdict-tampered": at(S2C, 1, flip_last),
}


@pytest.mark.parametrize("attack", sorted(HANDSHAKE_ATTACKS))
async def test_tampered_handshake_fails_on_both_sides(server: EchoServer, attack: str) -> None:
    relay, lst = await through_relay(server, HANDSHAKE_ATTACKS[attack])
    try:
        pipe = await get_transport(server.transport).connect(HOST, relay.port)
        with pytest.raises((ProtocolError, ChannelClosed, P2PError)) as info:
            await open_channel(pipe, ALICE, expected_peer=BOB.peer_id, authorize=trusting(BOB),
                               timeout_s=1.0 if attack == "msg2-dropped" else WAIT_S)
        assert not isinstance(info.value, PeerNotTrusted)
        if attack in ("msg2-tampered", "verdict-tampered"):
            assert isinstance(info.value, ProtocolError)
        kind, _ = await server.next_event()
        if attack != "verdict-tampered" or server.transport in BOUND_TRANSPORTS:
            assert kind == "handshake-failed"
        else:  # the server finished; its channel ends when the relay hangs up
            assert kind == "accepted"
            await _drain_until(server, "ended")
        await server.expect_honest_client_served()
    finally:
        await lst.close()


async def test_relay_swapping_ephemeral_keys_fails(server: EchoServer) -> None:
    """An active attacker replaces both ephemerals with its own: signatures/boxes fail."""

    def swap_eph(d: str, i: int, msg: bytes) -> list[bytes]:
        if i == 0:
            obj = msgpack.unpackb(msg)
            obj[5] = sodium.crypto_kx_keypair()[0]  # e_I in msg1, e_R in msg2
            return [msgpack.packb(obj)]
        return [msg]

    relay, lst = await through_relay(server, swap_eph)
    try:
        with pytest.raises(HandshakeError):
            await open_via(relay)
        assert (await server.next_event())[0] == "handshake-failed"
        await server.expect_honest_client_served()
    finally:
        await lst.close()


async def test_man_in_the_middle_with_its_own_keys_fails(server: EchoServer) -> None:
    """Mallory terminates both handshakes with her own identity."""
    mitm_events: asyncio.Queue[Any] = asyncio.Queue()
    t = get_transport(server.transport)

    async def mallory(client: Pipe) -> None:
        try:
            await accept_channel(client, MALLORY, authorize=lambda p: None, timeout_s=WAIT_S)
        except P2PError as exc:
            mitm_events.put_nowait(exc)
        upstream = await t.connect(HOST, server.port)
        try:
            await open_channel(upstream, MALLORY, expected_peer=BOB.peer_id,
                               authorize=lambda p: None, timeout_s=WAIT_S)
        except P2PError as exc:
            mitm_events.put_nowait(exc)

    lst = await t.listen(HOST, 0, mallory)
    try:
        pipe = await t.connect(HOST, lst.port)
        with pytest.raises(HandshakeError, match="different key than its record claims"):
            await open_channel(pipe, ALICE, expected_peer=BOB.peer_id, authorize=trusting(BOB),
                               timeout_s=WAIT_S)
        # bob refuses mallory (not trusted), and mallory learns it
        kind, exc = await server.next_event()
        assert kind == "handshake-failed" and isinstance(exc, PeerNotTrusted)
        assert str(MALLORY.peer_id) in str(exc)
        seen = [await asyncio.wait_for(mitm_events.get(), WAIT_S) for _ in range(2)]
        assert any(isinstance(e, PeerNotTrusted) for e in seen)
        await server.expect_honest_client_served()
    finally:
        await lst.close()


# --- oversize (transport framing) ------------------------------------------------------


async def test_oversize_message_refused_by_pipe_send(server: EchoServer) -> None:
    pipe = await get_transport(server.transport).connect(HOST, server.port)
    try:
        with pytest.raises(ProtocolError):
            await pipe.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    finally:
        await pipe.close()
    await _drain_until(server, "handshake-failed")
    await server.expect_honest_client_served()


@pytest.mark.parametrize("when", ["before-handshake", "after-handshake"])
async def test_tcp_oversize_header_kills_connection_cleanly(when: str) -> None:
    srv = EchoServer("tcp")
    srv.listener = await get_transport("tcp").listen(HOST, 0, srv.handler)
    try:
        if when == "before-handshake":
            reader, writer = await asyncio.open_connection(HOST, srv.port)
            writer.write((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big") + b"\x00" * 1000)
            await writer.drain()
            kind, exc = await srv.next_event()
            assert kind == "handshake-failed" and isinstance(exc, ProtocolError)
            assert "limit" in str(exc)
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # server hung up
            writer.close()
            await writer.wait_closed()
        else:
            pipe = await get_transport("tcp").connect(HOST, srv.port)
            ch = await open_channel(pipe, ALICE, expected_peer=BOB.peer_id,
                                    authorize=trusting(BOB))
            assert (await srv.next_event())[0] == "accepted"
            pipe._transport.write(b"\xff\xff\xff\xff")  # type: ignore[attr-defined]
            kind, exc = await srv.next_event()
            assert kind == "ended" and isinstance(exc, ProtocolError) and "limit" in str(exc)
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(ch.recv(), WAIT_S)
            await ch.close()
        await srv.expect_honest_client_served()
    finally:
        await srv.listener.close()


async def test_tcp_garbage_before_handshake_is_handshake_error() -> None:
    srv = EchoServer("tcp")
    srv.listener = await get_transport("tcp").listen(HOST, 0, srv.handler)
    try:
        _, writer = await asyncio.open_connection(HOST, srv.port)
        junk = b"GET / HTTP/1.1\r\n\r\n"
        writer.write(len(junk).to_bytes(4, "big") + junk)
        await writer.drain()
        kind, exc = await srv.next_event()
        assert kind == "handshake-failed" and isinstance(exc, HandshakeError)
        writer.close()
        await writer.wait_closed()
        await srv.expect_honest_client_served()
    finally:
        await srv.listener.close()

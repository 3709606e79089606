"""The relay on 127.0.0.1: it splices a SIGMA channel between two nodes, sees only
ciphertext, enforces its limits, and a relay that tampers with one byte kills the
channel with an authentication error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bootstrap.relay import Circuit, RelayLimits, RelayServer
from bootstrap.relay_proto import (
    E_BAD_TOKEN,
    E_MALFORMED,
    E_NO_RESERVATION,
    E_PERMISSION_DENIED,
    E_RESERVATION_REFUSED,
    E_RESOURCE_LIMIT,
    Challenge,
    Join,
    Proof,
    RelayError,
    Reserve,
)
from node.channel import SecureChannel
from node.contact import ContactRecord
from node.errors import ChannelClosed, P2PError, PeerUnreachable, ProtocolError
from node.identity import Identity, PeerId
from node.peering import Peering
from node.reach.relay_client import RelayReservation, ReservationState, dial_via_relay
from node.secure import frame_key_iv
from node.transports import tcp
from node.trust import TrustStore
from node.wire import decode_message

PAYLOAD_BYTES = 2 * 1024 * 1024
MESSAGE_BYTES = 256 * 1024
WINDOW_BYTES = 16  # no 16-byte run of plaintext or key may appear in the capture


class CapturingRelay(RelayServer):
    """Records every byte forwarded; optionally flips one byte after `tamper_after`."""

    def __init__(self, limits: RelayLimits | None = None, tamper_after: int | None = None):
        super().__init__(limits)
        self.captured = [bytearray(), bytearray()]
        self.tamper_after = tamper_after

    def forwarded(self, circuit: Circuit, direction: int, data: bytes) -> bytes:
        buf = self.captured[direction]
        start = len(buf)
        buf += data
        if (self.tamper_after is not None and direction == 0
                and start <= self.tamper_after < start + len(data)):
            i = self.tamper_after - start
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        return data


class Node:
    def __init__(self, tmp_path: Path, identity: Identity,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity = identity
        self.trust = TrustStore(tmp_path / f"trust-{identity.name}.db")
        self.received: list[bytes] = []
        self.errors: list[str] = []

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        self.peering = Peering(identity, self.trust, host="127.0.0.1", ports={"tcp": 0},
                               transports=["tcp"], locate=locate)
        self.peering.register("sink", self._sink)

    async def _sink(self, channel: SecureChannel) -> None:
        try:
            while True:
                data = await channel.recv()
                self.received.append(bytes(data))
                await channel.send(b"ack")
        except ChannelClosed:
            pass
        except P2PError as exc:
            self.errors.append(str(exc))
            raise


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def lab(tmp_path: Path, relay: RelayServer) -> AsyncIterator[tuple[Node, Node, str]]:
    """alice dials; bob listens on nothing, reachable only through his reservation."""
    records: dict[PeerId, ContactRecord] = {}
    port = await relay.start("127.0.0.1", 0)
    addr = f"127.0.0.1:{port}"
    alice = Node(tmp_path, Identity.generate("alice"), records)
    bob = Node(tmp_path, Identity.generate("bob"), records)
    alice.trust.trust(bob.identity.peer_id, "bob")
    bob.trust.trust(alice.identity.peer_id, "alice")
    reservation = RelayReservation(bob.identity, addr, bob.peering.accept_pipe)
    task = asyncio.create_task(reservation.run())
    try:
        await alice.peering.start()
        # bob's advertised tcp port is closed: only the relay reaches him
        dead = await _closed_port()
        records[bob.identity.peer_id] = ContactRecord.create(
            bob.identity, ["127.0.0.1"], {"tcp": dead}, 1, relays=[addr])
        await asyncio.wait_for(reservation.reserved.wait(), 5.0)
        yield alice, bob, addr
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for node in (alice, bob):
            await node.peering.stop()
            node.trust.close()
        await relay.close()


async def _closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


def _windows(data: bytes, step: int) -> list[bytes]:
    return [data[i:i + WINDOW_BYTES] for i in range(0, len(data) - WINDOW_BYTES, step)]


async def test_relay_splices_a_channel_and_sees_only_ciphertext(tmp_path: Path) -> None:
    relay = CapturingRelay()
    async with lab(tmp_path, relay) as (alice, bob, addr):
        payload = os.urandom(PAYLOAD_BYTES)
        channel = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        assert channel.path == "relayed" and channel.relay == addr
        assert channel.transport == "tcp"
        for off in range(0, PAYLOAD_BYTES, MESSAGE_BYTES):
            await channel.send(payload[off:off + MESSAGE_BYTES])
            assert await channel.recv() == b"ack"
        await until(lambda: sum(map(len, bob.received)) == PAYLOAD_BYTES)
        assert b"".join(bob.received) == payload
        served = bob.peering.open_channels(alice.identity.peer_id)
        assert [ch.path for ch, _ in served] == ["relayed"]
        # the keys of both directions, as secrets and as derived AEAD keys
        session = channel._session
        keys = []
        for d in (session._send, session._recv):
            key, _iv = frame_key_iv(d.secret)
            keys += [d.secret, key]
        await channel.close()
    captured = bytes(relay.captured[0]) + bytes(relay.captured[1])
    assert len(captured) > PAYLOAD_BYTES  # everything went through the relay
    for window in _windows(payload, 4099):
        assert window not in captured
    for key in keys:
        assert len(key) >= 32
        for window in _windows(key, 1):
            assert window not in captured


async def test_tampering_relay_kills_the_channel_with_an_authentication_error(
        tmp_path: Path) -> None:
    # flip one byte well after the handshake, inside alice's first large frame
    relay = CapturingRelay(tamper_after=64 * 1024)
    async with lab(tmp_path, relay) as (alice, bob, _addr):
        channel = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        await channel.send(os.urandom(MESSAGE_BYTES))
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(channel.recv(), 5.0)
        await until(lambda: bool(bob.errors))
        assert bob.received == []
        assert "authentic" in bob.errors[0].lower() or "forged" in bob.errors[0].lower(), \
            bob.errors


async def test_circuit_byte_limit_closes_both_legs(tmp_path: Path) -> None:
    relay = CapturingRelay(RelayLimits(max_circuit_bytes=256 * 1024))
    async with lab(tmp_path, relay) as (alice, bob, _addr):
        channel = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        with pytest.raises(ChannelClosed):
            for _ in range(8):
                await channel.send(os.urandom(64 * 1024))
                await asyncio.wait_for(channel.recv(), 5.0)
        assert sum(map(len, relay.captured)) <= 256 * 1024 + 256 * 1024
        await until(lambda: relay.refusals[E_RESOURCE_LIMIT] == 1)


async def test_circuits_per_reservation_are_capped(tmp_path: Path) -> None:
    relay = CapturingRelay(RelayLimits(max_circuits_per_reservation=1))
    async with lab(tmp_path, relay) as (alice, bob, addr):
        first = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        with pytest.raises(PeerUnreachable, match="maximum of 1 circuits"):
            await dial_via_relay(addr, bob.identity.peer_id, timeout_s=5.0)
        await first.close()
        # the slot comes back once the first circuit is gone
        await until(lambda: relay.reservation_for(bob.identity.peer_id).circuits == 0)
        again = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        await again.close()


async def test_reservations_per_ip_are_capped(tmp_path: Path) -> None:
    relay = RelayServer(RelayLimits(max_reservations_per_ip=1))
    port = await relay.start("127.0.0.1", 0)
    addr = f"127.0.0.1:{port}"
    first = RelayReservation(Identity.generate("one"), addr, _no_pipe)
    second = RelayReservation(Identity.generate("two"), addr, _no_pipe)
    tasks = [asyncio.create_task(first.run())]
    try:
        await asyncio.wait_for(first.reserved.wait(), 5.0)
        tasks.append(asyncio.create_task(second.run()))
        await until(lambda: "too many reservations" in second.last_error)
        assert second.state is not ReservationState.RESERVED
        assert relay.refusals[E_RESERVATION_REFUSED] >= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await relay.close()


async def _no_pipe(pipe: object) -> None:
    return None


async def test_reservation_expires_unless_renewed(tmp_path: Path) -> None:
    relay = RelayServer(RelayLimits(reservation_ttl_s=1))
    port = await relay.start("127.0.0.1", 0)
    ident = Identity.generate("idle")
    try:
        pipe, _ = await _reserve_raw(port, ident)
        assert relay.reservation_for(ident.peer_id) is not None
        # no Renew: the relay drops it within the TTL and says why
        err = decode_message(await asyncio.wait_for(pipe.recv(), 5.0), expect=(RelayError,))
        assert err.code == E_RESERVATION_REFUSED and "expired" in err.reason
        assert relay.reservation_for(ident.peer_id) is None
        await pipe.close()
    finally:
        await relay.close()


async def _reserve_raw(port: int, ident: Identity) -> tuple[tcp.TcpPipe, bytes]:
    from bootstrap.relay_proto import Reserved, reserve_signed_bytes

    pipe = await tcp.connect("127.0.0.1", port)
    await pipe.send(Reserve(ident.peer_id.key).encode())
    challenge = decode_message(await pipe.recv(), expect=(Challenge,))
    await pipe.send(Proof(ident.sign(reserve_signed_bytes(challenge.nonce,
                                                          ident.peer_id.key))).encode())
    decode_message(await pipe.recv(), expect=(Reserved,))
    return pipe, challenge.nonce


async def test_only_the_key_owner_can_reserve() -> None:
    relay = RelayServer()
    port = await relay.start("127.0.0.1", 0)
    victim, mallory = Identity.generate("victim"), Identity.generate("mallory")
    try:
        pipe = await tcp.connect("127.0.0.1", port)
        await pipe.send(Reserve(victim.peer_id.key).encode())
        challenge = decode_message(await pipe.recv(), expect=(Challenge,))
        from bootstrap.relay_proto import reserve_signed_bytes

        forged = mallory.sign(reserve_signed_bytes(challenge.nonce, victim.peer_id.key))
        await pipe.send(Proof(forged).encode())
        err = decode_message(await pipe.recv(), expect=(RelayError,))
        assert err.code == E_PERMISSION_DENIED
        assert relay.reservation_for(victim.peer_id) is None
        with pytest.raises(ChannelClosed):
            await pipe.recv()
        await pipe.close()
    finally:
        await relay.close()


@pytest.mark.parametrize("raw, code", [
    (b"\x00\x00\x10\x00" + b"x" * 16, E_MALFORMED),  # 4 KiB header: over the control max
    (struct.pack(">I", 3) + b"\x93\x01\x02", E_MALFORMED),  # not [type, version, ...]
    (struct.pack(">I", 1) + b"\xc1", E_MALFORMED),  # not msgpack
])
async def test_bad_input_gets_a_clear_error_and_a_close(raw: bytes, code: str) -> None:
    relay = RelayServer()
    port = await relay.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        (size,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 5.0))
        err = decode_message(await reader.readexactly(size), expect=(RelayError,))
        assert err.code == code and err.reason.startswith("bad request")
        assert "Traceback" not in err.reason
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed
        writer.close()
        await writer.wait_closed()
    finally:
        await relay.close()


async def test_unknown_peer_and_unknown_token_are_refused() -> None:
    relay = RelayServer()
    port = await relay.start("127.0.0.1", 0)
    try:
        with pytest.raises(PeerUnreachable, match="no reservation"):
            await dial_via_relay(f"127.0.0.1:{port}", Identity.generate("x").peer_id)
        assert relay.refusals[E_NO_RESERVATION] == 1
        pipe = await tcp.connect("127.0.0.1", port)
        await pipe.send(Join(os.urandom(32)).encode())
        err = decode_message(await pipe.recv(), expect=(RelayError,))
        assert err.code == E_BAD_TOKEN
        await pipe.close()
    finally:
        await relay.close()


async def test_silent_client_is_closed_after_the_handshake_timeout() -> None:
    relay = RelayServer(RelayLimits(handshake_timeout_s=0.3))
    port = await relay.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await asyncio.wait_for(reader.read(), 5.0)  # error frame, then EOF
        assert b"timed out" in data
        writer.close()
        await writer.wait_closed()
    finally:
        await relay.close()


def test_relay_protocol_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_message(Reserve(b"k" * 32).encode()[:-1])


async def test_direct_address_wins_when_it_answers(tmp_path: Path) -> None:
    relay = CapturingRelay()
    async with lab(tmp_path, relay) as (alice, bob, addr):
        # bob also listens now and advertises it: the dialer never touches the relay
        ports = await bob.peering.start()
        record = ContactRecord.create(bob.identity, ["127.0.0.1"], ports, 2, relays=[addr])
        channel = await alice.peering.connect(bob.identity.peer_id, "sink", record=record,
                                              timeout_s=5.0)
        assert channel.path == "direct" and channel.relay is None
        assert channel.remote == ("127.0.0.1", ports["tcp"])
        await channel.close()
    assert relay.captured == [bytearray(), bytearray()]


async def test_unreachable_everywhere_names_every_attempt(tmp_path: Path) -> None:
    relay = CapturingRelay()
    async with lab(tmp_path, relay) as (alice, bob, addr):
        dead = await _closed_port()
        record = ContactRecord.create(bob.identity, ["127.0.0.1"], {"tcp": dead}, 3,
                                      relays=[f"127.0.0.1:{await _closed_port()}"])
        with pytest.raises(PeerUnreachable, match="tcp 127.0.0.1.*relay 127.0.0.1"):
            await alice.peering.connect(bob.identity.peer_id, "sink", record=record,
                                        timeout_s=2.0)


def test_relays_config_key_is_validated(tmp_path: Path) -> None:
    from node.config import load_settings
    from node.errors import ConfigError

    assert load_settings(tmp_path, {"relays": ["198.18.0.1:8474"]}).relays == \
        ["198.18.0.1:8474"]
    with pytest.raises(ConfigError, match="relays"):
        load_settings(tmp_path, {"relays": ["no-port"]})
    with pytest.raises(ConfigError, match="option --relay: "):
        load_settings(tmp_path, {"relays": ["h:1", "h:2", "h:3", "h:4", "h:5"]})


@pytest.mark.slow
async def test_node_relay_command_serves_reservations(tmp_path: Path) -> None:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "relay", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15.0)).decode()
        assert line.startswith("relay listening on 127.0.0.1:"), line
        addr = line.rsplit(" ", 1)[1].strip()
        reservation = RelayReservation(Identity.generate("n"), addr, _no_pipe)
        task = asyncio.create_task(reservation.run())
        try:
            await asyncio.wait_for(reservation.reserved.wait(), 10.0)
            assert reservation.status()["state"] == "reserved"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        assert proc.stderr is not None
        rest = (await proc.stderr.read()).decode()
        assert "reservation for" in rest and "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_circuit_duration_limit_closes_both_legs(tmp_path: Path) -> None:
    relay = CapturingRelay(RelayLimits(max_circuit_s=1))
    async with lab(tmp_path, relay) as (alice, bob, _addr):
        channel = await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
        await channel.send(b"hello")
        assert await channel.recv() == b"ack"
        started = time.monotonic()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(channel.recv(), 5.0)  # nothing more comes: the relay cuts
        assert 0.3 < time.monotonic() - started < 3.0
        await until(lambda: relay.refusals["circuit-duration"] == 1)


async def test_a_relay_that_splices_to_someone_else_is_caught_by_the_handshake(
        tmp_path: Path) -> None:
    relay = CapturingRelay()
    async with lab(tmp_path, relay) as (alice, bob, addr):
        # mallory is trusted by alice too, and holds a reservation at the same relay
        mallory = Node(tmp_path, Identity.generate("mallory"), {})
        mallory.trust.trust(alice.identity.peer_id, "alice")
        alice.trust.trust(mallory.identity.peer_id, "mallory")
        res = RelayReservation(mallory.identity, addr, mallory.peering.accept_pipe)
        task = asyncio.create_task(res.run())
        try:
            await asyncio.wait_for(res.reserved.wait(), 5.0)
            # the relay lies: circuits for bob go to mallory
            relay._reservations[bob.identity.peer_id] = relay._reservations[
                mallory.identity.peer_id]
            with pytest.raises(ProtocolError, match="different key than its record"):
                await alice.peering.connect(bob.identity.peer_id, "sink", timeout_s=5.0)
            assert mallory.received == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await mallory.peering.stop()
            mallory.trust.close()

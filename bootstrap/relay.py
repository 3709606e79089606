"""The relay: splices two TCP connections so a node behind any NAT stays reachable.

A node that cannot be dialled keeps a *reservation* here: a long-lived control
connection on which it proved (by signing a fresh nonce) that it owns the peer
id it reserves for. A dialer asks the relay to *connect* it to that peer id;
the relay sends the holder an unguessable token (``secrets.token_bytes``) on
the control connection, the holder opens a data connection presenting it, and
the relay splices the dialer's connection to that one: from then on it copies
bytes both ways and never parses them again. The peers' SIGMA handshake and
every AEAD frame run end to end through the splice, so the relay sees only
ciphertext and never a key. Vocabulary after libp2p circuit relay v2
(reservation, connect, limits); wire format in bootstrap/relay_proto.py and
docs/protocols/relay.md.

What one client may cost (``RelayLimits``, all enforced here):
* control messages are at most ``MAX_CONTROL_BYTES`` and must arrive within
  ``handshake_timeout_s``; a malformed one is answered with ``RelayError``
  (one line, no traceback) and the connection closed;
* connections per remote address and in total; reservations per address and in
  total; a reservation lapses unless renewed within ``reservation_ttl_s``;
* per reservation at most ``max_circuits_per_reservation`` circuits at once
  (``max_circuits_total`` in all); each circuit carries at most
  ``max_circuit_bytes`` (both directions together) and lives at most
  ``max_circuit_s``; then both legs are closed;
* a splice reads at most ``SPLICE_CHUNK_BYTES`` at a time and writes with
  backpressure (``drain``), so memory per circuit stays bounded.

Imports node.wire/identity/errors/transports only through relay_proto and
nothing of the node daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bootstrap.relay_proto import (
    E_BAD_TOKEN,
    E_CONNECTION_FAILED,
    E_MALFORMED,
    E_NO_RESERVATION,
    E_PERMISSION_DENIED,
    E_RESERVATION_REFUSED,
    E_RESOURCE_LIMIT,
    FIRST_MESSAGES,
    MAX_CONTROL_BYTES,
    NONCE_BYTES,
    TOKEN_BYTES,
    Challenge,
    Connect,
    Incoming,
    Join,
    Proof,
    RelayError,
    Renew,
    Reserve,
    Reserved,
    Spliced,
    reserve_signed_bytes,
)
from node.errors import IdentityError, P2PError, ProtocolError, bind_errors
from node.identity import PeerId
from node.wire import Message, decode_message

log = logging.getLogger("p2pfs.relay")

# clear of the node (8468, 8471-8473), its dashboard (8474) and the bootstrap server (8470)
DEFAULT_RELAY_PORT = 8479
HEADER = struct.Struct(">I")
SPLICE_CHUNK_BYTES = 256 * 1024
# StreamReader stops reading from the socket above 2x this: the per-leg read buffer
STREAM_LIMIT_BYTES = 128 * 1024


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """What clients may cost the relay; every field must be positive."""

    reservation_ttl_s: int = 120
    max_reservations_total: int = 1024
    max_reservations_per_ip: int = 16
    max_circuits_per_reservation: int = 16
    max_circuits_total: int = 256
    max_circuit_bytes: int = 4 * 1024**3
    max_circuit_s: int = 3600
    max_connections_per_ip: int = 128
    max_connections_total: int = 4096
    handshake_timeout_s: float = 10.0
    join_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not getattr(self, name) > 0:
                raise ValueError(f"relay limit {name} must be positive")


class CircuitState(enum.Enum):
    WAITING = "waiting"  # the holder has been told; its Join has not arrived yet
    SPLICED = "spliced"
    CLOSED = "closed"


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class _Reservation:
    peer: PeerId
    ip: str
    writer: asyncio.StreamWriter
    expires: float
    circuits: int = 0
    circuits_total: int = 0
    bytes_total: int = 0


@dataclass(slots=True)
class Circuit:
    """One spliced pair of connections (tests read ``forwarded`` through a subclass hook)."""

    token: bytes
    reservation: _Reservation
    started: float
    state: CircuitState = CircuitState.WAITING
    bytes_forwarded: int = 0
    joined: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, state: CircuitState) -> None:
        log.debug("circuit %s for %s: %s -> %s", self.token[:4].hex(),
                  self.reservation.peer.short, self.state.value, state.value)
        self.state = state


class RelayServer:
    def __init__(self, limits: RelayLimits | None = None, *,
                 token_bytes: Callable[[int], bytes] = secrets.token_bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or RelayLimits()
        self._token_bytes = token_bytes
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._reservations: dict[PeerId, _Reservation] = {}
        self._reservations_per_ip: Counter[str] = Counter()
        self._connections_per_ip: Counter[str] = Counter()
        self._connections = 0
        self._circuits: dict[bytes, Circuit] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self.refusals: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> int:
        with bind_errors("relay", host, port, "--port"):
            self._server = await asyncio.start_server(self._handle, host, port,
                                                      limit=STREAM_LIMIT_BYTES)
        sock = self._server.sockets[0]
        bound = int(sock.getsockname()[1])
        log.info("relay listening on %s:%d", host, bound)
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def stats(self) -> dict[str, object]:
        return {"reservations": len(self._reservations), "connections": self._connections,
                "circuits": sum(1 for c in self._circuits.values()
                                if c.state is CircuitState.SPLICED),
                "refusals": dict(self.refusals)}

    def reservation_for(self, peer: PeerId) -> _Reservation | None:
        return self._reservations.get(peer)

    # ------------------------------------------------------------------ I/O helpers
    async def _read(self, reader: asyncio.StreamReader, expect: tuple[type[Message], ...],
                    timeout_s: float | None) -> Message:
        async def read() -> Message:
            (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            if size > MAX_CONTROL_BYTES:
                raise ProtocolError(f"control message of {size} bytes exceeds "
                                    f"{MAX_CONTROL_BYTES}")
            body = await reader.readexactly(size)
            return decode_message(body, expect=expect, max_bytes=MAX_CONTROL_BYTES)

        return await asyncio.wait_for(read(), timeout_s)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, msg: Message) -> None:
        body = msg.encode()
        writer.write(HEADER.pack(len(body)) + body)

    # ------------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "?"
        lim = self.limits
        if (self._connections >= lim.max_connections_total
                or self._connections_per_ip[ip] >= lim.max_connections_per_ip):
            self.refusals["connections"] += 1
            await self._refuse(writer, E_RESOURCE_LIMIT, "too many connections")
            return
        self._connections += 1
        self._connections_per_ip[ip] += 1
        if task is not None:
            self._handlers.add(task)
        try:
            first = await self._read(reader, FIRST_MESSAGES, lim.handshake_timeout_s)
            if isinstance(first, Reserve):
                await self._serve_reservation(first, ip, reader, writer)
            elif isinstance(first, Connect):
                await self._serve_connect(first, reader, writer)
            elif isinstance(first, Join):
                await self._serve_join(first, reader, writer)
        except _Refused as exc:
            self.refusals[exc.code] += 1
            log.info("refused %s: %s", ip, exc.reason)
            await self._refuse(writer, exc.code, exc.reason)
        except ProtocolError as exc:
            self.refusals[E_MALFORMED] += 1
            log.info("bad request from %s: %s", ip, exc)
            await self._refuse(writer, E_MALFORMED, f"bad request: {exc}"[:200])
        except TimeoutError:
            self.refusals["timeout"] += 1
            await self._refuse(writer, E_MALFORMED, "timed out waiting for a message")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the client went away
        finally:
            self._connections -= 1
            self._connections_per_ip[ip] -= 1
            if self._connections_per_ip[ip] <= 0:
                del self._connections_per_ip[ip]
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._handlers.discard(task)

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._write(writer, RelayError(code, reason[:200]))
            await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()

    # ------------------------------------------------------------------ reservations
    async def _serve_reservation(self, msg: Reserve, ip: str, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        try:
            peer = PeerId(msg.peer_key)
        except (IdentityError, ValueError) as exc:
            raise ProtocolError(f"bad peer key: {exc}") from None
        replacing = self._reservations.get(peer)
        if replacing is None:
            if len(self._reservations) >= lim.max_reservations_total:
                raise _Refused(E_RESERVATION_REFUSED, "the relay holds its maximum of "
                               "reservations")
            if self._reservations_per_ip[ip] >= lim.max_reservations_per_ip:
                raise _Refused(E_RESERVATION_REFUSED, f"too many reservations from {ip} "
                               f"(at most {lim.max_reservations_per_ip})")
        nonce = self._token_bytes(NONCE_BYTES)
        self._write(writer, Challenge(nonce))
        proof = await self._read(reader, (Proof,), lim.handshake_timeout_s)
        assert isinstance(proof, Proof)
        if not peer.verify(reserve_signed_bytes(nonce, msg.peer_key), proof.signature):
            raise _Refused(E_PERMISSION_DENIED, "the reservation proof does not verify")
        replacing = self._reservations.get(peer)  # may have changed while we waited
        if replacing is not None:
            # the owner of this key reconnected (new NAT mapping): the newer one wins
            log.info("reservation for %s replaced by a new connection", peer.short)
            self._drop_reservation(replacing)
            replacing.writer.close()
        elif self._reservations_per_ip[ip] >= lim.max_reservations_per_ip:
            raise _Refused(E_RESERVATION_REFUSED, f"too many reservations from {ip}")
        res = _Reservation(peer, ip, writer, self._clock() + lim.reservation_ttl_s)
        self._reservations[peer] = res
        self._reservations_per_ip[ip] += 1
        log.info("reservation for %s from %s", peer.short, ip)
        try:
            self._write(writer, self._reserved())
            while True:
                msg2 = await self._read(reader, (Renew,), lim.reservation_ttl_s)
                assert isinstance(msg2, Renew)
                res.expires = self._clock() + lim.reservation_ttl_s
                self._write(writer, self._reserved())
        except TimeoutError:
            raise _Refused(E_RESERVATION_REFUSED, "reservation expired (not renewed)") from None
        finally:
            self._drop_reservation(res)

    def _reserved(self) -> Reserved:
        lim = self.limits
        return Reserved(lim.reservation_ttl_s, lim.max_circuit_bytes, lim.max_circuit_s,
                        lim.max_circuits_per_reservation)

    def _drop_reservation(self, res: _Reservation) -> None:
        if self._reservations.get(res.peer) is res:
            del self._reservations[res.peer]
            self._reservations_per_ip[res.ip] -= 1
            if self._reservations_per_ip[res.ip] <= 0:
                del self._reservations_per_ip[res.ip]
            log.info("reservation for %s ended", res.peer.short)

    # ------------------------------------------------------------------ circuits
    async def _serve_connect(self, msg: Connect, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        try:
            peer = PeerId(msg.peer_key)
        except (IdentityError, ValueError) as exc:
            raise ProtocolError(f"bad peer key: {exc}") from None
        res = self._reservations.get(peer)
        if res is None or res.expires <= self._clock():
            raise _Refused(E_NO_RESERVATION, f"peer {peer.short} has no reservation here")
        if res.circuits >= lim.max_circuits_per_reservation:
            raise _Refused(E_RESOURCE_LIMIT, f"peer {peer.short} has its maximum of "
                           f"{lim.max_circuits_per_reservation} circuits open")
        if len(self._circuits) >= lim.max_circuits_total:
            raise _Refused(E_RESOURCE_LIMIT, "the relay carries its maximum of circuits")
        token = self._token_bytes(TOKEN_BYTES)
        circuit = Circuit(token, res, self._clock())
        self._circuits[token] = circuit
        res.circuits += 1
        res.circuits_total += 1
        try:
            self._write(res.writer, Incoming(token))
            try:
                other_reader, other_writer = await asyncio.wait_for(
                    asyncio.shield(circuit.joined), lim.join_timeout_s)
            except TimeoutError:
                raise _Refused(E_CONNECTION_FAILED,
                               f"peer {peer.short} did not join the circuit") from None
            circuit.set_state(CircuitState.SPLICED)
            spliced = Spliced(lim.max_circuit_bytes, lim.max_circuit_s)
            self._write(writer, spliced)
            self._write(other_writer, spliced)
            await self._splice(circuit, reader, writer, other_reader, other_writer)
        finally:
            circuit.set_state(CircuitState.CLOSED)
            circuit.done.set()
            if not circuit.joined.done():
                circuit.joined.cancel()
            self._circuits.pop(token, None)
            res.circuits -= 1
            res.bytes_total += circuit.bytes_forwarded

    async def _serve_join(self, msg: Join, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        circuit = self._circuits.get(msg.token)
        if circuit is None or circuit.state is not CircuitState.WAITING or circuit.joined.done():
            raise _Refused(E_BAD_TOKEN, "unknown or used circuit token")
        circuit.joined.set_result((reader, writer))
        # the dialer's handler splices; this connection lives until the circuit ends
        await circuit.done.wait()

    async def _splice(self, circuit: Circuit, a_reader: asyncio.StreamReader,
                      a_writer: asyncio.StreamWriter, b_reader: asyncio.StreamReader,
                      b_writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        pumps = [asyncio.create_task(self._pump(circuit, 0, a_reader, b_writer)),
                 asyncio.create_task(self._pump(circuit, 1, b_reader, a_writer))]
        try:
            done, _ = await asyncio.wait(pumps, timeout=lim.max_circuit_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.info("circuit for %s closed: %d s duration limit",
                         circuit.reservation.peer.short, lim.max_circuit_s)
                self.refusals["circuit-duration"] += 1
            for task in done:
                exc = task.exception()
                if isinstance(exc, _Refused):
                    log.info("circuit for %s closed: %s", circuit.reservation.peer.short,
                             exc.reason)
                    self.refusals[exc.code] += 1
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            # a leg's buffered bytes still go out before its socket closes
            a_writer.close()
            b_writer.close()

    async def _pump(self, circuit: Circuit, direction: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        limit = self.limits.max_circuit_bytes
        try:
            while True:
                data = await reader.read(SPLICE_CHUNK_BYTES)
                if not data:
                    return
                circuit.bytes_forwarded += len(data)
                if circuit.bytes_forwarded > limit:
                    raise _Refused(E_RESOURCE_LIMIT, f"circuit exceeded {limit} bytes")
                writer.write(self.forwarded(circuit, direction, data))
                await writer.drain()
        except (ConnectionError, OSError):
            return

    def forwarded(self, circuit: Circuit, direction: int, data: bytes) -> bytes:
        """Every byte the relay forwards passes here (0: dialer -> holder, 1: back).

        The identity; tests subclass it to capture or tamper with the stream."""
        return data


def run(host: str, port: int, limits: RelayLimits | None = None) -> None:
    """Run a relay in the foreground until Ctrl-C / SIGTERM."""
    import signal

    async def main() -> None:
        relay = RelayServer(limits)
        bound = await relay.start(host, port)
        print(f"relay listening on {host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await relay.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m bootstrap.relay``: the same relay as ``node relay``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bootstrap.relay",
                                     description="p2pfs relay (splices end-to-end "
                                     "encrypted TCP streams)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_RELAY_PORT)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0-65535")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args.host, args.port)
    except P2PError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


__all__ = ["DEFAULT_RELAY_PORT", "Circuit", "P2PError", "RelayLimits", "RelayServer", "run"]


if __name__ == "__main__":
    import sys

    sys.exit(main())

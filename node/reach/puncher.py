"""The asyncio driver of hole punching (machines and messages: node/reach/punch.py).

``run_initiator`` / ``run_responder`` move one punch's messages between a
machine and an authenticated channel (any object with ``send``/``recv``), and
its datagrams through a ``PunchSocket`` (the udp transport's listener: a
client connection or a raw datagram from the listening socket).

``HolePuncher`` is what peering holds: after a dial went through a relay it
punches in the background (``upgrade_soon``); a success is verified by a SIGMA
handshake with the expected peer over the new udp pipe (``verify``, supplied
by peering), then remembered, so later dials to that peer go direct
(``dial_punched``: the dial order's "hole punch" step, before the relay).
``on_punched`` tells peering, which closes the relayed transfer channels it
opened to that peer: a share retries and resumes from its verified chunks, so
it continues over the punched path a second later (so does one whose relay
dies).

Imports the pure module, errors, identity and transport interfaces; the
channel layer comes in only through the callables peering passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.errors import P2PError, PeerUnreachable, ProtocolError
from node.identity import PeerId
from node.reach import PATH_HOLE_PUNCHED
from node.reach.punch import (
    ATTEMPT_DIAL_S,
    MAX_PUNCH_MESSAGE_BYTES,
    PUNCH_DATAGRAM,
    PUNCH_INTERVAL_S,
    PUNCH_MESSAGES,
    PUNCH_WINDOW_S,
    REPLY_TIMEOUT_S,
    Action,
    Dial,
    Finished,
    InitiatorState,
    PunchedPaths,
    PunchInitiator,
    PunchResponder,
    Send,
    StartPunching,
    StopPunching,
)
from node.transports.base import Pipe
from node.wire import decode_message

log = logging.getLogger("p2pfs.reach.punch")

PUNCHED_DIAL_TIMEOUT_S = 1.5
MAX_RESPONSES = 8  # punches this node answers at once, in all (one per peer)
PUNCH_TOTAL_TIMEOUT_S = 30.0  # a whole punch, every attempt, relayed round trips included


class Messenger(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...


class ClosableMessenger(Messenger, Protocol):
    async def close(self) -> None: ...


class PunchSocket(Protocol):
    async def connect_from_listener(self, host: str, port: int, *,
                                    timeout: float) -> Pipe: ...

    def send_datagram(self, data: bytes, host: str, port: int) -> None: ...


@dataclass(frozen=True, slots=True)
class PunchOutcome:
    ok: bool
    attempts: int
    rtt_s: float | None
    elapsed_s: float
    pipe: Pipe | None = None
    endpoint: tuple[str, int] | None = None
    peer_endpoints: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "attempts": self.attempts,
                "relayed_rtt_ms": None if self.rtt_s is None else self.rtt_s * 1000,
                "elapsed_ms": self.elapsed_s * 1000,
                "endpoint": list(self.endpoint) if self.endpoint else None}


async def _recv_message(messenger: Messenger, timeout_s: float) -> Any:
    data = await asyncio.wait_for(messenger.recv(), timeout_s)
    return decode_message(bytes(data), expect=PUNCH_MESSAGES, max_bytes=MAX_PUNCH_MESSAGE_BYTES)


async def dial_any(sock: PunchSocket, endpoints: tuple[tuple[str, int], ...],
                   timeout_s: float) -> tuple[Pipe, tuple[str, int]] | None:
    """Connect to every endpoint at once from the listening socket; the first to answer
    wins, the others are cancelled (a late second winner is closed)."""
    tasks = {asyncio.ensure_future(sock.connect_from_listener(h, p, timeout=timeout_s)): (h, p)
             for h, p in endpoints}
    winner: tuple[Pipe, tuple[str, int]] | None = None
    try:
        pending = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None and winner is None:
                    winner = (task.result(), tasks[task])
                elif exc is None:
                    task.result().abort("a faster endpoint won")  # type: ignore[attr-defined]
                elif not isinstance(exc, (P2PError, OSError)):
                    raise exc
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, res in zip(tasks, results, strict=True):
            if winner is not None and res is winner[0]:
                continue
            if hasattr(res, "abort") and task.done() and not task.cancelled():
                res.abort("a faster endpoint won")
    return winner


async def run_initiator(messenger: Messenger, machine: PunchInitiator,
                        sock: PunchSocket) -> PunchOutcome:
    loop = asyncio.get_running_loop()
    started = loop.time()
    pipe: Pipe | None = None
    endpoint: tuple[str, int] | None = None
    queue: list[Action] = machine.start(loop.time())
    try:
        while True:
            while queue:
                action = queue.pop(0)
                if isinstance(action, Send):
                    await messenger.send(action.message.encode())
                elif isinstance(action, Dial):
                    won = await dial_any(sock, action.endpoints, ATTEMPT_DIAL_S)
                    if won is not None:
                        pipe, endpoint = won
                    log.debug("punch attempt %d: %s", action.attempt,
                              f"reached {endpoint}" if won else "no answer")
                    queue += machine.on_dial_result(won is not None, loop.time())
                elif isinstance(action, Finished):
                    return PunchOutcome(action.ok, action.attempts, action.rtt_s,
                                        loop.time() - started, pipe if action.ok else None,
                                        endpoint if action.ok else None,
                                        machine.peer_endpoints)
            when = machine.timer()
            if machine.state is InitiatorState.WAITING_HALF_RTT and when is not None:
                await asyncio.sleep(max(0.0, when - loop.time()))
                queue += machine.on_timer(loop.time())
            elif machine.state is InitiatorState.CONNECT_SENT and when is not None:
                try:
                    msg = await _recv_message(messenger, max(0.0, when - loop.time()))
                except TimeoutError:
                    queue += machine.on_timer(loop.time())
                else:
                    queue += machine.on_message(msg, loop.time())
            else:
                raise ProtocolError(f"punch initiator stuck in state {machine.state.value}")
    except BaseException:
        if pipe is not None:
            pipe.abort("punch abandoned")  # type: ignore[attr-defined]
        raise


async def _open_nat(sock: PunchSocket, endpoints: tuple[tuple[str, int], ...]) -> None:
    for _ in range(round(PUNCH_WINDOW_S / PUNCH_INTERVAL_S)):
        for host, port in endpoints:
            sock.send_datagram(PUNCH_DATAGRAM, host, port)
        await asyncio.sleep(PUNCH_INTERVAL_S)


async def run_responder(messenger: Messenger, machine: PunchResponder,
                        sock: PunchSocket) -> PunchOutcome:
    loop = asyncio.get_running_loop()
    started = loop.time()
    punching: asyncio.Task[None] | None = None

    async def stop() -> None:
        nonlocal punching
        if punching is not None:
            punching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await punching
            punching = None

    try:
        while True:
            # between Sync and Done the initiator dials for up to ATTEMPT_DIAL_S
            msg = await _recv_message(messenger, REPLY_TIMEOUT_S + ATTEMPT_DIAL_S)
            for action in machine.on_message(msg, loop.time()):
                if isinstance(action, Send):
                    await messenger.send(action.message.encode())
                elif isinstance(action, StartPunching):
                    await stop()
                    punching = asyncio.create_task(_open_nat(sock, action.endpoints))
                elif isinstance(action, StopPunching):
                    await stop()
                elif isinstance(action, Finished):
                    return PunchOutcome(action.ok, action.attempts, None,
                                        loop.time() - started,
                                        peer_endpoints=machine.peer_endpoints)
    finally:
        await stop()


# -- what peering holds ------------------------------------------------------------------
OpenCoordination = Callable[[PeerId], Awaitable[ClosableMessenger]]
Verify = Callable[[PeerId, Pipe], Awaitable[None]]


class HolePuncher:
    """Punches for peers reached through a relay, and remembers what worked."""

    def __init__(self, sock: PunchSocket, own_endpoints: Callable[[], list[tuple[str, int]]],
                 *, open_coordination: OpenCoordination, verify: Verify,
                 clock: Callable[[], float] = time.monotonic,
                 paths: PunchedPaths | None = None,
                 on_punched: Callable[[PeerId], None] | None = None) -> None:
        self._sock = sock
        self._own = own_endpoints
        self._open = open_coordination
        self._verify = verify
        self._on_punched = on_punched
        self._clock = clock
        self.paths = paths or PunchedPaths()
        self._running: dict[PeerId, asyncio.Task[PunchOutcome]] = {}
        # peer -> endpoints it offered in a punch we answered (to name its udp pipes)
        self._offered: dict[PeerId, set[tuple[str, int]]] = {}
        self._answering: set[PeerId] = set()
        self.punches = 0
        self.succeeded = 0
        self.failed = 0
        self.last: dict[str, Any] = {}

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {"punches": self.punches, "succeeded": self.succeeded, "failed": self.failed,
                "running": len(self._running), "last": self.last,
                "punched": {p.short: list(e) for p, e in self.paths.endpoints(now).items()}}

    # -- initiator ----------------------------------------------------------------
    def upgrade_soon(self, peer: PeerId) -> None:
        """A dial to `peer` went through a relay: punch in the background, once at a time."""
        if peer in self._running or not self.paths.should_punch(peer, self._clock()):
            return
        self._start(peer)

    def _start(self, peer: PeerId) -> asyncio.Task[PunchOutcome]:
        task = asyncio.create_task(self._punch(peer))
        self._running[peer] = task

        def done(t: asyncio.Task[PunchOutcome]) -> None:
            if self._running.get(peer) is t:
                del self._running[peer]
            if not t.cancelled() and t.exception() is not None:
                log.info("hole punch with %s failed: %s", peer.short, t.exception())

        task.add_done_callback(done)
        return task

    async def punch(self, peer: PeerId) -> PunchOutcome:
        """Punch now (waiting for one already running), whatever the cache says."""
        task = self._running.get(peer) or self._start(peer)
        return await asyncio.shield(task)

    async def _punch(self, peer: PeerId) -> PunchOutcome:
        self.punches += 1
        started = self._clock()
        try:
            try:
                outcome = await asyncio.wait_for(self._punch_once(peer), PUNCH_TOTAL_TIMEOUT_S)
            except TimeoutError:
                raise PeerUnreachable(f"hole punch with {peer.short} did not finish within "
                                      f"{PUNCH_TOTAL_TIMEOUT_S:g} s") from None
        except (P2PError, OSError) as exc:
            self.failed += 1
            self.paths.failed(peer, self._clock())
            self.last = {"peer": peer.short, "ok": False, "error": str(exc),
                         "elapsed_ms": (self._clock() - started) * 1000}
            raise
        # from the request on: the coordination channel's dial and handshake, the exchange,
        # the udp dial and the SIGMA verification over it
        outcome = dataclasses.replace(outcome, elapsed_s=self._clock() - started)
        if outcome.ok:
            self.succeeded += 1
            if self._on_punched is not None:
                self._on_punched(peer)
        else:
            self.failed += 1
            self.paths.failed(peer, self._clock())
        self.last = {"peer": peer.short, **outcome.to_json()}
        log.info("hole punch with %s: %s after %d attempt(s) in %.0f ms", peer.short,
                 f"direct via {outcome.endpoint}" if outcome.ok else "failed",
                 outcome.attempts, outcome.elapsed_s * 1000)
        return outcome

    async def _punch_once(self, peer: PeerId) -> PunchOutcome:
        channel = await self._open(peer)
        try:
            outcome = await run_initiator(channel, PunchInitiator(self._own()), self._sock)
        finally:
            with contextlib.suppress(P2PError, OSError):
                await channel.close()
        if outcome.pipe is None or outcome.endpoint is None:
            return outcome
        # the endpoint answered a udp handshake; only SIGMA proves it is `peer`
        await self._verify(peer, outcome.pipe)
        self.paths.remember(peer, outcome.endpoint, self._clock())
        return PunchOutcome(True, outcome.attempts, outcome.rtt_s, outcome.elapsed_s,
                            None, outcome.endpoint, outcome.peer_endpoints)

    async def dial_punched(self, peer: PeerId) -> Pipe | None:
        """The dial order's hole-punch step: a fresh punched endpoint of `peer`, dialled
        from the listening socket; None when there is none or it stopped answering."""
        endpoint = self.paths.get(peer, self._clock())
        if endpoint is None:
            return None
        try:
            pipe = await self._sock.connect_from_listener(*endpoint,
                                                          timeout=PUNCHED_DIAL_TIMEOUT_S)
        except (P2PError, OSError) as exc:
            log.info("punched path to %s at %s:%d is gone: %s", peer.short, *endpoint, exc)
            self.paths.forget(peer)
            return None
        self.paths.used(peer, self._clock())
        pipe.path = PATH_HOLE_PUNCHED  # type: ignore[attr-defined]
        return pipe

    # -- responder ----------------------------------------------------------------
    async def serve(self, peer: PeerId, channel: Messenger) -> PunchOutcome:
        """Answer `peer`'s punch (it runs inside an authenticated, trusted channel); one
        per peer and MAX_RESPONSES in all, so even a trusted peer cannot multiply the
        datagrams a punch sends."""
        if peer in self._answering or len(self._answering) >= MAX_RESPONSES:
            raise ProtocolError(f"refused a hole punch from {peer.short}: "
                                + ("one is already running" if peer in self._answering
                                   else f"{MAX_RESPONSES} are running"))
        self._answering.add(peer)
        try:
            outcome = await run_responder(channel, PunchResponder(self._own()), self._sock)
        finally:
            self._answering.discard(peer)
        if outcome.ok:
            self._offered[peer] = set(outcome.peer_endpoints)
        log.info("hole punch from %s: %s after %d attempt(s)", peer.short,
                 "succeeded" if outcome.ok else "failed", outcome.attempts)
        return outcome

    def inbound(self, peer: PeerId, transport: str, remote: tuple[str, int]) -> bool:
        """An authenticated `peer` reached us over udp from `remote`: True (and the path is
        remembered, for our own dials back) if that is an endpoint it offered to punch."""
        if transport != "udp":
            return False
        endpoint = (str(remote[0]), int(remote[1]))
        if endpoint not in self._offered.get(peer, set()):
            known = self.paths.get(peer, self._clock())
            return known == endpoint
        self.paths.remember(peer, endpoint, self._clock())
        return True

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        self._running.clear()

"""SecureChannel: the authenticated, encrypted message channel over any transport Pipe.

Drives the sans-IO handshake of ``node/secure.py`` over a ``Pipe``
(``node/transports/base.py``), asks the caller's ``authorize`` callback whether
the authenticated peer is trusted, and then seals every message. Knows nothing
of files, gossip or the trust store itself (``authorize`` is injected); must not
import the daemon, trust, transfer or gossip modules.

After the three handshake messages, each side's first sealed frame is its
verdict: ``b"ok"`` or ``b"refused: <reason>"``. The initiator sends msg3 and its
verdict at once; the responder reads that verdict before sending its own, so a
refusal from either side always reaches the other side as a clear error.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from node.errors import ChannelClosed, P2PError, PeerNotTrusted, PeerUnreachable, ProtocolError
from node.identity import Identity, PeerId
from node.secure import (
    FRAME_OVERHEAD_BYTES,
    MAX_ABORT_REASON_BYTES,
    InitiatorHandshake,
    ResponderHandshake,
    Session,
)
from node.transports.base import MAX_MESSAGE_BYTES, Pipe

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
MAX_PLAINTEXT_BYTES = MAX_MESSAGE_BYTES - FRAME_OVERHEAD_BYTES
# frames at least this large are sealed straight into the pipe's send buffer and,
# when the pipe hands them over as owned bytearrays, opened in place; recv() then
# returns that bytearray (bytes-like). Smaller messages stay plain bytes.
IN_PLACE_MIN_BYTES = 64 * 1024
VERDICT_OK = b"ok"
VERDICT_REFUSED_PREFIX = b"refused: "
REFUSAL_NOT_TRUSTED = "not trusted"

Authorize = Callable[[PeerId], None]


class ChannelState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class SecureChannel:
    """A reliable, ordered, message-oriented channel to one authenticated peer."""

    def __init__(self, pipe: Pipe, session: Session) -> None:
        self._pipe = pipe
        self._session = session
        self.peer: PeerId = session.peer
        self.peer_name: str = session.peer_name
        self.transport: str = pipe.transport
        self.remote: tuple[str, int] = pipe.remote
        # how the pipe reached the peer (node/reach): "direct" | "hole-punched" | "relayed"
        self.path: str = getattr(pipe, "path", None) or "direct"
        self.relay: str | None = getattr(pipe, "relay", None)
        self.state = ChannelState.OPEN
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._send_frame = getattr(pipe, "send_frame", None)
        self._open_in_place = bool(getattr(pipe, "recv_buffers_owned", False))
        self._recv_nowait: Callable[[], bytes | None] | None = getattr(pipe, "recv_nowait",
                                                                       None)
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> bool:
        return self.state is ChannelState.CLOSED

    @property
    def transcript_hash(self) -> bytes:
        return self._session.transcript_hash

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"channel to {self.peer.short} over {self.transport} is closed")

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise self._closed_error()
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise ProtocolError(
                f"message of {len(data)} bytes exceeds the {MAX_PLAINTEXT_BYTES}-byte limit"
            )
        async with self._send_lock:  # sealing order must equal sending order
            try:
                size = len(data) + self._session.overhead_bytes
                if self._send_frame is not None and size >= IN_PLACE_MIN_BYTES:
                    seal_into = self._session.seal_into
                    await self._send_frame(size, lambda out, at: seal_into(data, out, at))
                else:
                    await self._pipe.send(self._session.seal(data))
            except P2PError:
                await self.close()
                raise

    async def send_many(self, messages: list[bytes]) -> None:
        """Send several small messages in order, sealed one by one, with one pipe write
        where the pipe can (``send_many``); else one ``send`` each."""
        if self.closed:
            raise self._closed_error()
        for data in messages:
            if len(data) > MAX_PLAINTEXT_BYTES:
                raise ProtocolError(
                    f"message of {len(data)} bytes exceeds the {MAX_PLAINTEXT_BYTES}-byte limit")
        send_many = getattr(self._pipe, "send_many", None)
        async with self._send_lock:  # sealing order must equal sending order
            try:
                if send_many is not None:
                    await send_many([self._session.seal(data) for data in messages])
                else:  # each sealed just before it goes: a cancel loses no sealed frame
                    for data in messages:
                        await self._pipe.send(self._session.seal(data))
            except P2PError:
                await self.close()
                raise

    async def recv(self) -> bytes:
        """The next message; ChannelClosed at the end, ProtocolError on a bad frame.

        Large messages may come back as a bytearray the caller owns (bytes-like:
        compares, slices and unpacks like bytes, but is not hashable).
        """
        if self.closed:
            raise self._closed_error()
        async with self._recv_lock:
            try:
                return self._open(await self._pipe.recv())
            except ProtocolError as exc:
                log.warning("channel with %s over %s killed: %s", self.peer.short,
                            self.transport, exc)
                await self.close()
                raise
            except ChannelClosed:
                await self.close()
                raise

    def _open(self, frame: bytes | bytearray) -> bytes:
        """One frame's plaintext: decrypted in place for a big frame the pipe handed over
        as its own bytearray, else into a new buffer. ProtocolError if it fails to
        authenticate."""
        if (self._open_in_place and type(frame) is bytearray
                and len(frame) >= IN_PLACE_MIN_BYTES):
            return self._session.open_in_place(frame)  # type: ignore[return-value]
        return self._session.open(frame)

    def recv_nowait(self) -> bytes | None:
        """The next message if the pipe already holds it, else None; never waits.

        For a consumer that is busy anyway (a transfer taking chunk after chunk): a
        message queued in the pipe is opened at once, with no task and no wake-up of
        its own. None also when a ``recv()`` is in progress (order is kept) or the pipe
        cannot tell; ``recv()`` is then the way. A bad frame raises ProtocolError and
        kills the channel exactly as in ``recv()``.
        """
        nowait = self._recv_nowait
        if nowait is None or self.closed or self._recv_lock.locked():
            return None
        frame = nowait()
        if frame is None:
            return None
        try:
            return self._open(frame)
        except ProtocolError as exc:
            log.warning("channel with %s over %s killed: %s", self.peer.short,
                        self.transport, exc)
            self._close_soon()
            raise

    def _close_soon(self) -> None:
        """close() from synchronous code: the state changes now, the pipe closes next."""
        if self.state is ChannelState.CLOSED:
            return
        self.state = ChannelState.CLOSED
        self._session.close()
        task = asyncio.get_running_loop().create_task(self._pipe.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self.state is ChannelState.CLOSED:
            return
        log.debug("channel with %s: open -> closed", self.peer.short)
        self.state = ChannelState.CLOSED
        self._session.close()
        await self._pipe.close()

    def __repr__(self) -> str:
        return (f"SecureChannel({self.peer.short}, {self.transport}, "
                f"{self.remote[0]}:{self.remote[1]}, {self.state.value})")


# ---------------------------------------------------------------------------
# handshake drivers


def _not_trusted_here(peer: PeerId) -> PeerNotTrusted:
    return PeerNotTrusted(f"peer {peer} is not trusted; run `node trust {peer}`")


def _clean_reason(raw: bytes) -> str:
    text = raw[:MAX_ABORT_REASON_BYTES].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


async def _send_verdict(pipe: Pipe, session: Session, me: Identity,
                        authorize: Authorize) -> None:
    """Run `authorize`; on refusal send an encrypted refusal, close, raise PeerNotTrusted."""
    peer = session.peer
    try:
        authorize(peer)
    except PeerNotTrusted as exc:
        log.warning("refused channel with untrusted peer %s (%s) at %s:%d: %s", peer,
                    session.peer_name or "no name", pipe.remote[0], pipe.remote[1], exc)
        try:
            await pipe.send(session.seal(VERDICT_REFUSED_PREFIX + REFUSAL_NOT_TRUSTED.encode()))
        except P2PError:
            pass  # the peer is gone already; our own refusal still stands
        raise _not_trusted_here(peer) from None
    await pipe.send(session.seal(VERDICT_OK))


async def _read_verdict(pipe: Pipe, session: Session, me: Identity) -> None:
    peer = session.peer
    try:
        verdict = session.open(await pipe.recv())
    except ChannelClosed:
        raise ChannelClosed(
            f"peer {peer.short} closed the connection during the handshake"
        ) from None
    if verdict == VERDICT_OK:
        return
    if verdict.startswith(VERDICT_REFUSED_PREFIX):
        reason = _clean_reason(verdict[len(VERDICT_REFUSED_PREFIX):])
        log.warning("peer %s refused our channel: %s", peer, reason)
        detail = "" if reason == REFUSAL_NOT_TRUSTED else f" ({reason})"
        raise PeerNotTrusted(
            f"peer {me.peer_id.short} (this node) is not trusted by peer {peer}{detail}; "
            f"ask its owner to run `node trust {me.peer_id}`"
        )
    raise ProtocolError(f"peer {peer.short} sent an unexpected first frame")


def _channel_binding(pipe: Pipe) -> bytes:
    """The pipe's TLS exporter value (QUIC), which binds the handshake to that connection
    and spares frames a second encryption; empty for tcp and udp."""
    return bytes(getattr(pipe, "channel_binding", b"") or b"")


async def _recv_handshake(pipe: Pipe) -> bytes:
    try:
        return await pipe.recv()
    except ChannelClosed:
        raise ChannelClosed(
            f"{pipe.remote[0]}:{pipe.remote[1]} closed the connection during the handshake"
        ) from None


def _handshake_timeout(pipe: Pipe, timeout_s: float) -> PeerUnreachable:
    return PeerUnreachable(f"handshake with {pipe.remote[0]}:{pipe.remote[1]} over "
                           f"{pipe.transport} timed out after {timeout_s:g} s")


def _end_preauth(pipe: Pipe) -> None:
    """Tell the transport the peer is authenticated and trusted: its pre-auth limits
    (handshake-sized frames, a half-open slot) end. Optional for a transport."""
    authenticated = getattr(pipe, "authenticated", None)
    if authenticated is not None:
        authenticated()


async def open_channel(pipe: Pipe, identity: Identity, *, expected_peer: PeerId | None,
                       authorize: Authorize,
                       timeout_s: float = HANDSHAKE_TIMEOUT_S) -> SecureChannel:
    """Run the initiator side over `pipe`; the pipe is closed on any failure."""
    hs = InitiatorHandshake(identity, expected_peer=expected_peer,
                            channel_binding=_channel_binding(pipe))
    try:
        async with asyncio.timeout(timeout_s):
            await pipe.send(hs.start())
            msg3, session = hs.receive(await _recv_handshake(pipe))
            await pipe.send(msg3)
            await _send_verdict(pipe, session, identity, authorize)
            await _read_verdict(pipe, session, identity)
    except TimeoutError:
        await pipe.close()
        raise _handshake_timeout(pipe, timeout_s) from None
    except BaseException:
        await pipe.close()
        raise
    log.info("channel to %s (%s) over %s established, frames: %s", session.peer.short,
             session.peer_name or "no name", pipe.transport, session.protection)
    return SecureChannel(pipe, session)


async def accept_channel(pipe: Pipe, identity: Identity, *, authorize: Authorize,
                         timeout_s: float = HANDSHAKE_TIMEOUT_S) -> SecureChannel:
    """Run the responder side over `pipe`; the pipe is closed on any failure."""
    hs = ResponderHandshake(identity, channel_binding=_channel_binding(pipe))
    try:
        async with asyncio.timeout(timeout_s):
            msg1 = await _recv_handshake(pipe)
            try:
                msg2 = hs.receive_hello(msg1)
            except ProtocolError as exc:
                try:  # tell an honest but incompatible initiator why (clear text, no secrets)
                    await pipe.send(ResponderHandshake.abort_message(str(exc)))
                except P2PError:
                    pass
                raise
            await pipe.send(msg2)
            session = hs.receive_finish(await _recv_handshake(pipe))
            await _read_verdict(pipe, session, identity)
            await _send_verdict(pipe, session, identity, authorize)
        _end_preauth(pipe)
    except TimeoutError:
        await pipe.close()
        raise _handshake_timeout(pipe, timeout_s) from None
    except BaseException:
        await pipe.close()
        raise
    log.info("channel from %s (%s) over %s accepted, frames: %s", session.peer.short,
             session.peer_name or "no name", pipe.transport, session.protection)
    return SecureChannel(pipe, session)

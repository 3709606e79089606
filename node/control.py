"""Local control API: a Unix socket in the home dir that the CLI talks to.

Protocol: length-prefixed msgpack frames (node.wire). The client sends one
request ``{"cmd": str, "args": {...}}``; the server answers with zero or more
``{"event": {...}}`` frames (progress, live notifications) and then exactly one
``{"ok": result}`` or ``{"error": {"type": ErrorClassName, "message": str, "lineage":
[ErrorClassName, ...its ancestors]}}``; the client raises the most specific class of the
lineage it knows, so the exit code is the one the daemon's error has.
The socket file is created with mode 0600 inside the home dir, so only the
node's user can drive it.

Imports wire and errors only; the daemon registers the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import (
    LocalIOError,
    NodeNotRunning,
    P2PError,
    ProtocolError,
    describe_os_error,
    error_class,
    error_lineage,
)
from node.wire import FRAME_HEADER, frame, packb, unpackb

log = logging.getLogger("p2pfs.control")

MAX_CONTROL_FRAME_BYTES = 4 * 1024 * 1024
# AF_UNIX paths are limited to ~107 bytes; deeper home dirs get a socket in the temp dir
MAX_SOCKET_PATH_LEN = 100
STOP_NOTICE_TIMEOUT_S = 0.2
NODE_STOPPING_MESSAGE = "the node stopped, so nothing more will come"

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


def socket_path_for(home: Path) -> Path:
    path = home.resolve() / "control.sock"
    if len(str(path)) <= MAX_SOCKET_PATH_LEN:
        return path
    digest = hashlib.blake2b(str(path).encode(), digest_size=10).hexdigest()
    return Path(tempfile.gettempdir()) / f"p2pfs-{digest}.sock"


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(FRAME_HEADER.size)
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_CONTROL_FRAME_BYTES:
        raise ProtocolError(f"control frame of {length} bytes is too large")
    return await reader.readexactly(length)


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    def commands(self) -> list[str]:
        """The names of the registered commands (the dashboard shows actions by them)."""
        return sorted(self._handlers)

    async def dispatch(self, cmd: str, args: dict[str, Any], emit: Emit) -> Any:
        """Run one command in-process, as a socket client would (the dashboard's way in).

        Raises P2PError only: an unknown command is a ProtocolError, an OSError of our
        own disk or socket a LocalIOError, any other failure of a handler is logged and
        becomes a one-line "internal error"."""
        handler = self._handlers.get(cmd)
        if handler is None:
            raise ProtocolError(f"unknown control command {cmd!r}")
        try:
            return await handler(args, emit)
        except (P2PError, asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # a handler's failure must not kill the daemon
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                # our own disk or socket: the user's to fix, not a bug
                log.warning("control command failed: %s", describe_os_error(exc))
                raise LocalIOError(describe_os_error(exc)) from None
            log.exception("control command failed")
            raise P2PError(f"internal error: {exc.__class__.__name__}: {exc}") from None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale socket: the daemon lock proved nobody owns it
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve_one(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the CLI went away (Ctrl-C): the work it started goes on
        except asyncio.CancelledError:
            # close(): the node is stopping. Tell the client (a `node events --follow`
            # waits here) and end quietly: a cancelled connection task is logged by
            # asyncio's stream callback as an ERROR with a traceback.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                writer.write(frame(packb(_error_reply(NodeNotRunning(NODE_STOPPING_MESSAGE)))))
                await asyncio.wait_for(writer.drain(), STOP_NOTICE_TIMEOUT_S)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(obj: dict[str, Any]) -> None:
            writer.write(frame(packb(obj)))
            await writer.drain()

        try:
            request = unpackb(await _read_frame(reader), max_bytes=MAX_CONTROL_FRAME_BYTES)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ProtocolError("control request must be {'cmd': str, 'args': {...}}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ProtocolError("control request args must be a map")

            async def emit(event: dict[str, Any]) -> None:
                await send({"event": event})

            result = await self.dispatch(request["cmd"], args, emit)
            await send({"ok": result})
        except P2PError as exc:
            await send(_error_reply(exc))


# -- typed replies ---------------------------------------------------------------------
def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"control reply field {key!r} must be a count")
    return value


@dataclass(frozen=True, slots=True)
class EventsPage:
    """The reply of `events` without --follow: what was sent, and what was left out."""

    last_id: int  # the id of the last notification sent (the --since of the next page)
    shown: int
    older: int  # stored notifications before the first one sent
    newer: int  # stored notifications after the last one sent (cut by the limit)

    @property
    def more(self) -> bool:
        return self.newer > 0

    def to_json(self) -> dict[str, Any]:
        return {"last_id": self.last_id, "shown": self.shown, "older": self.older,
                "newer": self.newer, "more": self.more, "next_since": self.last_id}

    @classmethod
    def from_json(cls, obj: object) -> EventsPage:
        if not isinstance(obj, dict):
            raise ProtocolError("events reply must be a map")
        return cls(_count(obj, "last_id"), _count(obj, "shown"), _count(obj, "older"),
                   _count(obj, "newer"))


@dataclass(frozen=True, slots=True)
class LogPage:
    """The reply of `log`: the newest `limit` matching rows, oldest first, and the total."""

    events: list[dict[str, Any]]
    total: int
    limit: int
    limit_max: int

    @property
    def more(self) -> bool:
        return self.total > len(self.events)

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "total": self.total, "more": self.more,
                "limit": self.limit, "limit_max": self.limit_max}

    @classmethod
    def from_json(cls, obj: object) -> LogPage:
        if isinstance(obj, list):  # a node of an older version: rows only
            return cls(obj, len(obj), len(obj), len(obj))
        if not isinstance(obj, dict) or not isinstance(obj.get("events"), list):
            raise ProtocolError("log reply must be a map with a list of events")
        rows = obj["events"]
        if not all(isinstance(r, dict) for r in rows):
            raise ProtocolError("log reply rows must be maps")
        return cls(rows, _count(obj, "total"), _count(obj, "limit"), _count(obj, "limit_max"))


def _error_reply(exc: P2PError) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc),
                      "lineage": error_lineage(exc)}}


class ControlClient:
    """One request per connection; used by the CLI."""

    def __init__(self, home: Path) -> None:
        self.path = socket_path_for(home)

    async def call(self, cmd: str, args: dict[str, Any] | None = None, *,
                   on_event: Callable[[dict[str, Any]], None] | None = None,
                   timeout_s: float | None = None) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.path), limit=MAX_CONTROL_FRAME_BYTES
            )
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeNotRunning() from None
        try:
            writer.write(frame(packb({"cmd": cmd, "args": args or {}})))
            await writer.drain()
            while True:
                try:
                    data = await asyncio.wait_for(_read_frame(reader), timeout_s)
                except asyncio.IncompleteReadError:
                    raise NodeNotRunning("the node stopped while answering") from None
                reply = unpackb(data, max_bytes=MAX_CONTROL_FRAME_BYTES)
                if not isinstance(reply, dict):
                    raise ProtocolError("malformed control reply")
                if "event" in reply:
                    if on_event is not None:
                        on_event(reply["event"])
                    continue
                if "error" in reply:
                    err = reply["error"]
                    lineage = err.get("lineage")
                    if not isinstance(lineage, list):
                        lineage = [err.get("type", "")]
                    raise error_class(lineage).from_message(
                        str(err.get("message", "unknown error")))
                return reply.get("ok")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

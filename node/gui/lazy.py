"""The dashboard as a running node holds it until someone uses it: its port and token.

The dashboard's server (node/gui/server.py, on aiohttp) adds ~14 MB to a node's memory,
and most nodes never have their dashboard opened. So the node binds the dashboard's
listening sockets at start (a busy port is still an error at `node start`, and the
address `node gui` prints works at once), makes the token, and loads the server only
when the first connection waits on one of those sockets: that connection and every
later one are then accepted by aiohttp itself from the same sockets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.errors import P2PError, bind_errors
from node.gui import Dispatch
from node.gui.token import dashboard_info, dashboard_url, load_or_create_token
from node.listen import listening_sockets

log = logging.getLogger("p2pfs.gui")


# connections that may wait for the dashboard's server to load (a page opens ~4 at once)
BACKLOG = 128


class LazyGui:
    """The dashboard on host:port; ``start()`` binds (PortUnavailable when it cannot) and
    the server loads at the first connection (``server`` is the GuiServer then)."""

    def __init__(self, dispatch: Dispatch, *, home: Path, host: str = "127.0.0.1",
                 port: int = 8474, commands: Callable[[], list[str]] | None = None) -> None:
        self.dispatch = dispatch
        self.home = home
        self.host = host
        self.port = port
        self._commands = commands
        self.token = load_or_create_token(home)
        self.server: Any = None
        self._sockets: list[socket.socket] = []
        self._loading: asyncio.Task[None] | None = None
        self._watching = False

    async def start(self) -> int:
        with bind_errors("gui", self.host, self.port):
            self._sockets = listening_sockets(self.host, self.port, BACKLOG)
        self.port = self._sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._first_connection)
        self._watching = True
        log.info("dashboard on %s (run `node gui` for the address with its token)",
                 dashboard_url(self.host, self.port))
        return self.port

    def _unwatch(self) -> None:
        if self._watching:
            loop = asyncio.get_running_loop()
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())
            self._watching = False

    def _first_connection(self) -> None:
        self._unwatch()
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        from node.gui.server import GuiServer

        server = GuiServer(self.dispatch, home=self.home, host=self.host, port=self.port,
                           commands=self._commands, token=self.token)
        try:
            await server.start(self._sockets)
        except (OSError, P2PError) as exc:  # bound already: nothing a user did
            log.error("the dashboard could not start: %s", exc)
            self._close_sockets()
            return
        self.server = server
        log.debug("dashboard server loaded at its first connection")

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()

    def info(self) -> dict[str, Any]:
        """What `node gui` prints."""
        return dashboard_info(self.home, self.host, self.port, self.token)

    async def stop(self) -> None:
        self._unwatch()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()  # closes the sockets it served
        self._close_sockets()

"""Listening TCP sockets bound the way the servers here want them (bootstrap server,
dashboard): one per address family, SO_REUSEADDR, IPv6-only v6 sockets, non-blocking.
Imports nothing of the project."""

from __future__ import annotations

import socket
from typing import Any


def listening_sockets(host: str, port: int, backlog: int, reuse_port: bool = False
                      ) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for host:port, one per address family
    ("" = every address of each); with port 0 every family gets the port the first one
    got. IPv6 sockets are IPv6-only (the IPv4 one takes IPv4)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets[:-1]:  # one port for all families
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets

"""Dial order per peer: its direct addresses, then a punched udp path, then its relays.

A contact record lists the peer's hosts (LAN and advertised public addresses,
in the order the peer wrote them) and, when it sits behind a NAT, the relays
it holds reservations at. ``dial`` tries every host on the chosen transport
(with ``DIRECT_TIMEOUT_S`` when a relay is there to fall back on, else the
caller's whole timeout), then the udp endpoint a hole punch opened to this peer
(``punched``, node/reach/puncher.py: whatever transport was asked for, the
punched path is udp), then every relay over TCP: splicing TCP streams works
for any NAT, and the channel over a relay is always a tcp channel. The pipe
returned carries ``path`` (``direct``, ``hole-punched`` or ``relayed``), read
by the channel. A relayed dial is where a punch starts (peering, in the
background), so the next dial finds the punched path. A direct endpoint that
just failed is skipped for ``FAILED_ENDPOINT_TTL_S`` while a relay stands
behind it (``FailedEndpoints``): a NAT that drops SYNs costs its timeout once,
not on every dial.

Imports transports, contact and the relay client; nothing of channels or peering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from node.contact import ContactRecord
from node.errors import P2PError, PeerUnreachable
from node.reach import PATH_DIRECT
from node.reach.relay_client import dial_via_relay
from node.transports import TRANSPORT_NAMES, get_transport
from node.transports.base import Pipe

log = logging.getLogger("p2pfs.reach")

# a direct attempt that has a relay behind it gives up sooner than a lone one
DIRECT_TIMEOUT_S = 2.0
FAILED_ENDPOINT_TTL_S = 60.0
MAX_FAILED_ENDPOINTS = 1024


class FailedEndpoints:
    """(transport, host, port) that failed a direct dial lately; bounded, oldest dropped."""

    def __init__(self, *, ttl_s: float = FAILED_ENDPOINT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._at: dict[tuple[str, str, int], float] = {}

    def add(self, transport: str, host: str, port: int) -> None:
        key = (transport, host, port)
        self._at.pop(key, None)
        self._at[key] = self._clock()
        while len(self._at) > MAX_FAILED_ENDPOINTS:
            del self._at[next(iter(self._at))]

    def recent(self, transport: str, host: str, port: int) -> bool:
        at = self._at.get((transport, host, port))
        if at is None:
            return False
        if self._clock() - at > self.ttl_s:
            del self._at[(transport, host, port)]
            return False
        return True

    def clear(self, transport: str, host: str, port: int) -> None:
        self._at.pop((transport, host, port), None)


async def dial(record: ContactRecord, transport: str, *, timeout_s: float,
               direct_timeout_s: float = DIRECT_TIMEOUT_S,
               punched: Callable[[], Awaitable[Pipe | None]] | None = None,
               failed: FailedEndpoints | None = None) -> Pipe:
    """A pipe to the peer of `record`, by the first path that works."""
    peer = record.peer_id
    port = record.ports.get(transport)
    relays = list(record.relays)
    if port is None and not relays:
        offered = ", ".join(t for t in TRANSPORT_NAMES if t in record.ports) or "none"
        raise PeerUnreachable(f"peer {peer.short} does not offer transport {transport!r} "
                              f"(it offers: {offered})")
    failures: list[str] = []
    if port is not None:
        per_try = min(timeout_s, direct_timeout_s) if relays else timeout_s
        # the record's local hosts, then where it was observed from outside
        for host, port in record.endpoints(transport):
            if relays and failed is not None and failed.recent(transport, host, port):
                failures.append(f"{transport} {host}:{port}: failed lately, skipped")
                continue
            try:
                pipe = await get_transport(transport).connect(host, port, timeout=per_try)
            except (P2PError, OSError) as exc:
                failures.append(f"{transport} {host}:{port}: {exc}")
                log.debug("direct dial of %s failed: %s", peer.short, exc)
                if failed is not None:
                    failed.add(transport, host, port)
                continue
            if failed is not None:
                failed.clear(transport, host, port)
            if getattr(pipe, "path", None) is None:
                pipe.path = PATH_DIRECT  # type: ignore[attr-defined]
            return pipe
    if punched is not None and relays:
        punched_pipe = await punched()
        if punched_pipe is not None:
            log.info("reached %s over its hole-punched udp path", peer.short)
            return punched_pipe
    for relay in relays:
        try:
            pipe = await dial_via_relay(relay, peer, timeout_s=timeout_s)
        except (P2PError, OSError) as exc:
            failures.append(f"relay {relay}: {exc}")
            log.debug("relayed dial of %s via %s failed: %s", peer.short, relay, exc)
            continue
        log.info("reached %s through relay %s", peer.short, relay)
        return pipe
    if len(failures) == 1:
        raise PeerUnreachable(failures[0].split(": ", 1)[1])
    raise PeerUnreachable(f"peer {peer.short} is unreachable: " + "; ".join(failures))

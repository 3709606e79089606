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
background), so the next dial finds the punched path.

Imports transports, contact and the relay client; nothing of channels or peering.
"""

from __future__ import annotations

import logging
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


async def dial(record: ContactRecord, transport: str, *, timeout_s: float,
               direct_timeout_s: float = DIRECT_TIMEOUT_S,
               punched: Callable[[], Awaitable[Pipe | None]] | None = None) -> Pipe:
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
            try:
                pipe = await get_transport(transport).connect(host, port, timeout=per_try)
            except (P2PError, OSError) as exc:
                failures.append(f"{transport} {host}:{port}: {exc}")
                log.debug("direct dial of %s failed: %s", peer.short, exc)
                continue
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

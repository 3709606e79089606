"""This node's own signed contact record, re-signed when what it advertises changes.

``LocalRecord`` owns the seq counter (milliseconds since the epoch, so always
higher than any record of an earlier run), the hosts (node/discovery/addresses.py
picks them; never a wildcard) and the observed addresses. ``refresh()`` signs a
new record when hosts or observed addresses changed and tells the listeners
(the DHT republishes, the bootstrap loops re-register). Pure apart from the
injected clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node.contact import ContactRecord
from node.discovery.observed import ObservedAddresses
from node.identity import Identity

log = logging.getLogger("p2pfs.discovery")

RECORD_TTL_S = 3600
# re-sign when less than this fraction of the TTL is left
RESIGN_FRACTION = 0.5
REFRESH_CHECK_S = 60.0


class LocalRecord:
    def __init__(self, identity: Identity, *, hosts: Callable[[], list[str]],
                 ports: dict[str, int], observed: ObservedAddresses | None = None,
                 ttl_s: int = RECORD_TTL_S, clock: Callable[[], float] = time.time,
                 relays: list[str] | tuple[str, ...] = ()) -> None:
        self.identity = identity
        self._hosts = hosts
        self.ports = dict(ports)
        self.observed = observed if observed is not None else ObservedAddresses()
        self.ttl_s = ttl_s
        self.relays = tuple(relays)  # relays we hold reservations at (node/reach)
        self._clock = clock
        self._seq = 0
        self._listeners: list[Callable[[ContactRecord], None]] = []
        self.current = self._sign(self._hosts())

    def on_change(self, listener: Callable[[ContactRecord], None]) -> None:
        self._listeners.append(listener)

    def _sign(self, hosts: list[str]) -> ContactRecord:
        now = self._clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        observed = self.observed.advertised(hosts, self.ports, now)
        return ContactRecord.create(self.identity, hosts, self.ports, self._seq, now=now,
                                    ttl_s=self.ttl_s, observed=observed, relays=self.relays)

    def refresh(self) -> bool:
        """Re-sign when the hosts or the observed addresses changed, or half the TTL is
        gone; True if it did (and the listeners were told)."""
        hosts = self._hosts()
        now = self._clock()
        observed = tuple(self.observed.advertised(hosts, self.ports, now))
        ageing = self.current.expires - now < self.ttl_s * RESIGN_FRACTION
        if (tuple(hosts) == self.current.hosts and observed == self.current.observed
                and not ageing):
            return False
        self.current = self._sign(hosts)
        log.info("contact record re-signed (seq %d): hosts %s, observed %s", self.current.seq,
                 ", ".join(self.current.hosts),
                 ", ".join(f"{s} {h}:{p}" for s, h, p in self.current.observed) or "none")
        for listener in self._listeners:
            listener(self.current)
        return True

"""Observed addresses: where this node is seen from outside, per service.

Reports come from the bootstrap server (the source address of our HTTP
registration: the public host, the port of that one TCP connection) and from
DHT peers (the ``stun`` RPC: the host *and* port a NAT maps for the DHT's UDP
socket). What a record advertises, per service:

* ``dht``: the DHT stun mapping as seen, exact for that socket;
* ``udp``/``quic``: the same public host with our own local port; only a hint,
  a NAT maps each UDP socket separately (see docs/protocols/discovery.md);
* ``tcp``: the bootstrap server's host with our own local port; right only when
  the NAT forwards that port.

A single DHT peer could lie, so a DHT answer counts only once a second peer
(another IP) agrees; the configured bootstrap server is believed alone. An
observation that equals a local address adds nothing and is left out. Pure:
``now`` is passed in.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from node.contact import Observed

OBSERVED_TTL_S = 30 * 60.0
MAX_REPORTERS = 16
DHT_AGREEING_REPORTERS = 2


@dataclass(frozen=True, slots=True)
class Observation:
    via: str  # "bootstrap" or "dht"
    reporter: str  # the bootstrap URL, or the DHT peer's IP
    host: str
    port: int
    seen_at: float

    def to_json(self) -> dict[str, object]:
        return {"via": self.via, "reporter": self.reporter, "host": self.host,
                "port": self.port, "seen_at": self.seen_at}


class ObservedAddresses:
    def __init__(self, *, ttl_s: float = OBSERVED_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._reports: dict[tuple[str, str], Observation] = {}

    def report(self, via: str, reporter: str, host: str, port: int, now: float) -> None:
        """Remember one answer; a reporter's newer answer replaces its older one."""
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            return
        if not 0 < port <= 65535:
            return
        key = (via, reporter)
        if key not in self._reports and len(self._reports) >= MAX_REPORTERS:
            self.expire(now)
            if len(self._reports) >= MAX_REPORTERS:
                oldest = min(self._reports, key=lambda k: self._reports[k].seen_at)
                del self._reports[oldest]
        self._reports[key] = Observation(via, reporter, host, port, now)

    def expire(self, now: float) -> None:
        for key, obs in list(self._reports.items()):
            if now - obs.seen_at > self.ttl_s:
                del self._reports[key]

    def observations(self, now: float) -> list[Observation]:
        self.expire(now)
        return sorted(self._reports.values(), key=lambda o: (o.via, o.reporter))

    def _dht_mapping(self, now: float) -> tuple[str, int] | None:
        votes: dict[tuple[str, int], int] = {}
        for obs in self.observations(now):
            if obs.via == "dht":
                votes[(obs.host, obs.port)] = votes.get((obs.host, obs.port), 0) + 1
        agreed = [(n, addr) for addr, n in votes.items() if n >= DHT_AGREEING_REPORTERS]
        return max(agreed)[1] if agreed else None

    def _bootstrap_host(self, now: float) -> str | None:
        latest = [o for o in self.observations(now) if o.via == "bootstrap"]
        return max(latest, key=lambda o: o.seen_at).host if latest else None

    def advertised(self, local_hosts: list[str] | tuple[str, ...], ports: dict[str, int],
                   now: float) -> list[Observed]:
        """The record's ``observed`` entries: (service, host, port), one per service,
        leaving out what equals a local address."""
        out: dict[str, tuple[str, int]] = {}
        mapping = self._dht_mapping(now)
        public = self._bootstrap_host(now)
        if mapping is not None and ports.get("dht"):
            out["dht"] = mapping
            for service in ("udp", "quic"):
                if ports.get(service):
                    out[service] = (mapping[0], ports[service])
        host = public or (mapping[0] if mapping else None)
        if host is not None and ports.get("tcp"):
            out["tcp"] = (host, ports["tcp"])
        return sorted((s, h, p) for s, (h, p) in out.items()
                      if not (h in local_hosts and p == ports.get(s)))

"""Signed contact records: where a peer can be reached, signed by that peer.

A record says: this public key (peer id) is reachable at these host(s), on these
ports per service (``tcp``, ``udp``, ``quic``, ``dht``), as of sequence number
``seq``, until ``expires``. The signature is Ed25519 over the canonical msgpack
list ``[DOMAIN, key, name, hosts, ports-as-sorted-pairs, seq, timestamp, expires]``,
so a record cannot be forged, altered or re-attributed, and a higher ``seq``
always wins (replays of old records are recognisable).

Optional fields travel in one trailing map (the 9th wire element, signed as a
9th list element too), present only when one is set, so a record without them
encodes and signs exactly as before:

* ``observed``: ``[[service, host, port], ...]``, where this node was seen from
  outside (node/discovery/observed.py), at most one entry per service.
* ``relays``: at most ``MAX_RELAYS`` ``HOST:PORT`` strings of relays this peer
  holds a reservation at (bootstrap/relay.py; the dialer tries them after the
  direct addresses).

Both the bootstrap server (JSON) and the DHT (msgpack) carry records; this
module is pure and imports only identity, wire and errors.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

from node.errors import IdentityError, ProtocolError
from node.identity import Identity, PeerId, validate_name
from node.wire import packb, unpackb

DOMAIN = "p2pfs-contact-v1"
MAX_HOSTS = 8
MAX_HOST_LEN = 253
SERVICES = ("tcp", "udp", "quic", "dht")
DEFAULT_RECORD_TTL_S = 3600
MAX_RECORD_TTL_S = 7 * 24 * 3600
MAX_RECORD_BYTES = 2048
# clocks differ; a record "from the future" by more than this is refused
MAX_CLOCK_SKEW_S = 300
EXT_OBSERVED = "observed"
EXT_RELAYS = "relays"
EXTENSION_KEYS = (EXT_OBSERVED, EXT_RELAYS)
MAX_RELAYS = 4
MAX_RELAY_ADDR_LEN = 80
MAX_OBSERVED = len(SERVICES)

# (service, host, port): where a service of this node was seen from outside
Observed = tuple[str, str, int]


@dataclass(frozen=True)
class ContactRecord:
    peer_id: PeerId
    name: str
    hosts: tuple[str, ...]
    ports: dict[str, int]
    seq: int
    timestamp: int
    expires: int
    signature: bytes
    observed: tuple[Observed, ...] = ()
    relays: tuple[str, ...] = ()

    # -- construction -----------------------------------------------------
    @classmethod
    def create(cls, identity: Identity, hosts: list[str] | tuple[str, ...],
               ports: dict[str, int], seq: int, *, now: float | None = None,
               ttl_s: int = DEFAULT_RECORD_TTL_S,
               observed: list[Observed] | tuple[Observed, ...] = (),
               relays: list[str] | tuple[str, ...] = ()) -> ContactRecord:
        now_i = int(time.time() if now is None else now)
        hosts_t = tuple(hosts)
        ports_d = {k: int(v) for k, v in ports.items() if v}
        observed_t = tuple(sorted((s, h, int(p)) for s, h, p in observed))
        _check_fields(identity.name, hosts_t, ports_d, seq, now_i, now_i + ttl_s)
        relays_t = tuple(relays)
        _check_observed(observed_t)
        _check_relays(relays_t)
        unsigned = cls(identity.peer_id, identity.name, hosts_t, ports_d, seq, now_i,
                       now_i + ttl_s, b"", observed_t, relays_t)
        return cls(identity.peer_id, identity.name, hosts_t, ports_d, seq, now_i,
                   now_i + ttl_s, identity.sign(unsigned.signed_bytes()), observed_t, relays_t)

    def extensions(self) -> dict[str, Any]:
        ext: dict[str, Any] = {}
        if self.observed:
            ext[EXT_OBSERVED] = [list(o) for o in self.observed]
        if self.relays:
            ext[EXT_RELAYS] = list(self.relays)
        return ext

    def signed_bytes(self) -> bytes:
        fields: list[Any] = [DOMAIN, self.peer_id.key, self.name, list(self.hosts),
                             sorted(self.ports.items()), self.seq, self.timestamp, self.expires]
        ext = self.extensions()
        if ext:
            fields.append(ext)
        return packb(fields)

    # -- checks -----------------------------------------------------------
    def verify(self, now: float | None = None) -> ContactRecord:
        """Raise ProtocolError unless the signature is valid and the record is current."""
        now_i = int(time.time() if now is None else now)
        if not self.peer_id.verify(self.signed_bytes(), self.signature):
            raise ProtocolError(f"contact record for {self.peer_id.short} has a bad signature")
        if self.timestamp > now_i + MAX_CLOCK_SKEW_S:
            raise ProtocolError("contact record is dated in the future")
        if self.expires <= now_i:
            raise ProtocolError(f"contact record for {self.peer_id.short} has expired")
        return self

    def is_expired(self, now: float | None = None) -> bool:
        return self.expires <= int(time.time() if now is None else now)

    def endpoint(self, service: str) -> tuple[str, int] | None:
        port = self.ports.get(service)
        return (self.hosts[0], port) if port and self.hosts else None

    def endpoints(self, service: str) -> list[tuple[str, int]]:
        """Every advertised address of a service: the local hosts first, then where it
        was observed from outside (a hint: see docs/protocols/discovery.md)."""
        port = self.ports.get(service)
        if not port:
            return []
        out = [(h, port) for h in self.hosts]
        out += [(h, p) for s, h, p in self.observed if s == service and (h, p) not in out]
        return out

    # -- codecs -----------------------------------------------------------
    def to_wire(self) -> list[Any]:
        wire: list[Any] = [self.peer_id.key, self.name, list(self.hosts),
                           sorted(self.ports.items()), self.seq, self.timestamp, self.expires,
                           self.signature]
        ext = self.extensions()
        if ext:
            wire.append(ext)
        return wire

    def encode(self) -> bytes:
        return packb(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> ContactRecord:
        if not isinstance(obj, list) or len(obj) not in (8, 9):
            raise ProtocolError("contact record: expected a list of 8 or 9 fields")
        key, name, hosts, ports, seq, ts, expires, sig = obj[:8]
        observed, relays = _parse_extensions(obj[8]) if len(obj) == 9 else ((), ())
        if not isinstance(key, bytes) or len(key) != 32:
            raise ProtocolError("contact record: bad public key")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise ProtocolError("contact record: bad signature field")
        if not isinstance(hosts, list) or not isinstance(ports, list):
            raise ProtocolError("contact record: hosts and ports must be lists")
        ports_d: dict[str, int] = {}
        for item in ports[: len(SERVICES) + 1]:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not isinstance(item[0], str) or type(item[1]) is not int):
                raise ProtocolError("contact record: bad port entry")
            ports_d[item[0]] = item[1]
        if len(ports) > len(SERVICES):
            raise ProtocolError("contact record: too many ports")
        for v in (seq, ts, expires):
            if type(v) is not int:
                raise ProtocolError("contact record: seq/timestamp/expires must be integers")
        if not isinstance(name, str) or not all(isinstance(h, str) for h in hosts):
            raise ProtocolError("contact record: name and hosts must be text")
        _check_fields(name, tuple(hosts), ports_d, seq, ts, expires)
        return cls(PeerId(key), name, tuple(hosts), ports_d, seq, ts, expires, sig, observed,
                   relays)

    @classmethod
    def decode(cls, data: bytes) -> ContactRecord:
        return cls.from_wire(unpackb(data, max_bytes=MAX_RECORD_BYTES))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peer_id": str(self.peer_id),
            "name": self.name,
            "hosts": list(self.hosts),
            "ports": dict(sorted(self.ports.items())),
            "seq": self.seq,
            "timestamp": self.timestamp,
            "expires": self.expires,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        out.update(self.extensions())
        return out

    @classmethod
    def from_json(cls, obj: Any) -> ContactRecord:
        if not isinstance(obj, dict):
            raise ProtocolError("contact record must be a JSON object")
        try:
            peer_id = PeerId.parse(obj["peer_id"])
            sig = base64.b64decode(obj["signature"], validate=True)
            ports = obj["ports"]
            if not isinstance(ports, dict):
                raise ProtocolError("contact record: ports must be an object")
            wire = [peer_id.key, obj["name"], obj["hosts"], sorted(ports.items()),
                    obj["seq"], obj["timestamp"], obj["expires"], sig]
            wire += json_extensions(obj)
        except KeyError as exc:
            raise ProtocolError(f"contact record: missing field {exc}") from None
        except (ValueError, TypeError, AttributeError, IdentityError) as exc:
            raise ProtocolError(f"contact record: {exc}") from None
        return cls.from_wire(wire)


def _check_fields(name: str, hosts: tuple[str, ...], ports: dict[str, int], seq: int,
                  ts: int, expires: int) -> None:
    try:
        validate_name(name)
    except IdentityError as exc:
        raise ProtocolError(f"contact record: {exc}") from None
    if not 1 <= len(hosts) <= MAX_HOSTS or any(not 0 < len(h) <= MAX_HOST_LEN for h in hosts):
        raise ProtocolError(f"contact record: 1-{MAX_HOSTS} hosts of at most {MAX_HOST_LEN} chars")
    for service, port in ports.items():
        if service not in SERVICES or not 0 < port <= 65535:
            raise ProtocolError(f"contact record: bad port {service}={port}")
    if not 0 <= seq < 2**63 or not 0 <= ts < 2**40:
        raise ProtocolError("contact record: seq/timestamp out of range")
    if not ts < expires <= ts + MAX_RECORD_TTL_S:
        raise ProtocolError("contact record: expiry out of range")


def json_extensions(obj: dict[str, Any]) -> list[Any]:
    """The optional fields of a JSON record, as the 9th wire element (or nothing)."""
    ext = {k: obj[k] for k in EXTENSION_KEYS if k in obj}
    return [ext] if ext else []


def _parse_extensions(ext: Any) -> tuple[tuple[Observed, ...], tuple[str, ...]]:
    """(observed, relays) of the extension map; an empty map, an empty entry or an
    unknown key is refused, so a record has one encoding (signatures are over it)."""
    if not isinstance(ext, dict) or not ext or any(k not in EXTENSION_KEYS for k in ext):
        raise ProtocolError(f"contact record: the optional fields are a map of "
                            f"{', '.join(EXTENSION_KEYS)}")
    observed: tuple[Observed, ...] = ()
    if EXT_OBSERVED in ext:
        observed = _parse_observed(ext[EXT_OBSERVED])
    relays: tuple[str, ...] = ()
    if EXT_RELAYS in ext:
        raw_relays = ext[EXT_RELAYS]
        if not isinstance(raw_relays, list) or not raw_relays:
            raise ProtocolError("contact record: relays must be a non-empty list")
        relays = tuple(raw_relays)
        _check_relays(relays)
    return observed, relays


def _parse_observed(raw: Any) -> tuple[Observed, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_OBSERVED:
        raise ProtocolError(f"contact record: observed is a list of 1-{MAX_OBSERVED} entries")
    out = []
    for item in raw:
        if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str)
                or not isinstance(item[1], str) or type(item[2]) is not int):
            raise ProtocolError("contact record: an observed entry is [service, host, port]")
        out.append((item[0], item[1], item[2]))
    observed = tuple(out)
    if list(observed) != sorted(observed):
        raise ProtocolError("contact record: observed entries must be sorted")
    _check_observed(observed)
    return observed


def _check_relays(relays: tuple[str, ...]) -> None:
    if len(relays) > MAX_RELAYS or any(
            not isinstance(r, str) or not 0 < len(r) <= MAX_RELAY_ADDR_LEN or ":" not in r
            or any(c.isspace() for c in r) for r in relays):
        raise ProtocolError(f"contact record: at most {MAX_RELAYS} relays, each HOST:PORT "
                            f"of at most {MAX_RELAY_ADDR_LEN} chars")


def _check_observed(observed: tuple[Observed, ...]) -> None:
    if len(observed) > MAX_OBSERVED:
        raise ProtocolError(f"contact record: at most {MAX_OBSERVED} observed addresses")
    services = [s for s, _h, _p in observed]
    if len(set(services)) != len(services):
        raise ProtocolError("contact record: one observed address per service")
    for service, host, port in observed:
        if service not in SERVICES or not 0 < port <= 65535:
            raise ProtocolError(f"contact record: bad observed port {service}={port}")
        if not 0 < len(host) <= MAX_HOST_LEN:
            raise ProtocolError("contact record: bad observed host")

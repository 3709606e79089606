"""Version vectors: one counter per device, as in Syncthing's BEP (lib/protocol/vector.go).

A ``Vector`` is an immutable, sorted tuple of ``(device, counter)`` pairs with
no zero counters. A device is named by ``device_key(peer)``: the first 8 bytes
of its public key in hex, short and stable (the full key is in every signed
event anyway). A local change bumps our counter to ``max(ours + 1, clock)``
where ``clock`` is the highest counter this device ever issued, so a counter
never goes back even after we adopted someone else's vector.

Pure: imports only the standard library and node.identity.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from node.identity import PeerId

DEVICE_KEY_BYTES = 8
DEVICE_KEY_LEN = 2 * DEVICE_KEY_BYTES
MAX_VECTOR_DEVICES = 256
MAX_COUNTER = 2**63 - 1


def device_key(peer: PeerId) -> str:
    """The short stable form of a PeerId used in version vectors and conflict names."""
    return peer.key[:DEVICE_KEY_BYTES].hex()


class Ordering(enum.Enum):
    EQUAL = "equal"
    GREATER = "greater"  # the left side dominates
    LESSER = "lesser"  # the right side dominates
    CONCURRENT = "concurrent"


class VectorError(ValueError):
    """A vector that breaks the rules (bad device key, counter, duplicate, too long)."""


@dataclass(frozen=True, slots=True)
class Vector:
    counters: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, int]]) -> Vector:
        """A validated vector from (device, counter) pairs (zero counters dropped)."""
        out: dict[str, int] = {}
        for dev, n in pairs:
            if not isinstance(dev, str) or len(dev) != DEVICE_KEY_LEN or not _is_hex(dev):
                raise VectorError(f"vector: bad device key {str(dev)[:20]!r}")
            if type(n) is not int or not 0 <= n <= MAX_COUNTER:
                raise VectorError("vector: counter out of range")
            if dev in out:
                raise VectorError("vector: a device appears twice")
            if n:
                out[dev] = n
        if len(out) > MAX_VECTOR_DEVICES:
            raise VectorError(f"vector: more than {MAX_VECTOR_DEVICES} devices")
        return cls(tuple(sorted(out.items())))

    def get(self, device: str) -> int:
        for dev, n in self.counters:
            if dev == device:
                return n
        return 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)

    def bump(self, device: str, clock: int = 0) -> Vector:
        """Our counter raised past both its current value and `clock`."""
        d = self.as_dict()
        d[device] = max(d.get(device, 0) + 1, clock + 1)
        return Vector(tuple(sorted(d.items())))

    def merge(self, other: Vector) -> Vector:
        d = self.as_dict()
        for dev, n in other.counters:
            if n > d.get(dev, 0):
                d[dev] = n
        return Vector(tuple(sorted(d.items())))

    def compare(self, other: Vector) -> Ordering:
        if self.counters == other.counters:
            return Ordering.EQUAL  # the common case (every device holds the same version)
        mine, theirs = self.as_dict(), other.as_dict()
        greater = lesser = False
        for dev in mine.keys() | theirs.keys():
            a, b = mine.get(dev, 0), theirs.get(dev, 0)
            if a > b:
                greater = True
            elif a < b:
                lesser = True
        if greater and lesser:
            return Ordering.CONCURRENT
        if greater:
            return Ordering.GREATER
        if lesser:
            return Ordering.LESSER
        return Ordering.EQUAL

    def dominates(self, other: Vector) -> bool:
        """Strictly newer than `other` (every counter >=, one >)."""
        return self.compare(other) is Ordering.GREATER

    def concurrent(self, other: Vector) -> bool:
        return self.compare(other) is Ordering.CONCURRENT

    def max_counter(self) -> int:
        return max((n for _d, n in self.counters), default=0)

    def to_wire(self) -> list[list[object]]:
        return [[dev, n] for dev, n in self.counters]

    @classmethod
    def from_wire(cls, obj: object) -> Vector:
        if not isinstance(obj, list) or len(obj) > MAX_VECTOR_DEVICES:
            raise VectorError("vector: expected a list of at most "
                              f"{MAX_VECTOR_DEVICES} pairs")
        pairs = []
        for item in obj:
            if not isinstance(item, list) or len(item) != 2:
                raise VectorError("vector: each entry is [device, counter]")
            pairs.append((item[0], item[1]))
        return cls.of(pairs)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{dev[:6]}:{n}" for dev, n in self.counters) + "}"


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)

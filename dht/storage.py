"""Bounded, validating record storage for the DHT (a ``kademlia.storage.IStorage``).

Replaces kademlia's ``ForgetfulStorage``, an unbounded dict that accepts any
value from anyone. Here:

* every value is validated by ``dht.records.record_for_key`` before it is kept:
  bytes only, at most ``MAX_VALUE_BYTES``, a signed contact record whose signer's
  DHT id is the key, not expired (fixes store poisoning: a stored list made every
  later ``get()`` raise ``TypeError: unhashable type``);
* a record never replaces one with a higher ``seq`` (replays of old records lose);
* storage is bounded by key count, total bytes and keys per sender host
  (a flood of spoofed stores cannot grow memory);
* ``closest_keys`` finds the keys nearest a node id in O(log n + limit) from a
  sorted key list, so welcoming a new node does not scan every key.

Expired records are dropped on read and culled (rate-limited) when storage is full.
Pure apart from the clock (``now`` can be passed in). Must not import asyncio or sockets.
"""

from __future__ import annotations

import bisect
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kademlia.storage import IStorage

from dht.records import record_for_key
from node.contact import ContactRecord

MAX_STORED_KEYS = 65536
MAX_STORED_BYTES = 32 * 1024 * 1024
MAX_KEYS_PER_SENDER = 1024
CULL_INTERVAL_S = 1.0
LOCAL_SENDER = "self"


class StoreOutcome(enum.Enum):
    STORED = "stored"  # new key, or a higher seq replaced the old record
    UNCHANGED = "unchanged"  # same seq already stored
    STALE = "stale"  # a higher seq is already stored
    FULL = "full"  # a bound (count, bytes, per sender) refused it


@dataclass
class _Entry:
    value: bytes
    record: ContactRecord
    stored_at: float  # monotonic
    sender: str


class RecordStorage(IStorage):  # type: ignore[misc]
    def __init__(self, *, max_keys: int = MAX_STORED_KEYS, max_bytes: int = MAX_STORED_BYTES,
                 max_keys_per_sender: int = MAX_KEYS_PER_SENDER) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.max_keys_per_sender = max_keys_per_sender
        self._data: dict[bytes, _Entry] = {}
        self._sorted_keys: list[bytes] = []
        self._per_sender: dict[str, int] = {}
        self._bytes = 0
        self._last_cull = float("-inf")

    # -- writing ------------------------------------------------------------
    def put(self, key: bytes, value: object, *, sender: str = LOCAL_SENDER,
            now: float | None = None) -> StoreOutcome:
        """Validate and keep `value`; ProtocolError when it is not a valid record for `key`."""
        now_wall = time.time() if now is None else now
        record = record_for_key(key, value, now=now_wall)
        assert isinstance(value, bytes)
        old = self._data.get(key)
        if old is not None and not old.record.is_expired(now_wall):
            if record.seq < old.record.seq:
                return StoreOutcome.STALE
            if record.seq == old.record.seq:
                return StoreOutcome.UNCHANGED
        if old is None and len(self._data) >= self.max_keys:
            self._cull(now_wall, force=False)
        # account the new entry as if the old one were gone
        old_bytes = len(old.value) if old else 0
        sender_count = self._per_sender.get(sender, 0)
        if old is not None and old.sender == sender:
            sender_count -= 1
        if ((old is None and len(self._data) >= self.max_keys)
                or self._bytes - old_bytes + len(value) > self.max_bytes
                or sender_count >= self.max_keys_per_sender):
            return StoreOutcome.FULL
        if old is not None:
            self._remove(key)
        self._data[key] = _Entry(value, record, time.monotonic(), sender)
        bisect.insort(self._sorted_keys, key)
        self._per_sender[sender] = self._per_sender.get(sender, 0) + 1
        self._bytes += len(value)
        return StoreOutcome.STORED

    def __setitem__(self, key: bytes, value: bytes) -> None:
        # kademlia's own code paths store locally through this; same checks apply
        self.put(key, value)

    def _remove(self, key: bytes) -> None:
        entry = self._data.pop(key)
        i = bisect.bisect_left(self._sorted_keys, key)
        if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
            del self._sorted_keys[i]
        left = self._per_sender[entry.sender] - 1
        if left:
            self._per_sender[entry.sender] = left
        else:
            del self._per_sender[entry.sender]
        self._bytes -= len(entry.value)

    def _cull(self, now_wall: float, *, force: bool = True) -> int:
        # an O(n) scan, so at most once per CULL_INTERVAL_S unless forced
        mono = time.monotonic()
        if not force and mono - self._last_cull < CULL_INTERVAL_S:
            return 0
        self._last_cull = mono
        dead = [k for k, e in self._data.items() if e.record.is_expired(now_wall)]
        for k in dead:
            self._remove(k)
        return len(dead)

    def cull(self, now: float | None = None) -> int:
        """Drop expired records; returns how many."""
        return self._cull(time.time() if now is None else now)

    # -- reading ------------------------------------------------------------
    def _live(self, key: bytes, now: float | None) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.record.is_expired(now):
            self._remove(key)
            return None
        return entry

    def get(self, key: bytes, default: bytes | None = None, *,
            now: float | None = None) -> bytes | None:
        entry = self._live(key, now) if isinstance(key, bytes) else None
        return entry.value if entry else default

    def get_record(self, key: bytes, *, now: float | None = None) -> ContactRecord | None:
        entry = self._live(key, now)
        return entry.record if entry else None

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def __len__(self) -> int:
        return len(self._data)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def keys_from(self, sender: str) -> int:
        return self._per_sender.get(sender, 0)

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        now_wall = time.time()
        cutoff = time.monotonic() - seconds_old
        return [(k, e.value) for k, e in list(self._data.items())
                if e.stored_at <= cutoff and not e.record.is_expired(now_wall)]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        now_wall = time.time()
        return iter([(k, e.value) for k, e in list(self._data.items())
                     if not e.record.is_expired(now_wall)])

    def closest_keys(self, target: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` live (key, value) pairs nearest `target` by XOR distance.

        Keys sharing a long prefix with `target` sit next to it in sorted order, so
        a window of `limit` keys on each side of its insertion point holds (nearly
        always exactly) the nearest ones: O(log n + limit), not O(n).
        """
        if limit <= 0 or not self._sorted_keys:
            return []
        i = bisect.bisect_left(self._sorted_keys, target)
        window = self._sorted_keys[max(0, i - limit): i + limit]
        t = int.from_bytes(target, "big")
        window.sort(key=lambda k: int.from_bytes(k, "big") ^ t)
        out: list[tuple[bytes, bytes]] = []
        for k in window:
            entry = self._live(k, None)
            if entry is not None:
                out.append((k, entry.value))
                if len(out) == limit:
                    break
        return out


__all__ = [
    "MAX_KEYS_PER_SENDER",
    "MAX_STORED_BYTES",
    "MAX_STORED_KEYS",
    "RecordStorage",
    "StoreOutcome",
]

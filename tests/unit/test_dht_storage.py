"""RecordStorage: only valid signed records under their signer's DHT id, bounded, no stale seq."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
from kademlia.storage import ForgetfulStorage

from dht.records import MAX_VALUE_BYTES, record_for_key
from dht.storage import RecordStorage, StoreOutcome
from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import Identity

NOW = 1_700_000_000


def rec(ident: Identity, seq: int = 1, *, now: float = NOW, ttl_s: int = 3600,
        port: int = 9000) -> ContactRecord:
    return ContactRecord.create(ident, ["127.0.0.1"], {"dht": port, "tcp": port + 1}, seq,
                                now=now, ttl_s=ttl_s)


@pytest.fixture
def ident() -> Identity:
    return Identity.generate("alice")


def test_valid_record_is_stored_and_returned(ident: Identity) -> None:
    s = RecordStorage()
    r = rec(ident)
    assert s.put(ident.peer_id.dht_id, r.encode(), now=NOW) is StoreOutcome.STORED
    assert s.get(ident.peer_id.dht_id, now=NOW) == r.encode()
    assert s.get_record(ident.peer_id.dht_id, now=NOW) == r
    assert len(s) == 1 and s.total_bytes == len(r.encode())


@pytest.mark.parametrize("value", [[1, 2], "text", 7, None, {"a": b"x"}, b"\x92\x01"])
def test_non_record_values_are_refused_and_do_not_poison(ident: Identity, value: object) -> None:
    # the stock ForgetfulStorage keeps anything, which is what made a list poison get()
    stock = ForgetfulStorage()
    stock[ident.peer_id.dht_id] = value
    assert stock.get(ident.peer_id.dht_id) == value
    s = RecordStorage()
    with pytest.raises(ProtocolError):
        s.put(ident.peer_id.dht_id, value, now=NOW)
    assert s.get(ident.peer_id.dht_id) is None
    good = rec(ident)
    assert s.put(ident.peer_id.dht_id, good.encode(), now=NOW) is StoreOutcome.STORED


def test_record_under_another_key_is_refused(ident: Identity) -> None:
    mallory = Identity.generate("mallory")
    with pytest.raises(ProtocolError, match="DHT id"):
        RecordStorage().put(ident.peer_id.dht_id, rec(mallory).encode(), now=NOW)


def test_tampered_record_is_refused(ident: Identity) -> None:
    r = rec(ident)
    forged = dataclasses.replace(r, hosts=("127.6.6.6",))
    with pytest.raises(ProtocolError, match="signature"):
        RecordStorage().put(ident.peer_id.dht_id, forged.encode(), now=NOW)


def test_oversize_value_is_refused(ident: Identity) -> None:
    with pytest.raises(ProtocolError):
        RecordStorage().put(ident.peer_id.dht_id, b"\x00" * (MAX_VALUE_BYTES + 1), now=NOW)


def test_bad_key_is_refused(ident: Identity) -> None:
    with pytest.raises(ProtocolError):
        RecordStorage().put(b"short", rec(ident).encode(), now=NOW)


def test_expired_records_are_refused_and_vanish(ident: Identity) -> None:
    s = RecordStorage()
    r = rec(ident, ttl_s=60)
    with pytest.raises(ProtocolError, match="expired"):
        s.put(ident.peer_id.dht_id, r.encode(), now=NOW + 61)
    assert s.put(ident.peer_id.dht_id, r.encode(), now=NOW) is StoreOutcome.STORED
    assert s.get(ident.peer_id.dht_id, now=NOW + 30) == r.encode()
    assert s.get(ident.peer_id.dht_id, now=NOW + 61) is None
    assert len(s) == 0


def test_lower_seq_never_replaces_higher(ident: Identity) -> None:
    s = RecordStorage()
    key = ident.peer_id.dht_id
    r1, r2 = rec(ident, 1, port=1000), rec(ident, 2, port=2000)
    assert s.put(key, r2.encode(), now=NOW) is StoreOutcome.STORED
    assert s.put(key, r1.encode(), now=NOW) is StoreOutcome.STALE
    assert s.put(key, r2.encode(), now=NOW) is StoreOutcome.UNCHANGED
    assert s.get_record(key, now=NOW) == r2
    r3 = rec(ident, 3, port=3000)
    assert s.put(key, r3.encode(), now=NOW) is StoreOutcome.STORED
    assert s.get_record(key, now=NOW) == r3 and len(s) == 1
    assert s.total_bytes == len(r3.encode())


def _many(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        ident = Identity.generate(seed=random.Random(i).randbytes(32))
        out.append((ident.peer_id.dht_id, rec(ident, now=time.time()).encode()))
    return out


def test_key_count_bound() -> None:
    s = RecordStorage(max_keys=3)
    items = _many(4)
    assert [s.put(k, v) for k, v in items[:3]] == [StoreOutcome.STORED] * 3
    assert s.put(*items[3]) is StoreOutcome.FULL
    assert len(s) == 3 and items[3][0] not in s


def test_byte_bound() -> None:
    items = _many(3)
    s = RecordStorage(max_bytes=len(items[0][1]) + len(items[1][1]))
    assert s.put(*items[0]) is StoreOutcome.STORED
    assert s.put(*items[1]) is StoreOutcome.STORED
    assert s.put(*items[2]) is StoreOutcome.FULL
    assert s.total_bytes <= s.max_bytes


def test_per_sender_bound() -> None:
    s = RecordStorage(max_keys_per_sender=2)
    items = _many(4)
    assert s.put(*items[0], sender="127.0.0.11") is StoreOutcome.STORED
    assert s.put(*items[1], sender="127.0.0.11") is StoreOutcome.STORED
    assert s.put(*items[2], sender="127.0.0.11") is StoreOutcome.FULL
    assert s.put(*items[3], sender="127.0.0.12") is StoreOutcome.STORED
    assert s.keys_from("127.0.0.11") == 2 and s.keys_from("127.0.0.12") == 1


def test_full_storage_culls_expired_records_first() -> None:
    s = RecordStorage(max_keys=2)
    old = [Identity.generate() for _ in range(2)]
    t = time.time()
    for ident in old:
        s.put(ident.peer_id.dht_id, rec(ident, now=t - 100, ttl_s=101).encode(), now=t)
    fresh = Identity.generate()
    # the two old records expire 1 s from now; store the fresh one 2 s "later"
    outcome = s.put(fresh.peer_id.dht_id, rec(fresh, now=t).encode(), now=t + 2)
    assert outcome is StoreOutcome.STORED
    assert fresh.peer_id.dht_id in s


def test_closest_keys_finds_the_nearest() -> None:
    s = RecordStorage()
    items = _many(200)
    for k, v in items:
        s.put(k, v)
    rng = random.Random(7)
    for _ in range(50):
        target = rng.randbytes(20)
        t = int.from_bytes(target, "big")
        best = min((k for k, _ in items), key=lambda k: int.from_bytes(k, "big") ^ t)
        got = s.closest_keys(target, 8)
        assert len(got) == 8
        assert got[0][0] == best
        dists = [int.from_bytes(k, "big") ^ t for k, _ in got]
        assert dists == sorted(dists)


def test_record_for_key_checks_everything(ident: Identity) -> None:
    r = rec(ident, now=time.time())
    assert record_for_key(ident.peer_id.dht_id, r.encode()) == r
    with pytest.raises(ProtocolError):
        record_for_key(ident.peer_id.dht_id, r.encode()[:-3])
    with pytest.raises(ProtocolError):
        record_for_key(ident.peer_id.dht_id, bytearray(r.encode()))

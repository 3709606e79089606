"""LAN announcements: the packet codec and the pure LanCache (forgeries, floods, staleness)."""

from __future__ import annotations

import time

import pytest

from node.contact import ContactRecord
from node.discovery.addresses import ANY_V4
from node.discovery.lan import (
    INSTANCE_ID_BYTES,
    MAGIC,
    MAX_PACKET_BYTES,
    LanCache,
    Outcome,
    decode_announcement,
    encode_announcement,
)
from node.errors import ProtocolError
from node.identity import Identity
from node.wire import packb

ME = Identity.generate("me", seed=b"\x01" * 32)
ALICE = Identity.generate("alice", seed=b"\x02" * 32)
NOW = time.time()
INST = b"\x11" * INSTANCE_ID_BYTES


def record(who: Identity = ALICE, seq: int = 1, hosts: tuple[str, ...] = ("198.18.0.2",)
           ) -> ContactRecord:
    return ContactRecord.create(who, list(hosts), {"tcp": 9000, "dht": 9003}, seq, now=NOW)


def packet(who: Identity = ALICE, seq: int = 1, inst: bytes = INST) -> bytes:
    return encode_announcement(record(who, seq), inst)


def cache(**kw: float) -> LanCache:
    return LanCache(ME.peer_id, 0.0, wall=lambda: NOW, **kw)  # type: ignore[arg-type]


def test_round_trip() -> None:
    ann = decode_announcement(packet())
    assert ann.instance_id == INST and ann.record == record()
    assert len(packet()) <= MAX_PACKET_BYTES


BAD = [
    b"",
    b"garbage",
    b"XXXXXXXX" + packb([1, INST, record().to_wire()]),          # wrong magic
    MAGIC + b"\xc1",                                               # not msgpack
    MAGIC + packb([2, INST, record().to_wire()]),                  # unknown version
    MAGIC + packb([1, b"short", record().to_wire()]),              # bad instance id
    MAGIC + packb([1, INST]),                                      # missing record
    MAGIC + packb([1, INST, record().to_wire()[:7]]),              # truncated record
    MAGIC + packb([1, INST, record().to_wire()]) + b"x" * MAX_PACKET_BYTES,  # oversize
]


@pytest.mark.parametrize("data", BAD)
def test_malformed_packets_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_announcement(data)
    c = cache()
    assert c.receive(data, 1.0).outcome is Outcome.MALFORMED
    assert c.entries() == {}


def test_every_truncation_is_refused() -> None:
    good = packet()
    c = cache(packets_per_s=1e9, packet_burst=1e9)
    for cut in range(len(good)):
        assert c.receive(good[:cut], 1.0).outcome is Outcome.MALFORMED
    assert c.entries() == {}


def test_accepts_a_signed_record_and_reports_a_new_instance() -> None:
    c = cache()
    got = c.receive(packet(), 1.0)
    assert got.outcome is Outcome.ACCEPTED and got.new_instance
    assert got.record == record()
    assert list(c.entries()) == [ALICE.peer_id]


def test_forged_record_is_ignored() -> None:
    wire = record().to_wire()
    wire[2] = ["203.0.113.66"]  # the attacker's host under Alice's signature
    forged = MAGIC + packb([1, INST, wire])
    c = cache()
    assert c.receive(forged, 1.0).outcome is Outcome.INVALID
    assert c.entries() == {}


def test_own_record_is_ignored_before_any_verification() -> None:
    c = cache(verify_per_s=0.0, verify_burst=0.0)
    assert c.receive(packet(ME), 1.0).outcome is Outcome.OWN


def test_same_packet_refreshes_and_stale_seq_is_ignored() -> None:
    c = cache()
    assert c.receive(packet(seq=5), 1.0).outcome is Outcome.ACCEPTED
    again = c.receive(packet(seq=5), 50.0)
    assert again.outcome is Outcome.REFRESHED
    assert c.entries()[ALICE.peer_id].last_seen == 50.0
    assert c.receive(packet(seq=4), 51.0).outcome is Outcome.STALE
    # same seq, other bytes (another instance id): stale too, the cached record stays
    assert c.receive(packet(seq=5, inst=b"\x22" * 8), 52.0).outcome is Outcome.STALE
    assert c.entries()[ALICE.peer_id].record.seq == 5


def test_a_restart_is_a_new_instance() -> None:
    c = cache()
    c.receive(packet(seq=5), 1.0)
    newer_same_instance = c.receive(packet(seq=6), 2.0)
    assert newer_same_instance.outcome is Outcome.ACCEPTED and not newer_same_instance.new_instance
    restarted = c.receive(packet(seq=7, inst=b"\x33" * 8), 3.0)
    assert restarted.outcome is Outcome.ACCEPTED and restarted.new_instance


def test_entries_expire_after_the_cache_lifetime() -> None:
    c = cache(lifetime_s=90.0)
    c.receive(packet(), 10.0)
    assert c.expire(99.0) == []
    assert c.expire(100.5) == [ALICE.peer_id]
    assert c.entries() == {}


def test_verifications_per_second_are_bounded() -> None:
    """A flood of validly-shaped records from many keys costs at most the verification
    budget: beyond the burst, packets are dropped without checking their signature."""
    peers = [Identity.generate(seed=bytes([i]) * 32) for i in range(10, 40)]
    c = cache(verify_per_s=5.0, verify_burst=10.0, max_entries=1000)
    outcomes = [c.receive(packet(p), 1.0).outcome for p in peers]
    assert outcomes.count(Outcome.ACCEPTED) == 10
    assert outcomes.count(Outcome.RATE_LIMITED) == 20
    # one second later, 5 more tokens
    later = [c.receive(packet(p), 2.0).outcome for p in peers[10:]]
    assert later.count(Outcome.ACCEPTED) == 5


def test_packets_per_second_are_bounded_before_decoding() -> None:
    c = cache(packets_per_s=10.0, packet_burst=10.0)
    outcomes = [c.receive(b"garbage", 1.0).outcome for _ in range(50)]
    assert outcomes.count(Outcome.MALFORMED) == 10
    assert outcomes.count(Outcome.RATE_LIMITED) == 40


def test_cache_entries_are_bounded() -> None:
    peers = [Identity.generate(seed=bytes([i]) * 32) for i in range(50, 60)]
    c = cache(max_entries=4)
    outcomes = [c.receive(packet(p), 1.0).outcome for p in peers]
    assert outcomes.count(Outcome.ACCEPTED) == 4 and outcomes.count(Outcome.FULL) == 6
    assert len(c.entries()) == 4
    # once the old ones expire, new peers get in
    assert c.receive(packet(peers[9]), 200.0).outcome is Outcome.ACCEPTED
    assert len(c.entries()) == 1


def test_expired_record_is_invalid() -> None:
    old = ContactRecord.create(ALICE, ["198.18.0.2"], {"tcp": 1}, 1, now=NOW - 7200, ttl_s=60)
    c = cache()
    assert c.receive(encode_announcement(old, INST), 1.0).outcome is Outcome.INVALID


def test_where_the_lan_socket_binds() -> None:
    from node.discovery.lan import bind_host_for

    # default targets (broadcast + multicast): off on loopback, else the wildcard
    assert bind_host_for("127.0.0.1", None) is None
    assert bind_host_for("localhost", None) is None
    assert bind_host_for(ANY_V4, None) == ANY_V4
    assert bind_host_for("198.18.0.7", None) == ANY_V4
    # explicit unicast targets (tests): the listen host itself
    assert bind_host_for("127.0.0.1", [("127.0.0.1", 1)]) == "127.0.0.1"
    assert bind_host_for("::", [("127.0.0.1", 1)]) == ANY_V4

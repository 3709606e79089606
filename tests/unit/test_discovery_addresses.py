"""Advertised hosts (never a wildcard), observed addresses, the record's observed field."""

from __future__ import annotations

import ipaddress
import time

import pytest

from node.contact import ContactRecord
from node.discovery.addresses import (
    ANY_V4,
    Interface,
    advertised_hosts,
    default_route_interfaces,
    interfaces,
)
from node.discovery.observed import ObservedAddresses
from node.discovery.record import LocalRecord
from node.errors import ProtocolError
from node.identity import Identity
from node.wire import packb, unpackb

ME = Identity.generate("me", seed=b"\x05" * 32)
LO = Interface("lo", "127.0.0.1", "255.0.0.0")
LAN = Interface("eth0", "198.18.0.7", "255.255.255.0")
LAN6 = Interface("eth0", "2001:db8::7")
LINK6 = Interface("eth0", "fe80::1")
PORTS = {"tcp": 9000, "udp": 9001, "quic": 9002, "dht": 9003}


def test_wildcard_advertises_interfaces_never_itself() -> None:
    assert advertised_hosts(ANY_V4, "", [LO, LAN, LAN6]) == ["198.18.0.7"]
    assert advertised_hosts("::", "", [LO, LINK6, LAN6, LAN]) == ["198.18.0.7", "2001:db8::7"]
    assert ANY_V4 not in advertised_hosts(ANY_V4, "", [])


def test_loopback_only_when_nothing_else() -> None:
    assert advertised_hosts(ANY_V4, "", [LO]) == ["127.0.0.1"]
    assert advertised_hosts(ANY_V4, "", []) == ["127.0.0.1"]


def test_explicit_addresses_win() -> None:
    assert advertised_hosts("127.0.0.1", "", [LAN]) == ["127.0.0.1"]
    assert advertised_hosts(ANY_V4, "node.example", [LAN]) == ["node.example"]
    assert advertised_hosts("198.18.0.7", ANY_V4, [LAN]) == ["198.18.0.7"]


def test_directed_broadcast() -> None:
    assert LAN.broadcast == "198.18.0.255"
    assert Interface("x", "198.18.0.1", "255.255.255.255").broadcast is None
    assert LAN6.broadcast is None


def test_this_hosts_interfaces_include_loopback() -> None:
    found = interfaces()
    assert any(i.address == "127.0.0.1" and i.netmask == "255.0.0.0" for i in found)
    for i in found:
        ipaddress.ip_address(i.address)


def test_record_of_a_wildcard_listener_has_no_wildcard() -> None:
    rec = LocalRecord(ME, hosts=lambda: advertised_hosts(ANY_V4, "", [LO, LAN]), ports=PORTS)
    assert rec.current.hosts == ("198.18.0.7",)
    assert rec.current.verify()


# -- observed addresses ----------------------------------------------------------


def test_one_dht_peer_is_not_believed_two_agreeing_are() -> None:
    obs = ObservedAddresses()
    obs.report("dht", "198.18.1.1", "198.19.0.9", 40000, 1.0)
    assert obs.advertised(["198.18.0.7"], PORTS, 2.0) == []
    obs.report("dht", "198.18.1.2", "198.19.0.9", 40000, 1.5)
    assert obs.advertised(["198.18.0.7"], PORTS, 2.0) == [
        ("dht", "198.19.0.9", 40000), ("quic", "198.19.0.9", 9002),
        ("tcp", "198.19.0.9", 9000), ("udp", "198.19.0.9", 9001)]


def test_bootstrap_host_is_believed_alone_and_local_echoes_are_dropped() -> None:
    obs = ObservedAddresses()
    obs.report("bootstrap", "http://b:1", "198.19.0.9", 51234, 1.0)
    assert obs.advertised(["198.18.0.7"], PORTS, 2.0) == [("tcp", "198.19.0.9", 9000)]
    # on a testnet the server sees our own address: nothing to add
    assert obs.advertised(["198.19.0.9"], PORTS, 2.0) == []


def test_observations_expire_and_reporters_are_bounded() -> None:
    obs = ObservedAddresses(ttl_s=10.0)
    for i in range(100):
        obs.report("dht", f"198.18.2.{i}", "198.19.0.9", 40000, float(i) / 100)
    assert len(obs.observations(1.0)) == 16
    assert obs.observations(20.0) == []
    obs.report("dht", "x", "not an ip", 1, 1.0)
    obs.report("dht", "x", "198.18.0.1", 0, 1.0)
    assert obs.observations(1.0) == []


def test_local_record_re_signs_when_observed_changes() -> None:
    clock = [time.time()]
    obs = ObservedAddresses()
    rec = LocalRecord(ME, hosts=lambda: ["198.18.0.7"], ports=PORTS, observed=obs,
                      clock=lambda: clock[0])
    changes: list[ContactRecord] = []
    rec.on_change(changes.append)
    first = rec.current
    assert not rec.refresh()
    obs.report("bootstrap", "http://b:1", "198.19.0.9", 5, clock[0])
    assert rec.refresh()
    assert changes == [rec.current] and rec.current.seq > first.seq
    assert rec.current.observed == (("tcp", "198.19.0.9", 9000),)
    assert rec.current.endpoints("tcp") == [("198.18.0.7", 9000), ("198.19.0.9", 9000)]
    clock[0] += 1900  # more than half the TTL gone: re-signed before it expires
    assert rec.refresh() and rec.current.expires > clock[0] + 1800


# -- the record's observed field -----------------------------------------------------


def observed_record() -> ContactRecord:
    return ContactRecord.create(ME, ["198.18.0.7"], PORTS, 3,
                                observed=[("udp", "198.19.0.9", 9001),
                                          ("dht", "198.19.0.9", 40000)])


def test_observed_round_trips_wire_and_json_and_is_signed() -> None:
    rec = observed_record()
    assert ContactRecord.decode(rec.encode()) == rec
    assert ContactRecord.from_json(rec.to_json()) == rec
    assert rec.to_json()["observed"] == [["dht", "198.19.0.9", 40000],
                                         ["udp", "198.19.0.9", 9001]]
    wire = rec.to_wire()
    wire[8] = {"observed": [["dht", "203.0.113.1", 40000], ["udp", "198.19.0.9", 9001]]}
    with pytest.raises(ProtocolError, match="bad signature"):
        ContactRecord.from_wire(wire).verify()


def test_a_record_without_observed_encodes_as_before() -> None:
    rec = ContactRecord.create(ME, ["198.18.0.7"], PORTS, 3)
    assert len(unpackb(rec.encode())) == 8
    assert "observed" not in rec.to_json()


@pytest.mark.parametrize("ext", [
    {}, [], {"unknown": 1}, {"observed": []}, {"observed": "x"},
    {"observed": [["tcp", "h", 0]]}, {"observed": [["smtp", "h", 25]]},
    {"observed": [["tcp", "h", 1], ["tcp", "h", 2]]}, {"observed": [["tcp", "", 1]]},
    {"observed": [["udp", "h", 1], ["tcp", "h", 1]]},  # unsorted
    {"observed": [["tcp", "h"]]}, {"observed": [["tcp", "h", 1]] * 5},
])
def test_bad_observed_fields_are_refused(ext: object) -> None:
    wire = ContactRecord.create(ME, ["198.18.0.7"], PORTS, 3).to_wire() + [ext]
    with pytest.raises(ProtocolError):
        ContactRecord.from_wire(wire)
    with pytest.raises(ProtocolError):
        ContactRecord.decode(packb(wire))


ROUTES = """Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t00000000\t010012C6\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t000012C6\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
"""


def test_the_default_route_interface_is_advertised_first() -> None:
    assert default_route_interfaces(ROUTES) == {"eth1"}
    assert default_route_interfaces("") == set()
    bridge = Interface("docker0", "172.17.0.1", "255.255.0.0")
    uplink = Interface("eth1", "198.18.0.9", "255.255.255.0")
    assert advertised_hosts(ANY_V4, "", [LO, bridge, uplink], {"eth1"}) == [
        "198.18.0.9", "172.17.0.1"]
    assert advertised_hosts(ANY_V4, "", [LO, bridge, uplink], set()) == [
        "172.17.0.1", "198.18.0.9"]

"""Discovery with real node processes: the DHT keeps working without the bootstrap server.

Issue 3, item 7. One module-scoped testnet (a bootstrap server and ten real
`node start` processes on 127.0.0.1, started in parallel through
scripts/testnet_lib.Testnet) is built once; the bootstrap server is then stopped
for good, and every test works on that network without it:

1. a fresh node that knows a single peer (`--bootstrap-peer`) finds every record;
2. a restarted node rejoins from its peer cache alone and republishes a higher seq;
3. forged and tampered records sent by raw `store` RPCs are refused and never returned;
4. garbage, truncated, oversize and wrong-arity datagrams are survived;
5. a node that never talked to the bootstrap server lists peers with source "dht".

The attacker in 3 and 4 is this test process talking raw UDP to a node's DHT port
(the datagram layout of dht/protocol.py: kind(1) || msg_id(20) || msgpack). It may
use node.contact/identity/wire to build records; it never reaches into a node.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from node.contact import ContactRecord
from node.identity import Identity, PeerId
from node.wire import packb, unpackb

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id

N_NODES = 10
NODES = [f"n{i}" for i in range(1, N_NODES + 1)]
JOIN_TIMEOUT_S = 45.0
CLI_PARALLEL = 3
INIT_THREADS = 3
JOINED_LOG_LINE = "joined the DHT through"
UDP_REPLY_TIMEOUT_S = 2.0
# dht/protocol.py datagram layout
KIND_REQUEST = 0
KIND_RESPONSE = 1
MSG_ID_LEN_BYTES = 20
MAX_DATAGRAM_BYTES = 1 + MSG_ID_LEN_BYTES + 8192
EXIT_PEER_UNREACHABLE = 10

pytestmark = pytest.mark.slow


# -- helpers ---------------------------------------------------------------------------


def _joined_count(net: Testnet, name: str) -> int:
    """How many times the node's log says it joined the DHT and stored its record."""
    try:
        text = net.node(name).node_log.read_text(errors="replace")
    except OSError:
        return 0
    return text.count(JOINED_LOG_LINE)


def _has_joined(net: Testnet, name: str, at_least: int) -> bool:
    return _joined_count(net, name) >= at_least


def _wait_joined(net: Testnet, names: list[str], at_least: int = 1) -> None:
    for n in names:
        net.wait_until(functools.partial(_has_joined, net, n, at_least), JOIN_TIMEOUT_S,
                       what=f"{n} logs that it joined the DHT ({at_least}x)")


def _lookup(net: Testnet, asker: str, peer: str) -> dict[str, Any]:
    out = net.cli(asker, "lookup", peer)
    assert isinstance(out, dict), out
    return out


def _lookup_many(net: Testnet, asker: str, targets: list[str]) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(CLI_PARALLEL) as pool:
        results = pool.map(lambda t: _lookup(net, asker, net.peer_id(t)), targets)
        return dict(zip(targets, results, strict=True))


def _assert_genuine(net: Testnet, name: str, found: dict[str, Any]) -> None:
    rec = found["record"]
    assert normalize_peer_id(rec["peer_id"]) == normalize_peer_id(net.peer_id(name))
    assert rec["name"] == name
    assert rec["hosts"] == ["127.0.0.1"]
    ports = net.node(name).ports
    assert rec["ports"]["dht"] == ports["dht"], (name, rec["ports"], ports)
    assert rec["ports"]["tcp"] == ports["tcp"], (name, rec["ports"], ports)
    for kind, port in rec["ports"].items():
        assert ports[kind] == port, (name, kind, rec["ports"], ports)
    # the signature really is the peer's: re-verify it here, independently of the node
    ContactRecord.from_json(rec).verify()
    assert isinstance(found["hops"], int) and found["hops"] >= 0
    assert isinstance(found["queries"], int) and found["queries"] >= 1
    assert isinstance(found["elapsed_ms"], (int, float)) and found["elapsed_ms"] >= 0


def _dht_port(net: Testnet, name: str) -> int:
    return net.node(name).ports["dht"]


class RawDhtClient:
    """A UDP socket that speaks (or abuses) the DHT wire format, like an attacker would."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.node_id = os.urandom(20)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    def request(self, port: int, method: str, *args: Any,
                timeout_s: float = UDP_REPLY_TIMEOUT_S) -> Any:
        """Send one request and return the decoded reply (raises TimeoutError)."""
        msg_id = os.urandom(MSG_ID_LEN_BYTES)
        self.send_raw(bytes([KIND_REQUEST]) + msg_id + packb([method, list(args)]), port)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {method} from port {port}")
            self.sock.settimeout(left)
            try:
                data, _addr = self.sock.recvfrom(65536)
            except TimeoutError:
                raise TimeoutError(f"no reply to {method} from port {port}") from None
            if data[0] == KIND_RESPONSE and data[1:1 + MSG_ID_LEN_BYTES] == msg_id:
                return unpackb(data[1 + MSG_ID_LEN_BYTES:])

    def drain(self, wait_s: float) -> list[bytes]:
        """Every datagram that arrives within `wait_s`."""
        got: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recvfrom(65536)[0])
            except TimeoutError:
                break
        return got


@pytest.fixture
def raw() -> Iterator[RawDhtClient]:
    client = RawDhtClient()
    try:
        yield client
    finally:
        client.close()


def _forged_for(victim: PeerId, attacker: Identity, dht_port: int) -> ContactRecord:
    """A record that claims to be `victim` but is signed by `attacker`."""
    now = int(time.time())
    unsigned = ContactRecord(victim, "evil", ("127.0.0.1",), {"tcp": 9, "dht": dht_port},
                             10**15, now, now + 3600, b"")
    return dataclasses.replace(unsigned, signature=attacker.sign(unsigned.signed_bytes()))


def _tampered(genuine: ContactRecord) -> ContactRecord:
    """The genuine record with a redirected port and a higher seq, old signature kept."""
    ports = dict(genuine.ports, tcp=9)
    return dataclasses.replace(genuine, ports=ports, seq=genuine.seq + 10**6)


# -- the shared network ------------------------------------------------------------------


def _init_in_parallel(net: Testnet, names: list[str]) -> None:
    """`add_nodes(start=False)` for a few groups at once: `node init` + `node id` are two
    CLI runs per node, the slowest part of building a network on a loaded machine."""
    allocate, lock = net.ports.allocate, threading.Lock()

    def locked_allocate() -> int:
        with lock:
            return allocate()

    net.ports.allocate = locked_allocate  # type: ignore[method-assign]
    groups = [names[i::INIT_THREADS] for i in range(INIT_THREADS)]
    with ThreadPoolExecutor(INIT_THREADS) as pool:
        list(pool.map(lambda g: net.add_nodes(g, start=False), [g for g in groups if g]))


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testnet]:
    """Ten nodes that registered with a bootstrap server, which is then stopped."""
    root = tmp_path_factory.mktemp("discovery")
    with Testnet(root) as tn:
        tn.start_bootstrap(ttl_s=60)
        _init_in_parallel(tn, NODES)
        tn.start_many(NODES)
        want = {normalize_peer_id(tn.peer_id(n)) for n in NODES}

        def all_registered() -> bool:
            with urllib.request.urlopen(tn.bootstrap_url + "/peers?limit=100", timeout=5) as r:
                listed = {normalize_peer_id(p["device_id"])
                          for p in json.loads(r.read())["peers"]}
            return want <= listed

        tn.wait_until(all_registered, JOIN_TIMEOUT_S, what="all nodes registered")
        _wait_joined(tn, NODES)
        tn.stop_bootstrap()
        assert not tn.bootstrap_process or not tn.bootstrap_process.alive()
        yield tn


# -- 1. one known peer, no bootstrap server -----------------------------------------------


def test_fresh_node_joining_through_one_peer_finds_everyone(net: Testnet) -> None:
    (h,) = net.add_nodes(["fresh"], bootstrap=False, bootstrap_peers=["n5"])
    cmd = net._start_cmd(h)
    assert "--bootstrap" not in cmd and cmd.count("--bootstrap-peer") == 1
    _wait_joined(net, ["fresh"])
    found = _lookup_many(net, "fresh", NODES)
    for name, res in found.items():
        _assert_genuine(net, name, res)
    # nobody is more than a couple of rounds away in a network of eleven
    assert max(r["hops"] for r in found.values()) <= 4
    status = net.cli("fresh", "status")
    assert status["bootstrap"] == []
    assert status["dht_contacts"] >= N_NODES // 2


# -- 2. rejoin from the peer cache alone --------------------------------------------------


def test_restarted_node_rejoins_from_its_peer_cache_alone(net: Testnet) -> None:
    name = "n2"
    before = _lookup(net, "n1", net.peer_id(name))["record"]["seq"]
    net.stop(name)
    h = net.node(name)
    h.bootstrap, h.bootstrap_peers = False, []  # nothing but its peers.db
    joins = _joined_count(net, name)
    net.start(name)
    cmd = net._start_cmd(h)
    assert "--bootstrap" not in cmd and "--bootstrap-peer" not in cmd
    _wait_joined(net, [name], at_least=joins + 1)

    # it finds others...
    for target in ("n7", "n9"):
        _assert_genuine(net, target, _lookup(net, name, net.peer_id(target)))

    # ...and others find its new record, with a higher seq than before the restart
    def newer_record_found(asker: str) -> dict[str, Any] | None:
        res = _lookup(net, asker, net.peer_id(name))
        return res if res["record"]["seq"] > before else None

    for asker in ("n1", "n8"):
        res = net.wait_until(functools.partial(newer_record_found, asker), 30,
                             what=f"{asker} finds {name}'s republished record")
        _assert_genuine(net, name, res)


# -- 3. forged and tampered records ---------------------------------------------------------


def test_forged_and_tampered_records_are_refused(net: Testnet, raw: RawDhtClient) -> None:
    victim = "n4"
    victim_id = PeerId.parse(net.peer_id(victim))
    genuine = ContactRecord.from_json(_lookup(net, "n3", net.peer_id(victim))["record"])
    attacker = Identity.generate()
    attacker_own = ContactRecord.create(attacker, ["127.0.0.1"], {"tcp": 9}, 10**15)
    # an unknown peer whose key the DHT only ever holds forgeries for
    ghost = Identity.generate()
    ghost_tampered = _tampered(ContactRecord.create(ghost, ["127.0.0.1"], {"tcp": 7000}, 1))

    attacks = [
        (victim_id.dht_id, _forged_for(victim_id, attacker, raw.sock.getsockname()[1])),
        (victim_id.dht_id, attacker_own),   # validly signed, but by another key
        (victim_id.dht_id, _tampered(genuine)),
        (ghost.peer_id.dht_id, _forged_for(ghost.peer_id, attacker, 9)),
        (ghost.peer_id.dht_id, ghost_tampered),
    ]
    # every node is a storage candidate in a network this small: attack them all
    for name in NODES:
        for key, record in attacks:
            reply = raw.request(_dht_port(net, name), "store", raw.node_id, key,
                                record.encode())
            assert reply is False, f"{name} accepted a forged store: {record}"

    # the victim's genuine record is still what everyone finds
    for asker in ("n1", "n6", "n10"):
        res = _lookup(net, asker, net.peer_id(victim))
        _assert_genuine(net, victim, res)
        assert res["record"]["seq"] == genuine.seq
        assert res["record"]["signature"] == genuine.to_json()["signature"]

    # a key that only forgeries were offered for: a clean, explained failure
    res = net.cli("n1", "lookup", str(ghost.peer_id), json=False, check=False)
    assert res.returncode == EXIT_PEER_UNREACHABLE, (res.returncode, res.stdout, res.stderr)
    assert "no valid contact record" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    # nor did any forgery reach a peer book / peer cache
    for name in ("n5", "n9"):
        listed = {normalize_peer_id(p["peer_id"]): p for p in net.cli(name, "peers")}
        assert normalize_peer_id(str(ghost.peer_id)) not in listed
        assert normalize_peer_id(str(attacker.peer_id)) not in listed
        entry = listed[normalize_peer_id(net.peer_id(victim))]  # known since registration
        assert entry["ports"]["tcp"] == net.node(victim).ports["tcp"]
        assert entry["name"] == victim and entry["seq"] == genuine.seq
    assert all(net.node(n).running() for n in NODES if n != "n2")


# -- 4. malformed datagrams -----------------------------------------------------------------


def _malformed_datagrams(node_id: bytes) -> list[bytes]:
    mid = os.urandom(MSG_ID_LEN_BYTES)
    req = bytes([KIND_REQUEST]) + mid
    valid_ping = req + packb(["ping", [node_id]])
    out = [
        b"",
        b"\x00",
        req,                                              # header only
        valid_ping[:-5],                                  # truncated
        valid_ping[:25],
        bytes([7]) + mid + packb(["ping", [node_id]]),    # unknown kind
        req + b"\xc1\xc1\xc1",                            # not msgpack
        req + b"\x91" * 2000,                             # deep nesting
        req + packb(["ping", []]),                        # wrong arity
        req + packb(["ping", [node_id, node_id]]),
        req + packb(["store", [node_id]]),
        req + packb(["find_node", [node_id, node_id, node_id]]),
        req + packb(["ping"]),
        req + packb({"ping": [node_id]}),
        req + packb(["ping", [12345]]),                   # wrong types
        req + packb(["ping", [b"short"]]),
        req + packb(["find_value", [node_id, "text-key-of-20-chars"]]),
        req + packb(["store", [node_id, node_id, [1, 2, 3]]]),  # the old poisoning value
        req + packb(["store", [node_id, node_id, b"x" * 5000]]),
        req + packb(["stun", []]),                        # wrong arity (stun takes an id)
        req + packb(["__init__", [node_id]]),
        req + packb(["no_such_rpc", [node_id]]),
        bytes([KIND_RESPONSE]) + mid + packb(node_id),    # unsolicited reply
        req + os.urandom(MAX_DATAGRAM_BYTES),             # oversize
        os.urandom(60_000),
    ]
    out += [os.urandom(n) for n in (1, 2, 21, 22, 100, 1500, 8000) for _ in range(20)]
    return out


def test_malformed_datagrams_are_survived(net: Testnet, raw: RawDhtClient) -> None:
    target = "n6"
    port = _dht_port(net, target)
    target_id = PeerId.parse(net.peer_id(target)).dht_id
    assert raw.request(port, "ping", raw.node_id) == target_id  # speaks before
    bad = _malformed_datagrams(raw.node_id)
    for _round in range(3):
        for data in bad:
            raw.send_raw(data, port)
    # nothing malformed gets an answer (no reflection); the node may still send us
    # requests of its own (we are a routing contact since the ping), never replies
    replies = [d for d in raw.drain(0.5) if d[:1] == bytes([KIND_RESPONSE])]
    assert replies == []
    # still answers on the wire...
    assert raw.request(port, "ping", raw.node_id) == target_id
    nodes = raw.request(port, "find_node", raw.node_id, PeerId.parse(net.peer_id("n1")).dht_id)
    assert isinstance(nodes, list) and nodes
    # ...and through its CLI; others still find it
    assert net.node(target).running()
    status = net.cli(target, "status")
    assert normalize_peer_id(status["peer_id"]) == normalize_peer_id(net.peer_id(target))
    _assert_genuine(net, "n1", _lookup(net, target, net.peer_id("n1")))
    _assert_genuine(net, target, _lookup(net, "n3", net.peer_id(target)))
    log = net.node(target).node_log.read_text(errors="replace")
    assert "Traceback" not in log and "exception was never retrieved" not in log


# -- 5. peers learned through the DHT -----------------------------------------------------


def test_node_that_never_saw_the_bootstrap_server_lists_dht_peers(net: Testnet) -> None:
    net.add_nodes(["loner"], bootstrap=False, bootstrap_peers=["n8"])
    ours = {normalize_peer_id(net.peer_id(n)) for n in net.nodes}

    def dht_peers() -> list[dict[str, Any]] | None:
        peers = net.cli("loner", "peers")
        from_dht = [p for p in peers if "dht" in p["source"].split(",")]
        return from_dht if len(from_dht) >= N_NODES // 2 else None

    from_dht = net.wait_until(dht_peers, JOIN_TIMEOUT_S, interval=1.0,
                              what="loner lists peers found through the DHT")
    for p in from_dht:
        assert normalize_peer_id(p["peer_id"]) in ours
        assert "bootstrap" not in p["source"]
        name = net.name_of(p["peer_id"])
        assert name is not None and p["name"] == name
        assert p["ports"]["dht"] == _dht_port(net, name)
    peers = net.cli("loner", "peers")
    assert all("bootstrap" not in p["source"] for p in peers)
    assert normalize_peer_id(net.peer_id("loner")) not in {
        normalize_peer_id(p["peer_id"]) for p in peers}

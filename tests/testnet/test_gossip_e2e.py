"""End-to-end tests of the change log, gossip and folder sync with real node processes.

Four real `node start` processes (A, B, C, D) and a bootstrap server on
127.0.0.1, started once for the module through scripts/testnet_lib.py. Trust:
A, B and C all trust each other; A and D trust each other; B and C do not
trust D (so D's events reach them only relayed by A). A and B also share the
folder inside their received dir where the other's folder is synced (a node
refuses to share its whole received dir), so a sync write that the watcher
failed to recognise as the node's own would be announced again (an echo loop)
and show up in the logs.

The tests look at nodes only from the outside, as a user does: `node log
--json`, `node events --json`, `node transfers --json`, the files on disk,
and (read-only) the event log database to prove that a relayed event did
arrive. Test 3 plays a hostile peer with its own Identity over a real
authenticated channel (node.peering's ServiceRequest("gossip")).

Imports scripts/testnet_lib.py and, for the hostile peer only, node.identity,
node.channel, node.transports, node.peering and node.gossip; it must not
import the daemon.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import blake3
from testnet_lib import Testnet, normalize_peer_id

from node.channel import open_channel
from node.gossip.engine import Push
from node.gossip.events import ChangeEvent
from node.identity import Identity, PeerId, load_identity
from node.peering import ServiceRequest
from node.transports import get_transport

pytestmark = pytest.mark.slow

JOIN_TIMEOUT_S = 45.0
# how long a change may take to be logged/applied on a peer before the test fails;
# generous because every poll is a fresh CLI process on a shared 2-core machine
SPREAD_TIMEOUT_S = 20.0
# the daemon-side delay (origin wall clock -> peer notification clock; one machine,
# one clock) that "within a few seconds" means
NOTIFY_DEADLINE_MS = 5000
QUIET_PERIOD_S = 4.0
POLL_S = 0.3
VERSIONS_DIR = ".p2pfs-versions"


# -- helpers ---------------------------------------------------------------------------


def content_hash(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def notes(net: Testnet, name: str, since: int = 0) -> list[dict[str, Any]]:
    """`node events --json --since N`: one JSON object per line."""
    res = net.cli(name, "events", "--json", "--since", str(since), json=False)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def last_note_id(net: Testnet, name: str) -> int:
    res = net.cli(name, "events", "--json", json=False)
    ids = [json.loads(line)["id"] for line in res.stdout.splitlines() if line.strip()]
    return max(ids, default=0)


def log_of(net: Testnet, name: str, *args: str) -> list[dict[str, Any]]:
    rows = net.cli(name, "log", *args)
    assert isinstance(rows, list)
    return rows


def same_peer(a: str, b: str) -> bool:
    return normalize_peer_id(a) == normalize_peer_id(b)


def find_event(rows: list[dict[str, Any]], origin: str, kind: str, path: str
               ) -> dict[str, Any] | None:
    for r in rows:
        if same_peer(r["origin"], origin) and r["kind"] == kind and r["path"] == path:
            return r
    return None


def wait_logged(net: Testnet, name: str, origin: str, kind: str, path: str,
                timeout: float = SPREAD_TIMEOUT_S) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return find_event(log_of(net, name, "--path", path), origin, kind, path)

    return net.wait_until(found, timeout, POLL_S,  # type: ignore[no-any-return]
                          what=f"{name} logs {kind} {path}")


def wait_note(net: Testnet, name: str, since: int, kind: str, event_id: str,
              timeout: float = SPREAD_TIMEOUT_S) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for n in notes(net, name, since):
            if n["kind"] == kind and n["data"].get("id") == event_id:
                return n
        return None

    return net.wait_until(found, timeout, POLL_S,  # type: ignore[no-any-return]
                          what=f"{name} notifies {kind} for event {event_id[:12]}")


def wait_file(net: Testnet, path: Path, data: bytes, timeout: float = SPREAD_TIMEOUT_S) -> None:
    def same() -> bool:
        return path.is_file() and path.read_bytes() == data

    net.wait_until(same, timeout, POLL_S, what=f"{path} holds {len(data)} expected bytes")


def serves(net: Testnet, name: str) -> list[dict[str, Any]]:
    return [t for t in net.cli(name, "transfers") if t["direction"] == "serve"]


def stored_event(home: Path, event_id: str) -> tuple[int, bytes] | None:
    """(relay_only, origin key) of an event in a node's own event log, read-only."""
    db = sqlite3.connect(f"file:{home / 'events.db'}?mode=ro", uri=True, timeout=5.0)
    try:
        row = db.execute("SELECT relay_only, origin FROM events WHERE id=?",
                         (bytes.fromhex(event_id),)).fetchone()
    finally:
        db.close()
    return (int(row[0]), bytes(row[1])) if row else None


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- the network -------------------------------------------------------------------------


class Net:
    """The module's testnet plus the paths the tests need."""

    def __init__(self, net: Testnet, root: Path) -> None:
        self.net = net
        self.root = root
        self.docs = root / "data" / "A" / "docs"            # A's shared folder
        self.bdocs = root / "data" / "B" / "bdocs"          # B's shared folder
        self.dshare = root / "data" / "D" / "dshare"        # D's shared folder
        self.inbox = {n: root / "data" / n / f"inbox_{n}" for n in "ABCD"}

    def pid(self, name: str) -> str:
        return self.net.peer_id(name)

    def copy_on(self, name: str, origin: str, folder: str, rel: str) -> Path:
        """Where `name` keeps its copy of `origin`'s `folder/rel` (alias = node name)."""
        return self.inbox[name] / origin / folder / rel


TRUST_PAIRS = [("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")]


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("gossip-e2e")
    with Testnet(root / "net") as testnet:
        n = Net(testnet, root)
        a_synced, b_synced = n.inbox["A"] / "B" / "bdocs", n.inbox["B"] / "A" / "docs"
        for d in [n.docs, n.bdocs, n.dshare, *n.inbox.values(), a_synced, b_synced]:
            d.mkdir(parents=True)
        testnet.start_bootstrap(ttl_s=60)
        testnet.add_node("A", share=[n.docs, a_synced], received_dir=n.inbox["A"],
                         start=False)
        testnet.add_node("B", share=[n.bdocs, b_synced], received_dir=n.inbox["B"],
                         start=False)
        testnet.add_node("C", received_dir=n.inbox["C"], start=False)
        testnet.add_node("D", share=[n.dshare], received_dir=n.inbox["D"], start=False)
        # trust is written before the daemons start (the CLI writes trust.db offline)
        for a, b in TRUST_PAIRS:
            testnet.cli(a, "trust", testnet.peer_id(b), "--name", b, json=False)
            testnet.cli(b, "trust", testnet.peer_id(a), "--name", a, json=False)
        testnet.start_many(["A", "B", "C", "D"])
        testnet.wait_all_see_each_other(timeout=JOIN_TIMEOUT_S)
        yield n


# -- 1. create / edit / rename / delete spread, are logged, notified and applied ----------


def test_change_is_logged_notified_and_synced_on_peers(tn: Net) -> None:
    net, a = tn.net, tn.pid("A")
    since = {p: last_note_id(net, p) for p in ("B", "C")}
    src = tn.docs / "report.txt"
    v1, v2 = b"first draft\n", b"second draft, longer than the first\n" * 50

    write(src, v1)
    created = wait_logged(net, "A", a, "created", "report.txt")
    assert created["hash"] == content_hash(v1) and created["size"] == len(v1)
    assert created["origin_label"] == "me"
    for peer in ("B", "C"):
        wait_logged(net, peer, a, "created", "report.txt")
        note = wait_note(net, peer, since[peer], "file_shared", created["id"])
        assert note["at_ms"] - created["wall_ms"] < NOTIFY_DEADLINE_MS
        wait_file(net, tn.copy_on(peer, "A", "docs", "report.txt"), v1)

    write(src, v2)
    edited = wait_logged(net, "A", a, "modified", "report.txt")
    assert edited["seq"] > created["seq"] and edited["hash"] == content_hash(v2)
    for peer in ("B", "C"):
        row = wait_logged(net, peer, a, "modified", "report.txt")
        assert row["id"] == edited["id"] and row["origin_label"] == "A" and row["trusted"]
        note = wait_note(net, peer, since[peer], "file_updated", edited["id"])
        assert note["at_ms"] - edited["wall_ms"] < NOTIFY_DEADLINE_MS, note
        wait_file(net, tn.copy_on(peer, "A", "docs", "report.txt"), v2)
    # the replaced copy was kept as a version, not destroyed
    old = list((tn.inbox["B"] / "A" / VERSIONS_DIR / "docs").glob("report.txt~*"))
    assert [p.read_bytes() for p in old] == [v1]

    # rename: applied as a move on the peers, with no new transfer served by A
    served_before = len(serves(net, "A"))
    assert served_before >= 2  # B and C fetched v1 or v2 from A
    src.rename(tn.docs / "final.txt")
    moved = wait_logged(net, "A", a, "moved", "final.txt")
    assert moved["old_path"] == "report.txt"
    for peer in ("B", "C"):
        wait_logged(net, peer, a, "moved", "final.txt")
        wait_note(net, peer, since[peer], "file_moved", moved["id"])
        wait_file(net, tn.copy_on(peer, "A", "docs", "final.txt"), v2)
        assert not tn.copy_on(peer, "A", "docs", "report.txt").exists()
    assert len(serves(net, "A")) == served_before, "a rename was transferred again"

    # delete: B's copy goes into the versions folder, nothing is destroyed
    (tn.docs / "final.txt").unlink()
    deleted = wait_logged(net, "A", a, "deleted", "final.txt")
    for peer in ("B", "C"):
        wait_logged(net, peer, a, "deleted", "final.txt")
        wait_note(net, peer, since[peer], "file_deleted", deleted["id"])
        copy = tn.copy_on(peer, "A", "docs", "final.txt")
        net.wait_until(lambda c=copy: not c.exists(), SPREAD_TIMEOUT_S, POLL_S,  # type: ignore[misc]
                       what=f"{peer}'s copy of final.txt is moved away")
    kept = list((tn.inbox["B"] / "A" / VERSIONS_DIR / "docs").glob("final.txt~*"))
    assert [p.read_bytes() for p in kept] == [v2]


# -- 2. a node stopped during changes catches up after restart (anti-entropy) --------------


def test_stopped_node_catches_up_after_restart(tn: Net) -> None:
    net, a = tn.net, tn.pid("A")
    net.stop("C")
    one, two, three = b"one\n" * 10, b"two\n" * 20, b"one, edited while C was away\n"
    write(tn.docs / "away" / "one.txt", one)
    ev1 = wait_logged(net, "A", a, "created", "away/one.txt")
    write(tn.docs / "away" / "two.txt", two)
    ev2 = wait_logged(net, "A", a, "created", "away/two.txt")
    write(tn.docs / "away" / "one.txt", three)
    ev3 = wait_logged(net, "A", a, "modified", "away/one.txt")
    assert ev1["seq"] < ev2["seq"] < ev3["seq"]
    # B, online all along, has them already; C is down
    wait_logged(net, "B", a, "modified", "away/one.txt")
    assert not net.node("C").running()

    net.start("C")
    want = {ev1["id"], ev2["id"], ev3["id"]}

    def caught_up() -> bool:
        return want <= {r["id"] for r in log_of(net, "C", "--peer", "A")}

    net.wait_until(caught_up, 40, 0.5, what="C's log holds the 3 changes it missed")
    wait_file(net, tn.copy_on("C", "A", "docs", "away/one.txt"), three, timeout=30)
    wait_file(net, tn.copy_on("C", "A", "docs", "away/two.txt"), two, timeout=30)
    # and C's log has no gaps for A: every seq up to the last one is there
    seqs = sorted(r["seq"] for r in log_of(net, "C", "--peer", "A"))
    assert seqs == list(range(1, ev3["seq"] + 1))


# -- 3. forged and replayed events pushed by a hostile (but trusted) peer -------------------


async def _push_events(me: Identity, target: PeerId, port: int, blobs: list[bytes]) -> None:
    """Open an authenticated gossip channel to `target` and push each blob on its own."""
    pipe = await get_transport("tcp").connect("127.0.0.1", port, timeout=5.0)
    channel = await open_channel(pipe, me, expected_peer=target, authorize=lambda _p: None)
    try:
        await channel.send(ServiceRequest("gossip").encode())
        for blob in blobs:
            await channel.send(Push((blob,)).encode())
        await asyncio.sleep(1.0)  # let B read them before we hang up
    finally:
        await channel.close()


def test_forged_and_replayed_events_are_rejected(tn: Net) -> None:
    net, a = tn.net, tn.pid("A")
    original = b"the real victim file\n"
    write(tn.docs / "victim.txt", original)
    real = wait_logged(net, "A", a, "created", "victim.txt")
    wait_logged(net, "B", a, "created", "victim.txt")
    copy = tn.copy_on("B", "A", "docs", "victim.txt")
    wait_file(net, copy, original)

    mallory = Identity.generate(name="mallory")
    net.cli("B", "trust", str(mallory.peer_id), "--name", "mallory", json=False)
    since = last_note_id(net, "B")
    evil = b"evil content\n"
    a_id = PeerId.parse(a)
    fields: dict[str, Any] = {"folder": "docs", "kind": "modified", "path": "victim.txt",
                              "size": len(evil), "hash": bytes.fromhex(content_hash(evil))}

    # (a) claims to come from A but is signed by mallory: a bad signature
    signed_by_mallory = ChangeEvent.create(mallory, seq=real["seq"] + 1000,
                                           lamport=real["lamport"] + 1000, **fields)
    forged = ChangeEvent(a_id, "docs", signed_by_mallory.seq, signed_by_mallory.lamport,
                         signed_by_mallory.wall_ms, "modified", "victim.txt", "", len(evil),
                         fields["hash"], signed_by_mallory.signature)
    # (b) really signed with A's key (a leaked key, or A equivocating) but reusing the
    # (origin, seq) of the event B already holds, with different content
    a_key = load_identity(net.node("A").home)
    reused = ChangeEvent.create(a_key, seq=real["seq"], lamport=real["lamport"], **fields)
    assert reused.id != real["id"]
    # (c) a byte-exact replay of an event B already has: silently a duplicate
    genuine = ChangeEvent.create(a_key, folder=real["folder"], seq=real["seq"],
                                 lamport=real["lamport"], kind=real["kind"], path=real["path"],
                                 size=real["size"], hash=bytes.fromhex(real["hash"]),
                                 wall_ms=real["wall_ms"])
    assert genuine.id.hex() == real["id"]  # Ed25519 is deterministic

    port = int(net.node("B").ports["tcp"])
    asyncio.run(_push_events(mallory, PeerId.parse(net.peer_id("B")),
                             port, [forged.encode(), reused.encode(), genuine.encode()]))

    def rejections() -> list[dict[str, Any]] | None:
        found = [n for n in notes(net, "B", since) if n["kind"] == "event_rejected"]
        return found if len(found) >= 2 else None

    rejected = net.wait_until(rejections, SPREAD_TIMEOUT_S, POLL_S,
                              what="B notifies event_rejected twice")
    reasons = sorted(n["data"]["reason"] for n in rejected)
    assert len(rejected) == 2, rejected
    assert any("bad signature" in r for r in reasons), reasons
    assert any("sequence number reused" in r for r in reasons), reasons
    for n in rejected:
        assert same_peer(n["data"]["via"], str(mallory.peer_id))
        assert same_peer(n["data"]["origin"], a)
    time.sleep(1.0)
    # neither is in B's log, nothing was notified as a change, B's copy is untouched
    rows = log_of(net, "B", "--path", "victim.txt")
    assert [r["id"] for r in rows] == [real["id"]]
    later = [n for n in notes(net, "B", since) if n["kind"] != "event_rejected"
             and n["kind"] not in ("peer_joined", "peer_left")]
    assert later == [], later
    assert copy.read_bytes() == original
    # and neither was relayed: A and C never saw them either
    assert [r["id"] for r in log_of(net, "C", "--path", "victim.txt")] == [real["id"]]
    assert stored_event(net.node("C").home, reused.id.hex()) is None
    assert stored_event(net.node("C").home, forged.id.hex()) is None


# -- 4. an untrusted origin's events are relayed, never acted on -------------------------


def test_untrusted_origin_is_relayed_but_not_applied(tn: Net) -> None:
    net, d = tn.net, tn.pid("D")
    since = {p: last_note_id(net, p) for p in ("A", "B")}
    data = b"from D, whom B does not trust\n"
    write(tn.dshare / "d-note.txt", data)
    ev = wait_logged(net, "D", d, "created", "d-note.txt")
    # A trusts D: logs, notifies and syncs it
    wait_logged(net, "A", d, "created", "d-note.txt")
    wait_note(net, "A", since["A"], "file_shared", ev["id"])
    wait_file(net, tn.copy_on("A", "D", "dshare", "d-note.txt"), data)

    # B gets it by relay from A (stored relay-only: proves the event did arrive)
    def relayed() -> tuple[int, bytes] | None:
        return stored_event(net.node("B").home, ev["id"])

    relay_only, origin = net.wait_until(relayed, SPREAD_TIMEOUT_S, POLL_S,
                                        what="B stores D's event (relayed by A)")
    assert relay_only == 1 and origin == PeerId.parse(d).key
    time.sleep(1.0)  # any (wrong) sync would have started by now
    assert find_event(log_of(net, "B"), d, "created", "d-note.txt") is None
    assert [n for n in notes(net, "B", since["B"])
            if n["data"].get("id") == ev["id"] or n["data"].get("path") == "d-note.txt"] == []
    assert not list(tn.inbox["B"].rglob("d-note.txt*"))
    assert not list(tn.inbox["B"].rglob("*dshare*"))
    assert not any(same_peer(t["peer_id"], d) for t in net.cli("B", "transfers"))


# -- 5. no echo loop when two nodes share with each other --------------------------------


def test_no_echo_loop_between_sharing_peers(tn: Net) -> None:
    net, a, b = tn.net, tn.pid("A"), tn.pid("B")
    # A and B share where they keep the other's folder: B's sync write of A's file lands
    # in a folder B's watcher watches, and vice versa
    count = {n: len(log_of(net, n)) for n in ("A", "B", "C")}
    b_own = len(log_of(net, "B", "--peer", b))
    a_own = len(log_of(net, "A", "--peer", a))
    write(tn.docs / "ping.txt", b"one change on A\n")
    ev = wait_logged(net, "A", a, "created", "ping.txt")
    wait_logged(net, "B", a, "created", "ping.txt")
    wait_file(net, tn.copy_on("B", "A", "docs", "ping.txt"), b"one change on A\n")
    # and one change on B, landing in A's shared inbox
    write(tn.bdocs / "pong.txt", b"one change on B\n")
    ev_b = wait_logged(net, "B", b, "created", "pong.txt")
    wait_file(net, tn.copy_on("A", "B", "bdocs", "pong.txt"), b"one change on B\n")
    time.sleep(QUIET_PERIOD_S)  # an echo would need a watcher debounce plus a gossip hop

    for n in ("A", "B", "C"):
        rows = log_of(net, n)
        assert len(rows) == count[n] + 2, (n, rows[count[n]:])
        assert {r["id"] for r in rows[count[n]:]} == {ev["id"], ev_b["id"]}
    assert len(log_of(net, "B", "--peer", b)) == b_own + 1
    assert len(log_of(net, "A", "--peer", a)) == a_own + 1

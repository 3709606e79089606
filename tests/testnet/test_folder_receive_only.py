"""A receive-only folder with real node processes (issue 11, Tests: "a receive-only
folder's local edit is reported and revertible").

A (send-receive) and B (receive-only) share the folder "inbox". An edit on B is
reported as locally changed (`node folder status --json` and a `locally_changed`
notification), never reaches A, and `node folder revert` brings back A's version
byte for byte, B's edit kept in B's versions folder.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet

from node.folders.config import FolderConfig, FolderMode, FolderStore
from node.folders.db import FolderDB
from node.folders.model import FileInfo
from node.identity import PeerId

pytestmark = pytest.mark.slow

SPREAD_TIMEOUT_S = 20.0
POLL_S = 0.2
FOLDER_ID = "inbox"


class Pair:
    def __init__(self, net: Testnet, root: Path) -> None:
        self.net = net
        self.root = root

    def dir(self, name: str) -> Path:
        return self.root / "data" / name / FOLDER_ID

    def holds(self, name: str, rel: str, data: bytes) -> bool:
        p = self.dir(name) / rel
        try:
            return p.read_bytes() == data
        except OSError:
            return False

    def wait_file(self, name: str, rel: str, data: bytes) -> None:
        self.net.wait_until(lambda: self.holds(name, rel, data), SPREAD_TIMEOUT_S, POLL_S,
                            what=f"{name}:{rel} holds {data[:20]!r}")

    def status(self, name: str) -> dict[str, Any]:
        row: dict[str, Any] = self.net.cli(name, "folder", "status", FOLDER_ID)
        return row

    def versions(self, name: str) -> list[bytes]:
        vroot = self.dir(name) / ".p2pfs-versions"
        return [(Path(d) / f).read_bytes() for d, _s, fs in os.walk(vroot) for f in fs]

    def index_on(self, name: str, device: str) -> dict[str, FileInfo]:
        """What node `name` has recorded of `device`'s index (read beside the running node)."""
        db = FolderDB(self.net.node(name).home / f"folder-{FOLDER_ID}.db")
        try:
            return db.remote_index(PeerId.parse(self.net.peer_id(device)).key)
        finally:
            db.close()

    def events(self, name: str, kind: str) -> list[dict[str, Any]]:
        res = self.net.cli(name, "events", "--since", "0", "--json", json=False)
        rows = [json.loads(line) for line in res.stdout.splitlines() if line]
        return [r for r in rows if r.get("kind") == kind]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("recvonly")
    names = ("A", "B")
    with Testnet(root / "net") as net:
        net.start_bootstrap()
        net.add_nodes(names, start=False)
        for name, mode in (("A", FolderMode.SEND_RECEIVE), ("B", FolderMode.RECEIVE_ONLY)):
            path = (root / "data" / name / FOLDER_ID).resolve()
            path.mkdir(parents=True)
            store = FolderStore.load(net.node(name).home)
            other = "B" if name == "A" else "A"
            store.put(FolderConfig(FOLDER_ID, path, (PeerId.parse(net.peer_id(other)),),
                                   mode=mode))
            store.save()
        net.start_many(names)
        net.trust_all()
        net.wait_all_see_each_other()
        yield Pair(net, root)


def test_a_local_edit_is_reported_never_sent_and_revert_restores_the_global_version(
        pair: Pair) -> None:
    net = pair.net
    global_data = os.urandom(64 << 10) + b"A's version"
    (pair.dir("A") / "report.txt").write_bytes(global_data)
    pair.wait_file("B", "report.txt", global_data)

    (pair.dir("B") / "report.txt").write_bytes(b"B's local edit")
    net.wait_until(lambda: pair.status("B")["status"]["locally_changed"] == 1,
                   SPREAD_TIMEOUT_S, POLL_S, what="B reports one locally changed file")
    st = pair.status("B")["status"]
    assert st["locally_changed_names"] == ["report.txt"]
    net.wait_until(lambda: pair.events("B", "locally_changed"), SPREAD_TIMEOUT_S, POLL_S,
                   what="a locally_changed notification on B")
    (note,) = pair.events("B", "locally_changed")
    assert note["data"]["folder"] == FOLDER_ID and note["data"]["paths"] == ["report.txt"]

    # proof that B announced nothing: B announces what it fetches, over the channel its
    # edit would have gone by; once A has heard that B holds later.txt (made on A after
    # B's edit), B's index on A still says B holds A's report.txt
    (pair.dir("A") / "later.txt").write_bytes(b"made on A after B's edit")
    pair.wait_file("B", "later.txt", b"made on A after B's edit")
    net.wait_until(lambda: "later.txt" in pair.index_on("A", "B"), SPREAD_TIMEOUT_S, POLL_S,
                   what="A hears that B holds later.txt")
    ours = pair.index_on("A", "A")["report.txt"]
    assert pair.index_on("A", "B")["report.txt"].hash == ours.hash
    assert pair.holds("A", "report.txt", global_data)
    assert pair.status("A")["status"]["locally_changed"] == 0

    res = net.cli("B", "folder", "revert", FOLDER_ID)
    assert res["reverted"] == 1
    pair.wait_file("B", "report.txt", global_data)  # byte-identical to the sender's
    assert b"B's local edit" in pair.versions("B")  # nothing lost
    net.wait_until(lambda: pair.status("B")["status"]["locally_changed"] == 0,
                   SPREAD_TIMEOUT_S, POLL_S, what="nothing locally changed after revert")
    assert pair.holds("A", "report.txt", global_data)


def test_an_offer_carries_the_offering_device_s_label(pair: Pair) -> None:
    """Issue 11 item 1: a folder B has not added becomes a folder_offered notification on
    B, with A's label of it (added on the running A; nothing syncs)."""
    net = pair.net
    photos = pair.root / "data" / "A" / "photos"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(b"jpeg")
    net.cli("A", "folder", "add", str(photos), "--id", "photos", "--peer", net.peer_id("B"),
            "--label", "Family photos")

    def offered() -> list[dict[str, Any]]:
        return [e for e in pair.events("B", "folder_offered")
                if e["data"].get("folder_id") == "photos"]
    net.wait_until(offered, SPREAD_TIMEOUT_S, POLL_S, what="folder_offered on B")
    (note,) = offered()
    assert note["data"]["label"] == "Family photos"
    assert note["data"]["peer_id"] == net.peer_id("A")
    human = net.cli("B", "events", "--since", "0", json=False).stdout
    assert "offers folder photos ('Family photos')" in human
    assert not (pair.root / "data" / "B" / "photos").exists()

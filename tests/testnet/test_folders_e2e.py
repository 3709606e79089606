"""Two-way shared folders with real node processes (issue 11).

Three real `node start` processes A, B, C on 127.0.0.1 (scripts/testnet_lib.py),
trusting each other, each with the folder id "docs" at its own path, shared
with the two others (folders.json written with FolderStore before the start).
The tests look at the folders on disk only, as a user would.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet

from node.folders.config import FolderConfig, FolderMode, FolderStore
from node.identity import PeerId

pytestmark = pytest.mark.slow

SPREAD_TIMEOUT_S = 20.0
POLL_S = 0.2
NAMES = ("A", "B", "C")


class Folders:
    def __init__(self, net: Testnet, root: Path) -> None:
        self.net = net
        self.root = root

    def dir(self, name: str) -> Path:
        return self.root / "data" / name / "docs"

    def wait_file(self, name: str, rel: str, data: bytes,
                  timeout: float = SPREAD_TIMEOUT_S) -> None:
        path = self.dir(name) / rel

        def same() -> bool:
            return path.is_file() and path.read_bytes() == data

        self.net.wait_until(same, timeout, POLL_S, what=f"{name}:{rel} holds {data[:20]!r}")

    def tree(self, name: str) -> dict[str, bytes]:
        out = {}
        base = self.dir(name)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != ".p2pfs-versions"]
            for f in filenames:
                p = Path(dirpath) / f
                out[p.relative_to(base).as_posix()] = p.read_bytes()
        return out


def write_folders(net: Testnet, root: Path, name: str, mode: FolderMode) -> None:
    path = (root / "data" / name / "docs").resolve()
    path.mkdir(parents=True, exist_ok=True)
    store = FolderStore.load(net.node(name).home)
    peers = tuple(PeerId.parse(net.peer_id(o)) for o in NAMES if o != name)
    store.put(FolderConfig("docs", path, peers, mode=mode))
    store.save()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Folders]:
    root = tmp_path_factory.mktemp("folders")
    with Testnet(root / "net") as net:
        net.start_bootstrap()
        net.add_nodes(NAMES, start=False)
        for name in NAMES:
            write_folders(net, root, name, FolderMode.SEND_RECEIVE)
        net.start_many(NAMES)
        net.trust_all()
        net.wait_all_see_each_other()
        yield Folders(net, root)


def test_edits_on_each_side_arrive_on_the_others(folders: Folders) -> None:
    (folders.dir("A") / "from-a.txt").write_bytes(b"written on A")
    (folders.dir("B") / "sub").mkdir()
    (folders.dir("B") / "sub" / "from-b.txt").write_bytes(b"written on B")
    for name in NAMES:
        folders.wait_file(name, "from-a.txt", b"written on A")
        folders.wait_file(name, "sub/from-b.txt", b"written on B")
    (folders.dir("C") / "from-a.txt").write_bytes(b"edited on C")
    for name in NAMES:
        folders.wait_file(name, "from-a.txt", b"edited on C")


def test_offline_edit_and_concurrent_edit_both_survive_everywhere(folders: Folders) -> None:
    net = folders.net
    (folders.dir("A") / "plan.txt").write_bytes(b"base")
    for name in NAMES:
        folders.wait_file(name, "plan.txt", b"base")
    net.stop("B")
    (folders.dir("B") / "plan.txt").write_bytes(b"B edited while stopped")
    old = time.time() - 3600
    os.utime(folders.dir("B") / "plan.txt", (old, old))  # the older edit: B's loses
    (folders.dir("A") / "plan.txt").write_bytes(b"A edited meanwhile")
    for name in ("A", "C"):
        folders.wait_file(name, "plan.txt", b"A edited meanwhile")
    net.start("B")

    def both_everywhere() -> bool:
        for name in NAMES:
            tree = folders.tree(name)
            copies = [v for k, v in tree.items() if k.startswith("plan.sync-conflict-")]
            if tree.get("plan.txt") != b"A edited meanwhile" or copies != [
                    b"B edited while stopped"]:
                return False
        return True

    net.wait_until(both_everywhere, SPREAD_TIMEOUT_S, POLL_S,
                   what="plan.txt is A's edit and B's edit is a conflict copy on all three")

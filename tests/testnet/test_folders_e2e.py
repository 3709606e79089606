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


def test_ignore_patterns_are_respected(folders: Folders) -> None:
    (folders.dir("C") / ".p2pfsignore").write_text("*.bak\nbuild/\n")
    (folders.dir("A") / "draft.bak").write_bytes(b"A's backup")
    (folders.dir("C") / "build").mkdir()
    (folders.dir("C") / "build" / "out.o").write_bytes(b"C's object file")
    (folders.dir("A") / "after-ignore.txt").write_bytes(b"marker")
    folders.wait_file("C", "after-ignore.txt", b"marker")  # A's scan that held draft.bak
    folders.wait_file("B", "draft.bak", b"A's backup")  # B does not ignore it
    (folders.dir("C") / "marker2.txt").write_bytes(b"after build/")
    for name in ("A", "B"):
        folders.wait_file(name, "marker2.txt", b"after build/")
    assert "draft.bak" not in folders.tree("C")  # ignored where it would land
    for name in ("A", "B"):  # never announced
        tree = folders.tree(name)
        assert "build/out.o" not in tree and ".p2pfsignore" not in tree


def test_fetch_completes_from_another_device_when_the_origin_is_offline(
        folders: Folders) -> None:
    net = folders.net
    net.stop("B")
    (folders.dir("A") / "only-on-a.txt").write_bytes(b"A made this, C got it")
    folders.wait_file("C", "only-on-a.txt", b"A made this, C got it")
    net.stop("A")
    try:
        net.start("B")
        folders.wait_file("B", "only-on-a.txt", b"A made this, C got it")
    finally:
        net.start("A")


def test_kill_9_of_the_source_mid_fetch_resumes_identical(folders: Folders) -> None:
    net = folders.net
    size = 96 << 20  # long enough to be caught mid-transfer
    data = os.urandom(1 << 20) * (size >> 20)
    incoming = net.node("B").home / "folder-staging" / "docs"

    def partials(suffix: str) -> list[Path]:
        return [Path(d) / f for d, _s, fs in os.walk(incoming) for f in fs
                if f.endswith(suffix)]

    (folders.dir("A") / "big.bin").write_bytes(data)
    # a resume state saved: some chunks verified and recorded
    net.wait_until(lambda: partials(".p2pfs-state"), SPREAD_TIMEOUT_S, 0.01,
                   what="B records verified chunks of big.bin")
    net.kill("A")
    net.kill("C")  # C may have some of it too: the one source left is A, restarted
    try:
        net.start("A")
        folders.wait_file("B", "big.bin", data, timeout=30.0)
    finally:
        net.start("C")
    fetches = [t for t in net.cli("B", "transfers") if t["direction"] == "fetch"
               and t["state"] == "done" and any("big.bin" in p for p in t["paths"])]
    assert fetches, "B lists its fetch of big.bin"
    moved = fetches[-1]["bytes_on_wire"]
    assert 0 < moved < size, f"the fetch after the restart moved {moved} of {size} bytes"
    # nothing half-done is left behind once nothing is needed any more
    net.wait_until(lambda: not any(f.endswith(".p2pfs-part") for where in (
        folders.dir("B"), incoming) for _d, _s, fs in os.walk(where) for f in fs),
        SPREAD_TIMEOUT_S, POLL_S, what="no .p2pfs-part left on B")


def test_a_two_byte_append_to_a_big_file_moves_at_most_one_chunk(folders: Folders) -> None:
    """Issue 11 item 6: the receivers reuse every chunk of their old version."""
    from node.transfer.manifest import DEFAULT_CHUNK_SIZE_BYTES

    net = folders.net
    size = 32 << 20  # 32 MiB: 32 chunks, so an append changes only the last one
    staged = folders.root / "big.staged"
    staged.write_bytes(os.urandom(size))
    os.replace(staged, folders.dir("A") / "big.bin")  # appears whole
    data = (folders.dir("A") / "big.bin").read_bytes()

    def holds(name: str, want: bytes) -> bool:
        p = folders.dir(name) / "big.bin"
        try:
            return p.stat().st_size == len(want) and p.read_bytes() == want
        except OSError:
            return False

    for name in ("B", "C"):
        net.wait_until(lambda n=name: holds(n, data), 60.0, POLL_S, what=f"{name} has big.bin")
    seen = {n: {t["id"] for t in net.cli(n, "transfers")} for n in NAMES}
    with open(folders.dir("A") / "big.bin", "ab") as f:
        f.write(b"!\n")
    data += b"!\n"
    for name in ("B", "C"):
        net.wait_until(lambda n=name: holds(n, data), 60.0, POLL_S,
                       what=f"{name} has the appended big.bin")
    # what the serving side sent (manifest and chunks) for big.bin since the append: C
    # may fetch from B, so every node's "serve" transfers count
    served = [t for n in NAMES for t in net.cli(n, "transfers") if t["id"] not in seen[n]
              and t["direction"] == "serve" and any(p.endswith("/big.bin") for p in t["paths"])]
    assert served, "no node served the new version of big.bin"
    moved = sum(t["bytes_on_wire"] for t in served)
    assert moved <= 2 * DEFAULT_CHUNK_SIZE_BYTES, f"{moved} B served for a 2-byte append"

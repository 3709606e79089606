"""The node never publishes its own home, keeps it private, and resolves paths once.

Real `node start` processes through scripts/testnet_lib.py: A shares a folder
holding files named like node state (identity.key, trust.db); B runs with a
*relative* --home and shares, also by a relative path, the folder inside its
received dir where A's folder is synced, so an own-write the watcher failed to
recognise would be announced again as B's change (an echo). A third node is
only ever started with a --share that would publish its home: it must exit 2
with one line and start nothing.

Looks at nodes only from the outside: exit codes, stderr, `node log --json`,
`node status --json`, node.log and file modes on disk; the last test plays B
over a real authenticated fetch channel (node.channel, node.transfer.session).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id

pytestmark = pytest.mark.slow

JOIN_TIMEOUT_S = 45.0
SPREAD_TIMEOUT_S = 20.0
REFUSE_TIMEOUT_S = 20.0
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


@dataclass
class Net:
    net: Testnet
    data: Path
    docs: Path  # A's shared folder
    b_synced: Path  # where B keeps A's docs, shared by B as well

    def own_log(self, name: str) -> list[dict[str, Any]]:
        rows = self.net.cli(name, "log", "--peer", self.net.peer_id(name))
        return [r for r in rows if r["origin_label"] == "me"]


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("home-safety")
    with Testnet(root / "net") as net:
        data = root / "data"
        docs = data / "docs"
        docs.mkdir(parents=True)
        (docs / "identity.key").write_bytes(os.urandom(64))  # sorts before readme.txt
        (docs / "trust.db").write_bytes(b"a node's trust list")
        (docs / "readme.txt").write_bytes(b"hello\n")
        net.start_bootstrap(ttl_s=60)
        net.add_node("A", share=[docs], start=False)
        # the harness passes an absolute --home first; the later relative one wins, and
        # node processes run with cwd = net.root, so "nodes/B" is B's home dir
        net.add_node("B", start=False, extra_args=[
            "--home", "nodes/B", "--share", "nodes/B/received/A/docs"])
        b_synced = net.node("B").home / "received" / "A" / "docs"
        b_synced.mkdir(parents=True)
        net.cli("A", "trust", net.peer_id("B"), "--name", "B", json=False)
        net.cli("B", "trust", net.peer_id("A"), "--name", "A", json=False)
        net.start_many(["A", "B"])
        net.wait_all_see_each_other(["A", "B"], timeout=JOIN_TIMEOUT_S)
        yield Net(net, data, docs, b_synced)


def _refused_start(net: Testnet, name: str, *args: str) -> Any:
    return net.cli(name, "start", "--listen-host", "127.0.0.1", "--tcp-port", "0",
                   "--udp-port", "0", "--quic-port", "0", "--dht-port", "0", *args,
                   json=False, check=False, timeout=REFUSE_TIMEOUT_S)


def test_start_refuses_a_shared_folder_holding_the_home(tn: Net) -> None:
    net = tn.net
    net.add_node("C", start=False)
    home = net.node("C").home
    inbox_parent = tn.data / "c-share"
    (inbox_parent / "inbox").mkdir(parents=True)
    cases = [
        (["--share", str(home.parent)], "contains this node's home dir"),  # like `--share ~`
        (["--share", str(home)], "contains this node's home dir"),
        (["--share", str(inbox_parent), "--received-dir", str(inbox_parent / "inbox")],
         "contains this node's received dir"),
    ]
    for args, message in cases:
        res = _refused_start(net, "C", *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert len(lines) == 1 and message in lines[0], lines
        assert not (home / "daemon.json").exists()


def test_identity_key_and_state_files_are_never_announced(tn: Net) -> None:
    net = tn.net
    # the start-up scan walks the folder in name order: identity.key before readme.txt
    net.wait_until(lambda: any(r["path"] == "readme.txt" for r in tn.own_log("A")),
                   SPREAD_TIMEOUT_S, what="A announced readme.txt")
    paths = {r["path"] for r in net.cli("A", "log")}
    assert "identity.key" not in paths and "trust.db" not in paths
    assert not any(p.name in ("identity.key", "trust.db") for p in tn.b_synced.rglob("*"))


def test_home_is_0700_and_every_state_file_0600(tn: Net) -> None:
    for name in ("A", "B"):
        home = tn.net.node(name).home
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, name
        modes = {}
        for dirpath, dirnames, filenames in os.walk(home):
            dirnames[:] = [d for d in dirnames if d != "received"]  # the user's files
            for f in filenames:
                st = os.lstat(Path(dirpath) / f)
                if stat.S_ISREG(st.st_mode):
                    modes[f] = stat.S_IMODE(st.st_mode)
        for must in ("identity.key", "trust.db", "peers.db", "events.db", "daemon.json",
                     "node.log"):
            assert must in modes, (name, sorted(modes))
        assert {f: m for f, m in modes.items() if m != 0o600} == {}, name


def test_relative_home_does_not_echo_synced_files(tn: Net) -> None:
    net = tn.net
    status = net.cli("B", "status")
    assert Path(status["home"]).is_absolute()
    assert Path(status["home"]) == net.node("B").home.resolve()
    (tn.docs / "echo.txt").write_bytes(b"written on A\n")
    copy = tn.b_synced / "echo.txt"
    net.wait_until(lambda: copy.is_file() and copy.read_bytes() == b"written on A\n",
                   SPREAD_TIMEOUT_S, what="B synced echo.txt")
    # proof that B's watcher moved past the sync write: a real local change in the same
    # folder, announced by B after it
    (tn.b_synced / "local.txt").write_bytes(b"written on B\n")
    net.wait_until(lambda: any(r["path"] == "local.txt" for r in tn.own_log("B")),
                   SPREAD_TIMEOUT_S, what="B announced local.txt")
    assert [r["path"] for r in tn.own_log("B") if r["path"] == "echo.txt"] == []


def test_share_never_announces_symlink_targets_and_survives_bad_names(tn: Net) -> None:
    net = tn.net
    secret = tn.data / "secret.txt"
    secret.write_bytes(SECRET)
    out = tn.data / "out"
    out.mkdir()
    (out / "a-good.txt").write_bytes(b"first\n")
    (out / "link").symlink_to(secret)
    (out / "identity.key").write_bytes(os.urandom(64))
    (out / "bad\nFORGED-LINE p2pfs.daemon: node is up.txt").write_bytes(b"newline\n")
    fd = os.open(os.fsencode(out) + b"/caf\xe9.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin-1 name\n")
    os.close(fd)
    (out / "z-last.txt").write_bytes(b"last\n")
    # to every trusted peer online (B): only such a share is announced by gossip
    res = net.cli("A", "share", str(out), json=False, check=False)
    assert res.returncode == 0, res.stderr

    def shared() -> set[str]:
        return {r["path"] for r in tn.own_log("A") if r["kind"] == "shared"}

    net.wait_until(lambda: {"out/a-good.txt", "out/z-last.txt"} <= shared(),
                   SPREAD_TIMEOUT_S, what="A announced every sendable file")
    rows = [r for r in tn.own_log("A") if r["kind"] == "shared"]
    assert sorted(r["path"] for r in rows) == ["out/a-good.txt", "out/z-last.txt"]
    assert blake3.blake3(SECRET).hexdigest() not in {r["hash"] for r in rows}
    log_text = (net.node("A").home / "node.log").read_text(errors="replace")
    assert not any(line.startswith("FORGED-LINE") for line in log_text.splitlines())
    assert "not announcing" in log_text and "bad\\nFORGED-LINE" in log_text
    got = net.node("B").home / "received" / "A" / "out"
    assert sorted(p.name for p in got.iterdir()) == ["a-good.txt", "z-last.txt"]


def test_share_of_the_home_is_refused(tn: Net) -> None:
    net = tn.net
    home = net.node("A").home
    for path in (home, home / "identity.key", home.parent):
        res = net.cli("A", "share", str(path), "--to", "B", json=False, check=False)
        assert res.returncode == 2, (path, res.stderr)
        assert "home dir" in res.stderr
    rows = net.cli("A", "transfers")
    assert all(str(home) not in " ".join(r["paths"]) for r in rows)
    assert normalize_peer_id(net.peer_id("A"))  # the node is still up
    net.cli("A", "status")


async def _fetch(me: Any, target: Any, port: int, rel: str, into: Path) -> Any:
    """Ask `target` for `rel` over a real authenticated fetch channel, as a trusted peer."""
    from node.channel import open_channel
    from node.peering import ServiceRequest
    from node.transfer.session import fetch_file
    from node.transfer.store import ReceiveStore
    from node.transports import get_transport

    pipe = await get_transport("tcp").connect("127.0.0.1", port, timeout=5.0)
    channel = await open_channel(pipe, me, expected_peer=target, authorize=lambda _p: None)
    try:
        await channel.send(ServiceRequest("fetch").encode())
        return await fetch_file(channel, rel, None, ReceiveStore(into))
    finally:
        await channel.close()


def test_a_trusted_peer_cannot_fetch_a_state_file(tn: Net, tmp_path: Path) -> None:
    import asyncio

    from node.errors import P2PError
    from node.identity import PeerId, load_identity

    net = tn.net
    me = load_identity(net.node("B").home)  # A trusts B
    target = PeerId.parse(net.peer_id("A"))
    port = net.node("A").ports["tcp"]
    ok = asyncio.run(_fetch(me, target, port, "docs/readme.txt", tmp_path / "ok"))
    assert [f.path.read_bytes() for f in ok.files if f.path] == [b"hello\n"]  # the route works
    for rel in ("docs/identity.key", "docs/trust.db"):
        try:
            got = asyncio.run(_fetch(me, target, port, rel, tmp_path / "no"))
        except P2PError:
            continue
        assert not [f for f in got.files if f.path], rel
    assert not list((tmp_path / "no").rglob("identity.key"))

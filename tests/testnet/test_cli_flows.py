"""CLI flows a user relies on, with real node processes: `share` with no --to goes to
every trusted peer online (and only those), `events --follow` streams live and
`cancel` stops a running transfer with a clear failure on the sender's CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cliflows")
    with Testnet(root) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["a", "b", "c", "d"])
        net.wait_all_see_each_other(timeout=60)
        net.trust_all(["a", "b", "c"])  # d is known to everyone but trusted by nobody
        yield net


def _received(net: Testnet, receiver: str, sender: str, name: str) -> Path:
    return net.node(receiver).home / "received" / sender / name


def test_share_without_to_goes_to_every_trusted_online_peer(net: Testnet, tmp_path: Path) -> None:
    src = tmp_path / "everyone.bin"
    src.write_bytes(os.urandom(300_000))
    res = net.cli("a", "share", str(src), json=False)
    assert res.returncode == 0, res.stderr
    got = {p for p in ("b", "c") if _received(net, p, "a", "everyone.bin").exists()}
    assert got == {"b", "c"}
    for p in got:
        assert _sha(_received(net, p, "a", "everyone.bin")) == _sha(src)
    d_received = net.node("d").home / "received"
    assert not any(d_received.rglob("everyone.bin")) if d_received.exists() else True
    rows = net.cli("a", "transfers")
    sent_to = {normalize_peer_id(r["peer_id"]) for r in rows
               if r["direction"] == "send" and r["paths"] == [str(src.resolve())]}
    assert sent_to == {normalize_peer_id(net.peer_id(p)) for p in ("b", "c")}


def test_share_to_one_peer_tells_no_one_else(net: Testnet, tmp_path: Path) -> None:
    private = tmp_path / "only-for-b.bin"
    private.write_bytes(os.urandom(50_000))
    res = net.cli("a", "share", str(private), "--to", "b", json=False)
    assert res.returncode == 0, res.stderr
    assert _sha(_received(net, "b", "a", private.name)) == _sha(private)
    # a later share to everyone is announced by gossip; once c has logged that one,
    # it would have logged an announcement of the first one too
    public = tmp_path / "for-everyone.bin"
    public.write_bytes(os.urandom(1000))
    net.cli("a", "share", str(public), json=False, check=True)
    net.wait_until(lambda: net.cli("c", "log", "--path", public.name), 30,
                   what="c logs the share to everyone")
    for peer in ("b", "c"):
        assert net.cli(peer, "log", "--path", private.name) == [], peer


def test_events_follow_streams_live(net: Testnet, tmp_path: Path) -> None:
    last = net.cli("b", "events", "--json", json=False).stdout.strip().splitlines()
    since = json.loads(last[-1])["id"] if last else 0
    with subprocess.Popen(
        [*net.node_cmd, "events", "--follow", "--json", "--since", str(since),
         "--home", str(net.node("b").home)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=net.env,
        cwd=net.root) as follow:
        _follow_until_received(net, follow, tmp_path, since)


def _follow_until_received(net: Testnet, follow: subprocess.Popen[str], tmp_path: Path,
                           since: int) -> None:
    try:
        time.sleep(1.0)  # the stream is open before the file is sent
        src = tmp_path / "live.txt"
        src.write_text("live notification\n")
        net.cli("a", "share", str(src), "--to", "b", json=False, check=True)
        deadline = time.monotonic() + 20
        seen = []
        assert follow.stdout is not None
        while time.monotonic() < deadline:
            line = follow.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            seen.append(ev)
            if ev["kind"] == "file_received" and ev["data"].get("path") == "live.txt":
                break
        kinds = [(e["kind"], e["data"].get("path")) for e in seen]
        assert ("file_received", "live.txt") in kinds, kinds
        ids = [e["id"] for e in seen]
        assert ids == list(range(since + 1, since + 1 + len(ids))), ids  # no gaps
    finally:
        follow.terminate()
        follow.wait(timeout=10)


def test_cancel_stops_a_running_transfer(net: Testnet, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1536 * 1024 * 1024)  # sparse: cheap to make, still 1.5 GiB to send
    with subprocess.Popen(
        [*net.node_cmd, "share", str(big), "--to", "c", "--transport", "quic", "--json",
         "--home", str(net.node("a").home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=net.env,
        cwd=net.root) as share:
        out, err, tid = _cancel_midway(net, share)
    assert share.returncode != 0
    assert "cancel" in (out + err).lower()
    assert not _received(net, "c", "a", "big.bin").exists()
    rows = [r for r in net.cli("a", "transfers") if r["id"] == tid]
    assert rows and rows[0]["state"] == "cancelled"


def _cancel_midway(net: Testnet, share: subprocess.Popen[str]) -> tuple[str, str, str]:
    try:
        assert share.stdout is not None
        tid = None
        for line in share.stdout:
            ev = json.loads(line).get("event", {})
            if ev.get("type") == "progress" and ev.get("bytes_done", 0) > 0:
                tid = ev["id"]
                break
        assert tid is not None, "no progress event before the end"
        res = net.cli("a", "cancel", tid, json=False)
        assert res.returncode == 0, res.stderr
        out, err = share.communicate(timeout=30)
        return out, err, tid
    finally:
        if share.poll() is None:
            share.kill()
            share.wait()


@pytest.mark.parametrize("transport", ["tcp", "udp", "quic"])
def test_ping_over_each_transport(net: Testnet, transport: str) -> None:
    res = net.cli("a", "ping", "b", "--transport", transport, "--count", "3")
    assert res["transport"] == transport
    assert normalize_peer_id(res["peer_id"]) == normalize_peer_id(net.peer_id("b"))
    assert len(res["rtt_ms"]) == 3 and all(0 < r < 5000 for r in res["rtt_ms"])
    assert res["remote"][1] == net.node("b").ports[transport]


def test_ping_untrusted_and_transport_not_offered(net: Testnet) -> None:
    refused = net.cli("a", "ping", net.peer_id("d"), json=False, check=False)
    assert refused.returncode == 9
    assert "is not trusted" in refused.stderr and "node trust" in refused.stderr
    # a node that listens on tcp only: asking for quic names what it does offer
    e = net.add_node("e", start=False)
    (e.home / "config.toml").write_text('transports = ["tcp"]\n')
    net.start("e")
    net.cli("a", "trust", net.peer_id("e"), "--name", "e", json=False)
    net.cli("e", "trust", net.peer_id("a"), "--name", "a", json=False)
    net.wait_until(lambda: "e" in {net.name_of(p["peer_id"]) for p in net.cli("a", "peers")},
                   30, what="a knows e")
    res = net.cli("a", "ping", "e", "--transport", "quic", json=False, check=False)
    assert res.returncode == 10, res.stderr
    assert "does not offer transport 'quic'" in res.stderr and "it offers: tcp" in res.stderr
    assert net.cli("a", "ping", "e", "--transport", "tcp", "--count", "1")["transport"] == "tcp"

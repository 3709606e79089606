"""Trust revocation in a running node (hardening issue, item 4), with real processes.

`node untrust X` while a transfer to X and one from X are in flight: within 1 s
both fail on both sides with a "not trusted" reason, each receiver keeps its
partial file as a partial (never under the final name), and X learns nothing
more from us by gossip (its open gossip channel is closed).

Both transfers go through throttled loopback proxies (ThrottledProxy below), so
small files stay in flight long enough: a and x advertise 127.0.0.2, where a
proxy per node forwards to its real port on 127.0.0.1. The proxy keeps its
socket buffers small and half-closes each direction on its own, like a network
path would, so what it holds drains quickly behind an Abort. b, trusted by a
only, proves that a's gossip still flows.

Must not import the daemon or the CLI: nodes are real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id, tail  # noqa: E402

pytestmark = pytest.mark.slow

PROXY_HOST = "127.0.0.2"  # loopback alias a and x advertise; their proxies listen there
PROXY_SOCKET_BUFFER_BYTES = 128 << 10
PROXY_READ_BYTES = 32 << 10

MIB = 1 << 20
FILE_BYTES = 48 * MIB
# ~2 s per file through the proxy; slow enough to still be in flight, fast enough that
# what the sender's pipe buffered (a few MiB) drains quickly behind the Abort
THROTTLE_BPS = 24_000_000
REVOKE_LIMIT_S = 1.0
SPREAD_TIMEOUT_S = 20.0


class ThrottledProxy:
    """A threaded TCP relay listen -> upstream, each direction paced to `rate_bps`."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rate_bps: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._server = self._socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._spawn(self._accept_loop)

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, PROXY_SOCKET_BUFFER_BYTES)
        return sock

    def _spawn(self, target: Any, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()
        return t

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        upstream = self._socket()
        with self._lock:
            self._socks |= {client, upstream}
        try:
            upstream.settimeout(5)
            upstream.connect(self.upstream)
            upstream.settimeout(None)
            back = self._spawn(self._pump, upstream, client)
            self._pump(client, upstream)
            back.join(30)
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks -= {client, upstream}
            client.close()
            upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(PROXY_READ_BYTES)
                if not data:
                    break
                dst.sendall(data)
                if self.rate_bps:
                    time.sleep(len(data) / self.rate_bps)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the end on; the other direction goes on

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for s in list(self._socks):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for t in threads:
            t.join(10)


def _events(net: Testnet, name: str, since: int = 0) -> list[dict[str, Any]]:
    res = net.cli(name, "events", "--json", "--since", str(since), json=False)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def _last_id(net: Testnet, name: str) -> int:
    return max((n["id"] for n in _events(net, name)), default=0)


def _logged(net: Testnet, name: str, origin: str, path: str) -> bool:
    rows = net.cli(name, "log", "--path", path)
    return any(normalize_peer_id(r["origin"]) == normalize_peer_id(origin) and r["path"] == path
               for r in rows)


def _written(folder: Path, name: str) -> int:
    """Bytes written into the (sparse) partial file of `name` under `folder`."""
    best = 0
    for p in folder.glob(f".{name}.*.p2pfs-part"):
        try:
            best = max(best, p.stat().st_blocks * 512)
        except FileNotFoundError:
            pass
    return best


def _committed_at(db: Path) -> float:
    """When the last write to an SQLite WAL database was committed (the WAL file's mtime;
    the CLI process itself takes a while to exit after its commit)."""
    wal = db.with_name(db.name + "-wal")
    return max(p.stat().st_mtime for p in (db, wal) if p.exists())


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testnet, Path]]:
    root = tmp_path_factory.mktemp("revoke")
    docs = root / "docs"
    docs.mkdir()
    with Testnet(root / "net") as net:
        net.start_bootstrap(ttl_s=60)
        net.add_node("a", share=[docs], extra_args=["--advertise-host", PROXY_HOST])
        net.add_node("x", extra_args=["--advertise-host", PROXY_HOST])
        net.add_node("b")
        proxies = [ThrottledProxy((PROXY_HOST, net.node(n).ports["tcp"]),
                                 ("127.0.0.1", net.node(n).ports["tcp"])) for n in ("a", "x")]
        try:
            for one, other in (("a", "x"), ("x", "a"), ("a", "b"), ("b", "a")):
                net.cli(one, "trust", net.peer_id(other), "--name", other, json=False)
            net.wait_until(lambda: net.sees("a", ["x", "b"]) and net.sees("x", ["a"]), 45,
                           what="a lists x and b, x lists a")
            for p in proxies:
                p.rate_bps = THROTTLE_BPS
            yield net, docs
        finally:
            for p in proxies:
                p.close()
            net.teardown()


def test_untrust_closes_transfers_both_ways_and_gossip(net: tuple[Testnet, Path],
                                                       tmp_path: Path) -> None:
    tn, docs = net
    a_id = tn.peer_id("a")
    # x gets a's change events while it is trusted (its gossip channel is open)
    (docs / "before.txt").write_text("x may see this\n")
    tn.wait_until(lambda: _logged(tn, "x", a_id, "before.txt"), SPREAD_TIMEOUT_S,
                  what="x logs a's change before the untrust")
    since = {n: _last_id(tn, n) for n in ("a", "x")}

    to_x, from_x = tmp_path / "to-x.bin", tmp_path / "from-x.bin"
    to_x.write_bytes(os.urandom(FILE_BYTES))
    from_x.write_bytes(os.urandom(FILE_BYTES))
    shares = {}
    for sender, receiver, f in (("a", "x", to_x), ("x", "a", from_x)):
        cmd = [*tn.node_cmd, "share", str(f), "--to", receiver, "--transport", "tcp",
               "--home", str(tn.node(sender).home)]
        shares[sender] = subprocess.Popen(cmd, env=tn.env, cwd=tn.root, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL)
    x_folder = tn.node("x").home / "received" / "a"
    a_folder = tn.node("a").home / "received" / "x"
    try:
        tn.wait_until(lambda: _written(x_folder, to_x.name) >= MIB
                      and _written(a_folder, from_x.name) >= MIB, 30, interval=0.02,
                      what="both transfers are under way")
        res = tn.cli("a", "untrust", "x", json=False, check=True)
        untrusted_at = _committed_at(tn.node("a").home / "trust.db")
        outs = {n: p.communicate(timeout=30) for n, p in shares.items()}
    finally:
        for p in shares.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert "no longer trusting" in res.stdout

    # both CLIs fail, saying why
    for n, (_out, err) in outs.items():
        assert shares[n].returncode != 0, f"{n}'s share succeeded: {_out[-300:]}"
        assert "not trusted" in err, f"{n}: {err[-500:]}"

    # both transfers fail on both sides, within the limit, with the reason
    x_pid = normalize_peer_id(tn.peer_id("x"))
    for node, peer_id in (("a", x_pid), ("x", normalize_peer_id(a_id))):
        # (a folder-sync fetch of before.txt may be cut off too: only the pushes count here)
        failed = [n for n in _events(tn, node, since[node]) if n["kind"] == "transfer_failed"
                  and normalize_peer_id(n["data"].get("peer_id", "")) == peer_id
                  and n["data"].get("direction") in ("send", "receive")]
        directions = sorted(n["data"]["direction"] for n in failed)
        assert directions == ["receive", "send"], (node, failed, tail(tn.node(node).node_log))
        for n in failed:
            assert "not trusted" in n["data"]["error"], (node, n)
            late_s = n["at_ms"] / 1000 - untrusted_at
            print(f"{node} {n['data']['direction']}: failed {late_s:+.3f} s after the untrust")
            assert late_s < REVOKE_LIMIT_S, (node, n["data"]["direction"], late_s)

    # partial files kept as partials, never shown under the final name
    for folder, f in ((x_folder, to_x), (a_folder, from_x)):
        assert not (folder / f.name).exists()
        assert list(folder.glob(f".{f.name}.*.p2pfs-part")), f"{folder}: partial gone"

    # x learns nothing more from a: b (still trusted) gets a's next change, x does not
    (docs / "after.txt").write_text("x must not see this\n")
    tn.wait_until(lambda: _logged(tn, "b", a_id, "after.txt"), SPREAD_TIMEOUT_S,
                  what="b logs a's change after the untrust")
    assert not _logged(tn, "x", a_id, "after.txt")

"""End-to-end transfers between real node processes (issue 5, item 9).

Every test here drives real `node start` daemons through the testnet harness
(scripts/testnet_lib.py) and the `node` CLI, exactly as a user would: files
and folders over tcp/udp/quic arrive byte-identical, an untrusted sender is
refused, a receiver killed with SIGKILL resumes instead of starting over, a
byte flipped on the wire is detected and healed by retry + resume, hostile
paths from a trusted peer write nothing outside the received dir, a full disk
is reported on both sides, and an offline peer fails fast.

Two helpers live in this file: `LoopbackProxy`, a small threaded TCP relay the
test puts between sender and receiver (to slow a transfer down or flip one
byte of it), and a hostile sender built from node.identity / node.channel /
node.transports / node.transfer.protocol directly.

The receiver behind the proxy advertises 127.0.0.2 (the loopback net, like
127.0.0.1) so that its signed contact record points senders at the proxy;
the proxy forwards to the node's real port on 127.0.0.1.

Must not import the daemon or the CLI: nodes are real processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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

from testnet_lib import CommandFailed, Testnet, WaitTimeout, tail  # noqa: E402

from node.channel import open_channel  # noqa: E402
from node.errors import P2PError  # noqa: E402
from node.identity import Identity, PeerId  # noqa: E402
from node.peering import ServiceRequest  # noqa: E402
from node.transfer.manifest import build_manifest  # noqa: E402
from node.transfer.paths import is_internal_name  # noqa: E402
from node.transfer.protocol import TO_SINK, Abort, Offer, decode  # noqa: E402
from node.transfer.session import TransferState, send_files  # noqa: E402
from node.transports import get_transport  # noqa: E402

pytestmark = pytest.mark.slow

MIB = 1 << 20
PROXY_HOST = "127.0.0.2"  # loopback alias the proxied receiver advertises
SHARE_TIMEOUT_S = 90.0
OFFLINE_LIMIT_S = 15.0
TINY_FS_BYTES = 2 * MIB
THROTTLE_BPS = 6_000_000  # bytes/s through the proxy while we wait to kill the receiver
CORRUPT_AFTER_BYTES = 2 * MIB  # flip a byte this far into a transfer connection
PROXY_BUFFER_BYTES = 64 << 10


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every user-visible file under `root`."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(is_internal_name(part) or part.startswith(".p2pfs-") for part in rel.parts):
            continue
        if p.is_file():
            out[rel.as_posix()] = sha256_file(p)
    return out


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n
    return path


def parse_share(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """`node share --json`: progress events (one JSON per line), then the result object."""
    events, rest = [], []
    for line in stdout.splitlines():
        if line.startswith('{"event": '):
            events.append(json.loads(line)["event"])
        else:
            rest.append(line)
    text = "\n".join(rest).strip()
    return events, (json.loads(text) if text else None)


def share(net: Testnet, sender: str, paths: list[Path], to: str, transport: str = "tcp",
          timeout: float = SHARE_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return net.cli(sender, "share", *[str(p) for p in paths], "--to", to,
                   "--transport", transport, "--json", json=False, check=False,
                   timeout=timeout)


def received_dir(net: Testnet, name: str) -> Path:
    h = net.node(name)
    return h.received_dir or h.home / "received"


def events_of(net: Testnet, name: str) -> list[dict[str, Any]]:
    res = net.cli(name, "events", "--json", json=False)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def visible_files(root: Path) -> list[Path]:
    """Files a user would take for finished ones (no partial/state/index files)."""
    return [p for p in root.rglob("*")
            if p.is_file() and not is_internal_name(p.name) and not p.name.startswith(".p2pfs-")]


def explain(net: Testnet, res: subprocess.CompletedProcess[str], *nodes: str) -> str:
    logs = "\n".join(f"--- {n} node.log ---\n{tail(net.node(n).node_log, 25)}" for n in nodes)
    return (f"exit {res.returncode}\nstdout: {res.stdout[-1500:]}\n"
            f"stderr: {res.stderr[-800:]}\n{logs}")


class LoopbackProxy:
    """A threaded TCP relay: listen -> upstream, optionally throttled or corrupting.

    `rate_bps` (None = unlimited) paces both directions; `corrupt_after` flips
    one bit of the client->server stream that far into a connection, once per
    proxy, so only a bulk connection (a transfer, not a gossip push) is hit.
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rate_bps: float | None = None
        self.corrupt_after: int | None = None
        self.corrupted = 0
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        self.connections += 1
        upstream: socket.socket | None = None
        with self._lock:
            self._socks.add(client)
        try:
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._socks.add(upstream)
            back = threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True)
            back.start()
            self._pump(client, upstream, True)
            back.join(10)
        finally:
            with self._lock:
                for s in (client, upstream):
                    if s is not None:
                        self._socks.discard(s)
                        s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        passed = 0
        try:
            while not self._stop.is_set():
                data = src.recv(PROXY_BUFFER_BYTES)
                if not data:
                    break
                if to_server and self.corrupt_after is not None and self.corrupted == 0 \
                        and passed + len(data) > self.corrupt_after:
                    at = max(0, self.corrupt_after - passed)
                    buf = bytearray(data)
                    buf[at] ^= 0x01
                    data = bytes(buf)
                    self.corrupted += 1
                passed += len(data)
                dst.sendall(data)
                rate = self.rate_bps
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for s in list(self._socks):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        self._accepter.join(5)
        for t in threads:
            t.join(10)


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: int) -> Iterator[str]:
    """Mount a tmpfs of `size` bytes at `path` (needs root); yields 'tmpfs' or 'none'."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
        mounted = res.returncode == 0
    try:
        yield "tmpfs" if mounted else "none"
    finally:
        if mounted:
            res = subprocess.run(["umount", str(path)], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


# ----------------------------------------------------------------------------- the testnet


class Net:
    """The module's testnet and what the tests need to know about it."""

    def __init__(self, net: Testnet, proxy: LoopbackProxy, disk_mode: str, work: Path) -> None:
        self.net = net
        self.proxy = proxy
        # "tmpfs", "readonly" (not root) or "blocked" (a file in the way)
        self.disk_mode = disk_mode
        self.work = work


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """bootstrap + n1 (sender), n2 (receiver), n3 (untrusted by n2), n4 (tiny disk),
    n5 (receiver behind the proxy), n6 (goes offline)."""
    root = tmp_path_factory.mktemp("xfer")
    work = root / "files"
    work.mkdir()
    tiny = root / "tiny"
    with tiny_filesystem(tiny, TINY_FS_BYTES) as fs, Testnet(root / "net") as net:
        disk_mode = fs
        if fs == "none":
            # no mount allowed: make the sender's folder unwritable in another honest way
            tiny.mkdir(exist_ok=True)
            if os.geteuid() != 0:
                tiny.chmod(0o555)
                disk_mode = "readonly"
            else:  # root ignores permissions: put a file where the sender's folder goes
                (tiny / "n1").write_bytes(b"in the way")
                disk_mode = "blocked"
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["n1", "n2", "n3", "n6"])
        net.add_node("n4", received_dir=tiny)
        net.add_node("n5", extra_args=["--advertise-host", PROXY_HOST])
        proxy = LoopbackProxy((PROXY_HOST, net.node("n5").ports["tcp"]),
                              ("127.0.0.1", net.node("n5").ports["tcp"]))
        try:
            for peer in ("n2", "n4", "n5", "n6"):
                net.cli("n1", "trust", net.peer_id(peer), "--name", peer, json=False)
                net.cli(peer, "trust", net.peer_id("n1"), "--name", "n1", json=False)
            # n3 trusts n2, but n2 never trusts n3
            net.cli("n3", "trust", net.peer_id("n2"), "--name", "n2", json=False)
            net.wait_until(lambda: net.sees("n1", ["n2", "n4", "n5", "n6"]), 45,
                           what="n1 lists every receiver")
            net.wait_until(lambda: net.sees("n3", ["n2"]), 45, what="n3 lists n2")
            yield Net(net, proxy, disk_mode, work)
        finally:
            proxy.close()
            net.teardown()
            if disk_mode == "readonly":
                tiny.chmod(0o755)


# ----------------------------------------------------------------------------- 1. transports


@pytest.mark.parametrize("transport", ["tcp", "udp", "quic"])
def test_file_and_folder_arrive_identical(tn: Net, transport: str) -> None:
    net = tn.net
    src = tn.work / f"t-{transport}"
    big = random_file(src / f"big-{transport}.bin", 12 * MIB + 12345)
    folder = src / f"album-{transport}"
    random_file(folder / "a.bin", 3 * MIB + 7)
    random_file(folder / "sub" / "b.bin", 200_000)
    random_file(folder / "sub" / "deeper" / "c.txt", 1)
    random_file(folder / "sub" / "deeper" / "empty.dat", 0)

    res = share(net, "n1", [big, folder], "n2", transport)
    assert res.returncode == 0, explain(net, res, "n1", "n2")
    events, result = parse_share(res.stdout)
    assert result is not None
    [t] = result["transfers"]
    assert t["state"] == "done" and t["transport"] == transport and t["peer"] == "n2"
    assert t["files_done"] == t["files_total"] == 5
    assert t["bytes_total"] == 12 * MIB + 12345 + 3 * MIB + 7 + 200_000 + 1
    assert any(e["type"] == "finished" and e["state"] == "done" for e in events)

    got = received_dir(net, "n2") / "n1"
    assert sha256_file(got / big.name) == sha256_file(big)
    assert tree_hashes(got / folder.name) == tree_hashes(folder)
    assert len(tree_hashes(folder)) == 4
    kinds = [(e["kind"], e["data"].get("path")) for e in events_of(net, "n2")]
    assert ("file_received", big.name) in kinds


# ----------------------------------------------------------------------------- 2. untrusted


def test_untrusted_sender_is_refused(tn: Net) -> None:
    net = tn.net
    f = random_file(tn.work / "from-n3.bin", 1 * MIB)
    before = sorted(p.name for p in received_dir(net, "n2").iterdir())
    res = share(net, "n3", [f], "n2")
    assert res.returncode != 0, explain(net, res, "n3", "n2")
    assert "not trusted" in res.stderr, res.stderr
    after = sorted(p.name for p in received_dir(net, "n2").iterdir())
    assert after == before  # nothing written, not even a folder for n3
    assert not list(received_dir(net, "n2").rglob("from-n3*"))
    n3 = net.peer_id("n3")
    log = net.node("n2").node_log.read_text(errors="replace")
    assert any("refused" in line and "untrusted" in line and n3 in line
               for line in log.splitlines()), tail(net.node("n2").node_log)


# ----------------------------------------------------------------------------- 3. kill -9 + resume


def test_receiver_killed_mid_transfer_resumes(tn: Net) -> None:
    net, proxy = tn.net, tn.proxy
    size = 16 * MIB
    f = random_file(tn.work / "resume.bin", size)
    folder = received_dir(net, "n5") / "n1"
    proxy.rate_bps = THROTTLE_BPS
    cmd = [*net.node_cmd, "share", str(f), "--to", "n5", "--transport", "tcp", "--json",
           "--home", str(net.node("n1").home)]
    first = subprocess.Popen(cmd, env=net.env, cwd=net.root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        # the receiver records verified chunks on disk (every 16 chunks or 1 s): wait for it
        net.wait_until(lambda: list(folder.glob(".resume.bin.*.p2pfs-state")), 30, interval=0.05,
                       what="n5 saved resume state")
        net.kill("n5")
        proxy.rate_bps = None
        assert not (folder / "resume.bin").exists()
        # the sender retries on its own (and gives up after ~7 s while n5 is down);
        # cancel it when we catch it running, so that the re-run below does the resume
        def running_send() -> str | None:
            for t in net.cli("n1", "transfers"):
                if t["direction"] == "send" and t["peer"] == "n5" and t["state"] == "running":
                    return str(t["id"])
            return None

        with contextlib.suppress(WaitTimeout, CommandFailed):  # it may end by itself first
            tid = net.wait_until(running_send, 8, what="n1 lists the running transfer")
            net.cli("n1", "cancel", tid, json=False)
        out, err = first.communicate(timeout=45)
    finally:
        proxy.rate_bps = None
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode != 0, out + err
    assert not (folder / "resume.bin").exists()
    assert list(folder.glob(".resume.bin.*.p2pfs-part")), "the partial file is gone"

    net.start("n5")
    res = share(net, "n1", [f], "n5")
    assert res.returncode == 0, explain(net, res, "n1", "n5")
    _, result = parse_share(res.stdout)
    assert result is not None
    [t] = result["transfers"]
    assert t["state"] == "done"
    assert sha256_file(folder / "resume.bin") == sha256_file(f)
    # the second run sent only what the killed receiver had not verified
    assert 0 < t["bytes_on_wire"] < size, t


# ----------------------------------------------------------------------------- 4. corruption


def test_byte_flipped_on_the_wire_is_detected_and_healed(tn: Net) -> None:
    net, proxy = tn.net, tn.proxy
    f = random_file(tn.work / "flip.bin", 10 * MIB)
    if not net.node("n5").running():  # an earlier failure must not cascade into this test
        net.start("n5")
    proxy.corrupted = 0
    proxy.corrupt_after = CORRUPT_AFTER_BYTES
    try:
        res = share(net, "n1", [f], "n5")
    finally:
        proxy.corrupt_after = None
    assert proxy.corrupted == 1
    assert res.returncode == 0, explain(net, res, "n1", "n5")
    events, result = parse_share(res.stdout)
    assert result is not None
    [t] = result["transfers"]
    # the channel's AEAD caught the flipped byte and killed the channel; the sender
    # retried and resumed from the chunks the receiver had verified
    assert t["state"] == "done" and t["attempts"] >= 2, t
    retries = [e for e in events if e["type"] == "retry"]
    assert retries and all(e["error"] for e in retries), retries  # each retry says why
    assert sha256_file(received_dir(net, "n5") / "n1" / "flip.bin") == sha256_file(f)
    log = net.node("n5").node_log.read_text(errors="replace")
    assert "failed authentication" in log, tail(net.node("n5").node_log)


# ----------------------------------------------------------------------------- 5. hostile paths


HOSTILE_NAMES = ["../evil", "/etc/x", "a/../../b", "CON", "sub/nul.txt", "x" * 300,
                 "/".join(["d" * 200] * 25), "..\\..\\evil", ".p2pfs-versions/x"]


def _paths_outside(root: Path, recv: Path) -> set[Path]:
    """Every path under `root` except the received dir, logs and the nodes' databases."""
    skip_suffixes = ("-wal", "-shm", "-journal", ".log", ".db", ".json", ".sock", ".sqlite3")
    return {p for p in root.rglob("*")
            if p != recv and recv not in p.parents and "logs" not in p.relative_to(root).parts
            and not p.name.endswith(skip_suffixes)}


async def _connect(net: Testnet, me: Identity) -> Any:
    h = net.node("n2")
    pipe = await get_transport("tcp").connect("127.0.0.1", h.ports["tcp"], timeout=5)
    channel = await open_channel(pipe, me, expected_peer=PeerId.parse(net.peer_id("n2")),
                                 authorize=lambda _peer: None)
    await channel.send(ServiceRequest("transfer").encode())
    return channel


async def test_hostile_paths_are_refused_and_nothing_escapes(tn: Net) -> None:
    net = tn.net
    evil = Identity.generate(name="mallory")
    net.cli("n2", "trust", str(evil.peer_id), "--name", "mallory", json=False)
    recv = received_dir(net, "n2")
    etc_x_existed = os.path.lexists("/etc/x")
    outside_before = _paths_outside(net.root, recv)
    good = random_file(tn.work / "mallory" / "ok.txt", 1000)
    template = build_manifest(good.parent, [good])[0].entry.to_wire()
    for bad in HOSTILE_NAMES:
        entry = list(template)
        entry[0] = bad
        channel = await _connect(net, evil)
        try:
            await channel.send(Offer(os.urandom(16), 0, True, (entry,)).encode())
            answer: Any
            try:
                answer = decode(await channel.recv(), TO_SINK)
            except P2PError as exc:  # the receiver may simply cut us off
                answer = exc
        finally:
            await channel.close()
        assert isinstance(answer, (Abort, P2PError)), (bad, answer)
        if isinstance(answer, Abort):
            assert answer.code == "ProtocolError", (bad, answer)
    # nothing was written outside the received dir, and no file for mallory inside it
    assert _paths_outside(net.root, recv) == outside_before
    assert os.path.lexists("/etc/x") == etc_x_existed
    assert not (recv / "mallory").exists() or visible_files(recv / "mallory") == []
    log = net.node("n2").node_log.read_text(errors="replace")
    assert "cutting off" in log or "broke the transfer protocol" in log, \
        tail(net.node("n2").node_log)

    # the receiver's server loop survived: the same (trusted) client can send a normal file
    channel = await _connect(net, evil)
    try:
        result = await send_files(channel, good.parent, [good])
    finally:
        await channel.close()
    assert result.state is TransferState.DONE
    assert sha256_file(recv / "mallory" / "ok.txt") == sha256_file(good)


# ----------------------------------------------------------------------------- 6. disk full


def test_full_disk_is_reported_and_leaves_no_finished_file(tn: Net) -> None:
    net = tn.net
    f = random_file(tn.work / "too-big.bin", 8 * MIB)
    res = share(net, "n1", [f], "n4")
    assert res.returncode != 0, explain(net, res, "n1", "n4")
    want = {"tmpfs": "disk full", "readonly": "permission denied",
            "blocked": "not a folder"}[tn.disk_mode]
    assert want in res.stderr, explain(net, res, "n1", "n4")
    recv = received_dir(net, "n4")
    assert not list(recv.rglob("too-big.bin"))
    assert [p for p in visible_files(recv) if p.name != "n1"] == []
    failed = [e for e in events_of(net, "n4") if e["kind"] == "transfer_failed"]
    assert failed and want in failed[-1]["data"]["error"], failed
    sender_failed = [e for e in events_of(net, "n1") if e["kind"] == "transfer_failed"
                     and e.get("labels", {}).get(e["data"].get("peer_id", "")) == "n4"]
    assert sender_failed, "the sender shows no transfer_failed notification"


# ----------------------------------------------------------------------------- 7. offline


def test_offline_peer_fails_fast_and_clearly(tn: Net) -> None:
    net = tn.net
    f = random_file(tn.work / "nobody-home.bin", 1 * MIB)
    net.stop("n6")
    t0 = time.monotonic()
    res = share(net, "n1", [f], "n6", timeout=OFFLINE_LIMIT_S + 10)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < OFFLINE_LIMIT_S, f"took {elapsed:.1f}s"
    msg = res.stderr.lower()
    assert "n6" in msg and any(w in msg for w in ("cannot reach", "unreachable", "offline")), msg

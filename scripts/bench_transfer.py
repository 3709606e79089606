"""Benchmark: `node share` of one big file between two real node processes, per transport.

In ONE run, on 127.0.0.1, it measures:

* one-core secretstream encryption (crypto_secretstream_xchacha20poly1305_push,
  1 MiB messages): the issue's yardstick for TCP;
* a plain asyncio TCP file copy, no crypto: file -> socket -> file, the
  receiving end in its own process (this script with ``--file-sink``);
* each transport's SecureChannel throughput (scripts/bench_channel.py's
  ``channel_mib_s``), the yardstick for UDP and QUIC;
* the real thing: a bootstrap server and two `node start` processes (the
  testnet harness), `node share FILE --to n2 --transport T --json`, median of
  ``--repeat`` runs per transport; the received copy is checked (size + BLAKE3
  root from the sender's result) and deleted between runs so each run moves
  the whole file. Throughput is the file size over the sender's own transfer
  time (`started_at`..`ended_at` of the transfer: manifest, connect, every
  chunk, the receiver's root check). The first run of each transport also
  hashes the file for its manifest (the daemon caches it afterwards).
* peak RSS (VmHWM from /proc/<pid>/status) of both node processes; the nodes
  are restarted before each transport so each row has its own peak; next to it
  (in brackets) each node's RSS just before its first share, so what a share
  adds is the difference;
* CPU seconds (utime+stime, all threads) each node spent per share, and the
  "CPU-bound" rate size / busiest side's CPU: what the same work reaches when
  each node has a core to itself. On a shared, loaded machine the wall-clock
  rate mostly measures how much CPU the scheduler gave the two processes.

The machine is shared and noisy, so every run of a baseline is taken right
before the share run it is compared with (secretstream, plain copy and the
transport's channel, then the share), and medians are taken over those pairs.

Then it prints the targets of issue 5: TCP >= 0.6x secretstream, UDP and QUIC
>= 0.8x their own channel benchmark, peak RSS < 100 MB on each side.

With ``--vs-scp`` it measures the data-path issue's yardsticks instead, in ONE
run, run by run interleaved (each run of each row on a FRESH random file, so
every `node share` includes hashing the file, as a user's first share does):

* ``dd if=/dev/zero bs=1M conv=fdatasync`` of the same size: the disk limit;
* ``scp -O -c aes128-gcm@openssh.com`` of the same file through a private sshd
  on 127.0.0.1 (its own sshd_config, host key, client key and authorized_keys
  in the work dir; killed at the end, also on Ctrl-C), then an fsync of the
  copy and its directory: scp does not fsync and the node does, so the fair
  peer figure is "scp + fsync" (both are reported, targets use the durable one).
  CPU for scp: the scp+ssh client (rusage of children) and the sshd side
  (the listener's utime+stime+cutime+cstime);
* `node peers --json`, the CLI alone (its start plus one control call): the part of
  every share's wall time that moves no data, so the data path's own figure can be
  told apart from the CLI's start-up;
* `node share FILE --to n2 --transport T --json` per transport: wall time of
  the client command (the daemon's own transfer time is printed below the table),
  CPU ms per MiB of each node (/proc utime+stime), peak RSS of each node during the
  share (VmHWM, reset before each share through /proc/PID/clear_refs).

Without sshd/scp it prints "skipped: ..." and runs the rest. Medians of
``--repeat``. Targets (each a ratio within this one run): tcp share >= 1.0x
durable scp and >= 0.85x dd; udp >= 0.8x tcp; quic >= 0.5x tcp; tcp CPU
<= 1.0 ms/MiB sending and <= 1.2 ms/MiB receiving; peak RSS < 64 MB each side.

    .venv/bin/python scripts/bench_transfer.py                        # 1 GiB, x3
    .venv/bin/python scripts/bench_transfer.py --vs-scp --size-mib 256,1024 --repeat 3
    .venv/bin/python scripts/bench_transfer.py --size-mib 256 --repeat 3 --transports tcp
    .venv/bin/python scripts/bench_transfer.py --json

Imports the harness and bench_channel from scripts/; never the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS_DIR))
sys.path.insert(0, str(SCRIPTS_DIR.parent))

import bench_channel  # noqa: E402
from testnet_lib import Testnet, TestnetError  # noqa: E402

HOST = "127.0.0.1"
MIB = 1 << 20
DEFAULT_SIZE_MIB = 1024
DEFAULT_BASELINE_MIB = 256
MAX_SIZE_MIB = 64 * 1024
MESSAGE_BYTES = 1 << 20
SHARE_TIMEOUT_S = 900.0
SINK_START_TIMEOUT_S = 20.0
TARGET_TCP_VS_SECRETSTREAM = 0.6
TARGET_VS_CHANNEL = 0.8
TARGET_PEAK_RSS_MB = 100.0
TRANSPORTS = ("tcp", "udp", "quic")
# --vs-scp: the durable peers and the data-path issue's targets
SSHD = "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else shutil.which("sshd")
PRIVSEP_DIR = "/run/sshd"
SSHD_START_TIMEOUT_S = 10.0
SCP_CIPHER = "aes128-gcm@openssh.com"
TARGET_VS_DURABLE_SCP = 1.0
TARGET_VS_DD = 0.85
TARGET_UDP_VS_TCP = 0.8
TARGET_QUIC_VS_TCP = 0.5
TARGET_SEND_CPU_MS_PER_MIB = 1.0
TARGET_RECV_CPU_MS_PER_MIB = 1.2
TARGET_VS_PEAK_RSS_MB = 64.0


# --------------------------------------------------------------------------- plain file copy


async def _file_sink(out_path: str) -> None:
    """Child process: accept one connection, write what arrives to a file, answer its size."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        with open(out_path, "wb") as f:
            while True:
                data = await reader.read(MESSAGE_BYTES)
                if not data:
                    break
                f.write(data)
                got += len(data)
        writer.write(got.to_bytes(8, "big"))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(handle, HOST, 0, limit=MESSAGE_BYTES)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    async with server:
        await done.wait()


async def plain_file_copy_mib_s(src: Path, out: Path) -> float:
    sink = subprocess.Popen([sys.executable, __file__, "--file-sink", str(out)],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert sink.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(sink.stdout.readline),
                                      SINK_START_TIMEOUT_S)
        reader, writer = await asyncio.open_connection(HOST, int(line), limit=MESSAGE_BYTES)
        size = src.stat().st_size
        start = time.perf_counter()
        with open(src, "rb") as f:
            while True:
                block = f.read(MESSAGE_BYTES)
                if not block:
                    break
                writer.write(block)
                await writer.drain()
        writer.write_eof()
        got = int.from_bytes(await reader.readexactly(8), "big")
        elapsed = time.perf_counter() - start
        writer.close()
        await writer.wait_closed()
        sink.wait(timeout=10)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        if sink.stdout is not None:
            sink.stdout.close()
        out.unlink(missing_ok=True)
    if got != size:
        raise RuntimeError(f"plain copy: sink got {got} of {size} bytes")
    return size / elapsed / MIB


# --------------------------------------------------------------------------- node processes


def _vm_hwm_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vm_rss_mb(pid: int | None) -> float:
    """Resident memory now (VmRSS), MB: a node's size before the share (what the share
    adds is its peak minus this)."""
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int | None) -> float:
    """utime + stime of a process (all its threads) in seconds."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def _share_once(net: Testnet, src: Path, transport: str, received: Path,
                verify: str | None) -> dict[str, Any]:
    for p in list(received.parent.glob("*")) if received.parent.exists() else []:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    pids = (net.node("n1").pid, net.node("n2").pid)
    cpu0 = [_cpu_s(p) for p in pids]
    t0 = time.perf_counter()
    res = net.cli("n1", "share", str(src), "--to", "n2", "--transport", transport, "--json",
                  json=False, check=False, timeout=SHARE_TIMEOUT_S)
    wall = time.perf_counter() - t0
    cpu = [_cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
    if res.returncode != 0:
        raise RuntimeError(f"share over {transport} failed (exit {res.returncode}): "
                           f"{res.stderr.strip()[-500:]}")
    lines = [ln for ln in res.stdout.splitlines() if not ln.startswith('{"event": ')]
    [t] = json.loads("\n".join(lines))["transfers"]
    if t["state"] != "done" or t["transport"] != transport:
        raise RuntimeError(f"share over {transport}: {t}")
    size = src.stat().st_size
    if received.stat().st_size != size:
        raise RuntimeError(f"{received} has {received.stat().st_size} bytes, want {size}")
    if verify is not None and _sha256(received) != verify:
        raise RuntimeError(f"{received} differs from the original")
    elapsed = float(t["ended_at"]) - float(t["started_at"])
    return {"mib_s": size / elapsed / MIB, "transfer_s": elapsed, "cli_wall_s": wall,
            "bytes_on_wire": t["bytes_on_wire"], "sender_cpu_s": cpu[0], "receiver_cpu_s": cpu[1]}


def run(size: int, baseline: int, transports: list[str], repeat: int, workdir: Path,
        verify: bool, echo: Any) -> dict[str, Any]:
    """Baselines and shares interleaved run by run, so that both see the same machine load."""
    src = workdir / "bench-transfer.bin"
    echo(f"writing a {size / MIB:.0f} MiB random file in {workdir}")
    _make_file(src, size)
    digest = _sha256(src) if verify else None
    runs: dict[str, list[float]] = {}
    extra: dict[str, dict[str, Any]] = {}

    def note(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    with Testnet(workdir / "net") as net:
        net.start_bootstrap(ttl_s=120)
        net.add_nodes(["n1", "n2"])
        net.trust_all()
        net.wait_until(lambda: net.sees("n1", ["n2"]), 45, what="n1 lists n2")
        received = net.node("n2").home / "received" / "n1" / src.name
        for i, transport in enumerate(transports):
            if i:  # fresh processes: each transport gets its own peak RSS
                net.restart("n1")
                net.restart("n2")
                net.wait_until(lambda: net.sees("n1", ["n2"]), 45, what="n1 lists n2")
            idle = (round(_vm_rss_mb(net.node("n1").pid), 1),
                    round(_vm_rss_mb(net.node("n2").pid), 1))
            shares = []
            for r in range(repeat):
                note("secretstream", bench_channel.secretstream_mib_s(baseline, MESSAGE_BYTES))
                if i == 0:
                    note("plain_copy", asyncio.run(
                        plain_file_copy_mib_s(src, workdir / "copy.bin")))
                note(f"channel_{transport}", asyncio.run(
                    bench_channel.channel_mib_s(baseline, MESSAGE_BYTES, transport, {})))
                one = _share_once(net, src, transport, received,
                                  digest if r == repeat - 1 else None)
                note(f"share_{transport}", one["mib_s"])
                shares.append(one)
                echo(f"  {transport} run {r + 1}: share {one['mib_s']:.1f} MiB/s "
                     f"({one['transfer_s']:.2f} s; CLI {one['cli_wall_s']:.2f} s), channel "
                     f"{runs[f'channel_{transport}'][-1]:.1f}, secretstream "
                     f"{runs['secretstream'][-1]:.1f} MiB/s")
            extra[f"share_{transport}"] = {
                "sender_peak_rss_mb": round(_vm_hwm_mb(net.node("n1").pid), 1),
                "receiver_peak_rss_mb": round(_vm_hwm_mb(net.node("n2").pid), 1),
                "sender_idle_rss_mb": idle[0], "receiver_idle_rss_mb": idle[1],
                "runs_transfer_s": [round(x["transfer_s"], 3) for x in shares],
                "runs_cli_wall_s": [round(x["cli_wall_s"], 3) for x in shares],
                "sender_cpu_s": round(statistics.median(x["sender_cpu_s"] for x in shares), 2),
                "receiver_cpu_s": round(statistics.median(x["receiver_cpu_s"] for x in shares), 2),
            }
            # what the same work would reach with a core per node: size / busiest side's CPU
            busiest = max(extra[f"share_{transport}"]["sender_cpu_s"],
                          extra[f"share_{transport}"]["receiver_cpu_s"])
            extra[f"share_{transport}"]["cpu_bound_mib_s"] = round(size / MIB / busiest, 1) \
                if busiest > 0 else None
        received.unlink(missing_ok=True)
    src.unlink(missing_ok=True)
    labels = {"secretstream": "secretstream push, one core (1 MiB msgs)",
              "plain_copy": "plain asyncio TCP file copy, no crypto",
              **{f"channel_{t}": f"{t} SecureChannel (bench_channel)" for t in transports},
              **{f"share_{t}": f"node share over {t}" for t in transports}}
    rows = [{"key": k, "row": labels[k], "median_mib_s": round(statistics.median(v), 1),
             "runs_mib_s": [round(x, 1) for x in v], **extra.get(k, {})}
            for k, v in runs.items()]
    return {"size_mib": size / MIB, "baseline_mib": baseline / MIB, "repeat": repeat,
            "rows": rows, "targets": _targets(rows),
            "machine": {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}}


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    v = {r["key"]: r for r in rows}
    out = []
    if "share_tcp" in v:
        need = TARGET_TCP_VS_SECRETSTREAM * v["secretstream"]["median_mib_s"]
        out.append({"target": f"tcp share >= {TARGET_TCP_VS_SECRETSTREAM}x secretstream",
                    "value": v["share_tcp"]["median_mib_s"], "need": round(need, 1),
                    "ok": v["share_tcp"]["median_mib_s"] >= need})
    for t in ("udp", "quic"):
        if f"share_{t}" in v and f"channel_{t}" in v:
            need = TARGET_VS_CHANNEL * v[f"channel_{t}"]["median_mib_s"]
            out.append({"target": f"{t} share >= {TARGET_VS_CHANNEL}x its channel",
                        "value": v[f"share_{t}"]["median_mib_s"], "need": round(need, 1),
                        "ok": v[f"share_{t}"]["median_mib_s"] >= need})
    for t in TRANSPORTS:
        if f"share_{t}" in v:
            peak = max(v[f"share_{t}"]["sender_peak_rss_mb"],
                       v[f"share_{t}"]["receiver_peak_rss_mb"])
            out.append({"target": f"{t} peak RSS < {TARGET_PEAK_RSS_MB:.0f} MB (both sides)",
                        "value": peak, "need": TARGET_PEAK_RSS_MB,
                        "ok": peak < TARGET_PEAK_RSS_MB})
    return out


def _print_table(result: dict[str, Any]) -> None:
    print(f"\nfile {result['size_mib']:.0f} MiB, baselines {result['baseline_mib']:.0f} MiB, "
          f"median of {result['repeat']}, load {result['machine']['loadavg'][0]:.2f} "
          f"on {result['machine']['cpus']} cpus\n")
    print(f"| {'what':<42} | {'MiB/s':>7} | {'runs':<22} | {'peak (idle) RSS snd/rcv':>23} | "
          f"{'CPU s snd/rcv':>13} | {'CPU-bound MiB/s':>15} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 24}|{'-' * 25}|{'-' * 15}|{'-' * 17}|")
    for r in result["rows"]:
        rss = cpu = bound = ""
        if "sender_peak_rss_mb" in r:
            rss = f"{r['sender_peak_rss_mb']:.0f}/{r['receiver_peak_rss_mb']:.0f} MB"
            if "sender_idle_rss_mb" in r:  # before the first share: what a share adds
                rss += f" ({r['sender_idle_rss_mb']:.0f}/{r['receiver_idle_rss_mb']:.0f})"
            cpu = f"{r['sender_cpu_s']:.2f}/{r['receiver_cpu_s']:.2f}"
            bound = f"{r['cpu_bound_mib_s']:.0f}" if r.get("cpu_bound_mib_s") else ""
        runs = ", ".join(f"{x:.0f}" for x in r["runs_mib_s"])
        print(f"| {r['row']:<42} | {r['median_mib_s']:>7.1f} | {runs:<22} | {rss:>23} | "
              f"{cpu:>13} | {bound:>15} |")
    print()
    for t in result["targets"]:
        mark = "PASS" if t["ok"] else "MISS"
        print(f"  [{mark}] {t['target']}: {t['value']:.1f} (need {t['need']:.1f})")


# ------------------------------------------------------------------------ --vs-scp: durable peers


def _reset_hwm(pid: int | None) -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS: `5` into /proc/PID/clear_refs."""
    if pid is None:
        return False
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cpu_with_children_s(pid: int) -> float:
    """utime + stime + cutime + cstime: a process plus the children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _fsync_path(path: Path) -> None:
    """fsync a file and the directory that names it (what the node does for a received file)."""
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dd_fdatasync_s(path: Path, size: int) -> float:
    """Wall time of `dd if=/dev/zero of=PATH bs=1M count=N conv=fdatasync`: the disk limit."""
    count = max(1, -(-size // MIB))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}",
                    "conv=fdatasync", "status=none"], check=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    path.unlink(missing_ok=True)
    return elapsed * size / (count * MIB)


def scp_missing() -> str | None:
    """Why the scp comparison cannot run, or None."""
    missing = [n for n, p in (("sshd", SSHD), ("scp", shutil.which("scp")),
                              ("ssh-keygen", shutil.which("ssh-keygen")))
               if p is None or not os.access(p, os.X_OK)]
    if missing:
        return (f"skipped: scp comparison: {', '.join(missing)} not installed "
                f"(apt-get install openssh-server openssh-client)")
    return None


class PrivateSshd:
    """An sshd of our own on 127.0.0.1: its own config, host key and client key in a temp dir.

    Started with `sshd -D -f CFG -E LOG` in its own session; `close()` kills that whole
    process group (the listener and any session it forked). As root it needs the
    privilege separation dir /run/sshd, which the openssh-server service would create.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.port = _free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.key = root / "client_ed25519"
        self.known_hosts = root / "known_hosts"
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        auth = self.root / "authorized_keys"
        auth.write_text(Path(f"{self.key}.pub").read_text())
        auth.chmod(0o600)
        cfg = self.root / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {HOST}", f"Port {self.port}", f"HostKey {host_key}",
            f"AuthorizedKeysFile {auth}", f"PidFile {self.root / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password" if os.getuid() == 0 else "PermitRootLogin no",
            "PrintMotd no", "X11Forwarding no", "AllowTcpForwarding no", "", ]))
        if os.getuid() == 0 and not Path(PRIVSEP_DIR).is_dir():
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        assert SSHD is not None
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(cfg), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with code {self.proc.returncode}: "
                                   f"{self._log_tail()}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {HOST}:{self.port}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def scp_cmd(self, src: Path, dest: Path) -> list[str]:
        return ["scp", "-q", "-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-i", str(self.key), "-P", str(self.port),
                "-O", "-c", SCP_CIPHER, str(src), f"{self.user}@{HOST}:{dest}"]

    def scp_once(self, src: Path, dest: Path) -> dict[str, float]:
        """scp SRC to DEST through this sshd, then fsync the copy: both times and CPU."""
        assert self.proc is not None
        server0 = _cpu_with_children_s(self.proc.pid)
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(self.scp_cmd(src, dest), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=SHARE_TIMEOUT_S)
        scp_s = time.perf_counter() - t0
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if res.returncode != 0:
            raise RuntimeError(f"scp failed (exit {res.returncode}): {res.stderr.strip()[-300:]}"
                               f"; sshd log: {self._log_tail()}")
        t1 = time.perf_counter()
        _fsync_path(dest)
        fsync_s = time.perf_counter() - t1
        if dest.stat().st_size != src.stat().st_size:
            raise RuntimeError(f"scp copy {dest} has {dest.stat().st_size} bytes")
        dest.unlink()
        # the sshd session processes have exited by now (scp waited for them); give the
        # listener a moment to reap them so their CPU shows up in its cutime/cstime
        deadline = time.monotonic() + 1.0
        server_s = _cpu_with_children_s(self.proc.pid) - server0
        while time.monotonic() < deadline and server_s <= 0:
            time.sleep(0.05)
            server_s = _cpu_with_children_s(self.proc.pid) - server0
        client_s = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        return {"scp_s": scp_s, "fsync_s": fsync_s, "durable_s": scp_s + fsync_s,
                "client_cpu_s": client_s, "server_cpu_s": server_s}

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _cli_alone_s(net: Testnet) -> float:
    """Wall time of `node peers --json`: the CLI's start plus one control call, the part
    of every `node share`'s wall time that moves no data."""
    t0 = time.perf_counter()
    net.cli("n1", "peers", "--json", json=False, check=True)
    return time.perf_counter() - t0


def _fs_of(path: Path) -> str:
    """"TYPE DEVICE on MOUNTPOINT" of the file system holding PATH (from /proc/mounts)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[2]} {best[1]} on {best[0] or '?'}"


def _fresh_file(workdir: Path, size: int, serial: int) -> Path:
    """A new random file under a new name: the node has never hashed it."""
    path = workdir / f"fresh-{size // MIB}m-{serial}.bin"
    _make_file(path, size)
    return path


def run_vs_scp(sizes: list[int], transports: list[str], repeat: int, workdir: Path,
               verify: bool, echo: Any) -> dict[str, Any]:
    """dd, scp (+ fsync) and `node share` per transport, interleaved run by run, per size.

    Every run of every row gets a FRESH random file (new name, new content), so each
    `node share` includes hashing the file for its manifest, as a user's first share does.
    """
    skipped: list[str] = []
    why = scp_missing()
    sshd: PrivateSshd | None = None
    if why:
        skipped.append(why)
        echo(why)
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        if why is None:
            sshd = PrivateSshd(workdir / "sshd")
            try:
                sshd.start()
                echo(f"private sshd on {HOST}:{sshd.port}")
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                msg = f"skipped: scp comparison: the private sshd did not start: {exc}"
                skipped.append(msg)
                echo(msg)
                sshd.close()
                sshd = None
        with Testnet(workdir / "net") as net:
            net.start_bootstrap(ttl_s=120)
            net.add_nodes(["n1", "n2"])
            net.trust_all()
            net.wait_until(lambda: net.sees("n1", ["n2"]), 45, what="n1 lists n2")
            pids = (net.node("n1").pid, net.node("n2").pid)
            scp_dest = workdir / "scp-dest"
            scp_dest.mkdir(exist_ok=True)
            serial = itertools.count(1)
            for size in sizes:
                for r in range(repeat):
                    last = r == repeat - 1
                    dd_s = dd_fdatasync_s(workdir / "dd.bin", size)
                    runs.setdefault((size, "dd"), []).append({"wall_s": dd_s})
                    line = [f"dd {dd_s:.2f} s"]
                    if sshd is not None:
                        src = _fresh_file(workdir, size, next(serial))
                        one = sshd.scp_once(src, scp_dest / src.name)
                        src.unlink()
                        runs.setdefault((size, "scp"), []).append(
                            {"wall_s": one["scp_s"], "sender_cpu_s": one["client_cpu_s"],
                             "receiver_cpu_s": one["server_cpu_s"]})
                        runs.setdefault((size, "scp_durable"), []).append(
                            {"wall_s": one["durable_s"], "fsync_s": one["fsync_s"]})
                        line.append(f"scp {one['scp_s']:.2f} s + fsync {one['fsync_s']:.2f} s")
                    cli_s = _cli_alone_s(net)
                    runs.setdefault((size, "cli"), []).append({"wall_s": cli_s})
                    line.append(f"cli {cli_s:.2f} s")
                    for transport in transports:
                        src = _fresh_file(workdir, size, next(serial))
                        received = net.node("n2").home / "received" / "n1" / src.name
                        digest = _sha256(src) if verify and last else None
                        before = [_vm_rss_mb(p) for p in pids]
                        reset = all([_reset_hwm(p) for p in pids])
                        share = _share_once(net, src, transport, received, digest)
                        received.unlink(missing_ok=True)
                        src.unlink()
                        runs.setdefault((size, f"share_{transport}"), []).append(
                            {"wall_s": share["cli_wall_s"], "transfer_s": share["transfer_s"],
                             "sender_cpu_s": share["sender_cpu_s"],
                             "receiver_cpu_s": share["receiver_cpu_s"],
                             "sender_peak_rss_mb": _vm_hwm_mb(pids[0]),
                             "receiver_peak_rss_mb": _vm_hwm_mb(pids[1]),
                             "sender_before_rss_mb": before[0],
                             "receiver_before_rss_mb": before[1],
                             "rss_since_start": 0.0 if reset else 1.0})
                        line.append(f"{transport} {share['cli_wall_s']:.2f} s")
                    echo(f"  {size / MIB:.0f} MiB run {r + 1}: " + ", ".join(line))
    finally:
        if sshd is not None:
            sshd.close()
    rows = [_vs_row(size, key, v) for (size, key), v in runs.items()]
    return {"mode": "vs-scp", "sizes_mib": [s / MIB for s in sizes], "repeat": repeat,
            "rows": rows, "targets": _vs_targets(rows, sizes, transports), "skipped": skipped,
            "machine": {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
                        "workdir_fs": _fs_of(workdir)}}


VS_LABELS = {"dd": "dd conv=fdatasync (disk limit)", "scp": f"scp -O -c {SCP_CIPHER}",
             "cli": "node CLI alone (`node peers`)",
             "scp_durable": "scp + fsync of the copy (durable)",
             **{f"share_{t}": f"node share over {t} (fresh file)" for t in TRANSPORTS}}


def _vs_row(size: int, key: str, v: list[dict[str, float]]) -> dict[str, Any]:
    mib = size / MIB
    wall = statistics.median(x["wall_s"] for x in v)
    row: dict[str, Any] = {"size_mib": mib, "key": key, "row": VS_LABELS[key],
                           "median_s": round(wall, 3), "mib_s": round(mib / wall, 1),
                           "runs_s": [round(x["wall_s"], 3) for x in v]}
    if "sender_cpu_s" in v[0]:
        row["sender_cpu_ms_per_mib"] = round(
            statistics.median(x["sender_cpu_s"] for x in v) * 1000 / mib, 2)
        row["receiver_cpu_ms_per_mib"] = round(
            statistics.median(x["receiver_cpu_s"] for x in v) * 1000 / mib, 2)
    if "sender_peak_rss_mb" in v[0]:
        row["sender_peak_rss_mb"] = round(max(x["sender_peak_rss_mb"] for x in v), 1)
        row["receiver_peak_rss_mb"] = round(max(x["receiver_peak_rss_mb"] for x in v), 1)
        row["peak_rss_since_node_start"] = any(x["rss_since_start"] for x in v)
        # what the node held before its first share of this row (the same pair serves
        # every size and transport: it carries what earlier shares left)
        row["sender_before_rss_mb"] = round(v[0]["sender_before_rss_mb"], 1)
        row["receiver_before_rss_mb"] = round(v[0]["receiver_before_rss_mb"], 1)
    if "transfer_s" in v[0]:
        row["median_transfer_s"] = round(statistics.median(x["transfer_s"] for x in v), 3)
    if "fsync_s" in v[0]:
        row["median_fsync_s"] = round(statistics.median(x["fsync_s"] for x in v), 3)
    return row


def _vs_targets(rows: list[dict[str, Any]], sizes: list[int],
                transports: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def ratio(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None,
              need: float) -> None:
        if a is None or b is None:
            return
        value = a["mib_s"] / b["mib_s"]
        out.append({"target": name, "value": round(value, 2), "need": need,
                    "ok": value >= need, "unit": "x",
                    "detail": f"{a['mib_s']:.1f} / {b['mib_s']:.1f} MiB/s"})

    for size in sizes:
        v = {r["key"]: r for r in rows if r["size_mib"] == size / MIB}
        tag = f"{size / MIB:.0f} MiB"
        tcp = v.get("share_tcp")
        ratio(f"{tag}: tcp share >= {TARGET_VS_DURABLE_SCP}x durable scp (scp + fsync)",
              tcp, v.get("scp_durable"), TARGET_VS_DURABLE_SCP)
        ratio(f"{tag}: tcp share >= {TARGET_VS_DD}x dd conv=fdatasync",
              tcp, v.get("dd"), TARGET_VS_DD)
        ratio(f"{tag}: udp share >= {TARGET_UDP_VS_TCP}x tcp share",
              v.get("share_udp"), tcp, TARGET_UDP_VS_TCP)
        ratio(f"{tag}: quic share >= {TARGET_QUIC_VS_TCP}x tcp share",
              v.get("share_quic"), tcp, TARGET_QUIC_VS_TCP)
        if tcp is not None:
            for side, need in (("sender", TARGET_SEND_CPU_MS_PER_MIB),
                               ("receiver", TARGET_RECV_CPU_MS_PER_MIB)):
                got = tcp[f"{side}_cpu_ms_per_mib"]
                out.append({"target": f"{tag}: tcp {side} CPU <= {need} ms/MiB",
                            "value": got, "need": need, "ok": got <= need, "unit": "ms/MiB",
                            "detail": ""})
        for t in transports:
            r = v.get(f"share_{t}")
            if r is not None:
                peak = max(r["sender_peak_rss_mb"], r["receiver_peak_rss_mb"])
                out.append({"target": f"{tag}: {t} peak RSS < {TARGET_VS_PEAK_RSS_MB:.0f} MB",
                            "value": peak, "need": TARGET_VS_PEAK_RSS_MB,
                            "ok": peak < TARGET_VS_PEAK_RSS_MB, "unit": "MB",
                            "detail": f"sender {r['sender_peak_rss_mb']:.0f} / receiver "
                                      f"{r['receiver_peak_rss_mb']:.0f} MB"})
    return out


def _print_vs_table(result: dict[str, Any]) -> None:
    print(f"\nmedian of {result['repeat']}, a fresh file per run, wall time of the client "
          f"command; load {result['machine']['loadavg'][0]:.2f} on "
          f"{result['machine']['cpus']} cpus; work dir on {result['machine']['workdir_fs']}\n")
    print(f"| {'size':>6} | {'what':<38} | {'s':>7} | {'MiB/s':>7} | {'runs s':<20} | "
          f"{'CPU ms/MiB snd/rcv':>18} | {'peak (before) RSS snd/rcv':>25} |")
    print(f"|{'-' * 8}|{'-' * 40}|{'-' * 9}|{'-' * 9}|{'-' * 22}|{'-' * 20}|{'-' * 27}|")
    for r in result["rows"]:
        cpu = rss = ""
        if "sender_cpu_ms_per_mib" in r:
            cpu = f"{r['sender_cpu_ms_per_mib']:.2f}/{r['receiver_cpu_ms_per_mib']:.2f}"
        if "sender_peak_rss_mb" in r:
            rss = (f"{r['sender_peak_rss_mb']:.0f}/{r['receiver_peak_rss_mb']:.0f} MB "
                   f"({r['sender_before_rss_mb']:.0f}/{r['receiver_before_rss_mb']:.0f})")
        runs = ", ".join(f"{x:.2f}" for x in r["runs_s"])
        rate = "" if r["key"] == "cli" else f"{r['mib_s']:.1f}"  # it moves no data
        print(f"| {r['size_mib']:>6.0f} | {r['row']:<38} | {r['median_s']:>7.2f} | "
              f"{rate:>7} | {runs:<20} | {cpu:>18} | {rss:>25} |")
    print()
    for r in result["rows"]:
        if "median_transfer_s" in r:
            print(f"  {r['size_mib']:.0f} MiB {r['row']}: the daemon's transfer (manifest "
                  f"hashing included) took {r['median_transfer_s']:.2f} s of the "
                  f"{r['median_s']:.2f} s; see the CLI-alone row for the CLI's own share")
    for s in result["skipped"]:
        print(f"  {s}")
    for t in result["targets"]:
        mark = "PASS" if t["ok"] else "MISS"
        detail = f"; {t['detail']}" if t["detail"] else ""
        print(f"  [{mark}] {t['target']}: {t['value']:.2f} {t['unit']} "
              f"(target {t['need']}{detail})")


def _sizes_mib(text: str) -> list[float]:
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in MiB (or a comma list): {text!r}") from None
    if not sizes or any(not 0 < x <= MAX_SIZE_MIB for x in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be in (0, {MAX_SIZE_MIB}] MiB: {text!r}")
    return sizes


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=_sizes_mib, default=[DEFAULT_SIZE_MIB],
                    help="size of the shared file (default 1024); with --vs-scp a comma "
                         "list such as 256,1024 runs each size in turn")
    ap.add_argument("--baseline-mib", type=float, default=DEFAULT_BASELINE_MIB,
                    help="bytes per secretstream/channel baseline run (default 256)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vs-scp", action="store_true",
                    help="compare with dd conv=fdatasync and scp through a private sshd "
                         "(the data-path issue's targets) instead of the channel baselines")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the SHA-256 comparison of the last received copy")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--file-sink", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop sshd/Syncthing and the nodes
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.file_sink:
        asyncio.run(_file_sink(args.file_sink))
        return 0
    transports = [t for t in args.transports.split(",") if t]
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports or args.repeat < 1:
        ap.error(f"bad --transports {bad} / --repeat")
    if len(args.size_mib) > 1 and not args.vs_scp:
        ap.error("a list of sizes needs --vs-scp")

    def echo(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="p2pfs-bench-transfer-")
        workdir = Path(tmp)
    else:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.vs_scp:
            result = run_vs_scp([int(x * MIB) for x in args.size_mib], transports, args.repeat,
                                workdir, not args.no_verify, echo)
        else:
            size = int(args.size_mib[0] * MIB)
            baseline = min(int(args.baseline_mib * MIB), size)
            result = run(size, max(MESSAGE_BYTES, baseline), transports,
                         args.repeat, workdir, not args.no_verify, echo)
    except KeyboardInterrupt:
        print("interrupted; every process this run started is stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError,
            TestnetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.vs_scp:
        _print_vs_table(result)
    else:
        _print_table(result)
    return 0 if all(t["ok"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

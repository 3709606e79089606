"""Benchmark: many small files dropped into a shared folder, until the peer has them all.

In ONE run, on 127.0.0.1:

* p2pfs: a bootstrap server and two `node start` processes (the testnet harness,
  scripts/testnet_lib.py); A shares a folder (`--share DIR`), A and B trust each
  other. ``--files`` files (default 2,000) of 1-10 KB, seeded (``--seed``), are
  written into a staging dir first and then dropped into A's folder (one rename
  each, so every file appears whole). The clock runs from the first rename until
  every file is under B's received dir (``received/A/<folder>/``) with its full
  size; the contents are compared (BLAKE2b) after the clock stops, not during.
* with ``--vs-syncthing`` (Debian's ``syncthing`` package): the same drop through
  two Syncthing instances on 127.0.0.1, a send-only folder on A and a
  receive-only folder with the same id on B; global and local discovery, relays,
  NAT traversal, crash reporting, usage reporting and upgrades off; the GUI/REST
  API on 127.0.0.1 with an API key; the file system watcher on with a 1 s delay
  (the node's watcher debounces 150 ms). Both instances run with HOME and their
  homes inside the work dir and STNODEFAULTFOLDER=1, and are killed at the end.
  When syncthing is missing it prints "skipped: ..." and runs the p2pfs side.

Before each measured drop both systems sync one warm-up file, so connections
and folder scans are done and the clock measures the drop alone. CPU seconds
per process are utime+stime (all threads, plus reaped children) from
/proc/<pid>/stat before and after the drop. Peak RSS (VmHWM) is reported too
(of the biggest process of each tree: Syncthing 1.19 runs a monitor process
and its worker even with --no-restart; CPU counts both).

Targets (ratios within this one run): p2pfs >= 1.0x Syncthing's files/s on the
same drop, and fewer CPU seconds (sender + receiver) than Syncthing.

    .venv/bin/python scripts/bench_smallfiles.py                    # p2pfs only
    .venv/bin/python scripts/bench_smallfiles.py --vs-syncthing     # both, same run
    .venv/bin/python scripts/bench_smallfiles.py --vs-syncthing --json

Imports the harness from scripts/; never the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, TestnetError  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_FILES = 2000
MAX_FILES = 100_000
MIN_FILE_BYTES = 1024
MAX_FILE_BYTES = 10 * 1024
DEFAULT_SEED = 1
SYNC_TIMEOUT_S = 600.0
JOIN_TIMEOUT_S = 45.0
WARMUP_TIMEOUT_S = 60.0
POLL_S = 0.05
SYNCTHING_START_TIMEOUT_S = 60.0
SYNCTHING_STOP_GRACE_S = 10.0
SYNCTHING_WATCH_DELAY_S = 1
SYNCTHING_FOLDER_ID = "p2pfs-bench"
TARGET_VS_SYNCTHING_RATE = 1.0
TRANSPORTS = ("tcp", "udp", "quic")


# --------------------------------------------------------------------------- files and processes


@dataclass(frozen=True, slots=True)
class Drop:
    """The seeded set of files: name -> content."""

    files: dict[str, bytes]

    @classmethod
    def make(cls, count: int, seed: int) -> Drop:
        rng = random.Random(seed)
        return cls({f"f{i:05d}.bin": rng.randbytes(rng.randint(MIN_FILE_BYTES, MAX_FILE_BYTES))
                    for i in range(count)})

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def stage(self, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (staging / name).write_bytes(data)

    def drop_into(self, staging: Path, folder: Path) -> None:
        """One rename per file (same file system): each file appears whole, in one event."""
        for name in self.files:
            os.rename(staging / name, folder / name)

    def arrived(self, folder: Path) -> int:
        """How many of the files are in FOLDER with their full size (names and sizes only)."""
        sizes: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError):
            with os.scandir(folder) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_file(follow_symlinks=False):
                            sizes[e.name] = e.stat(follow_symlinks=False).st_size
        return sum(1 for n, b in self.files.items() if sizes.get(n) == len(b))

    def wrong(self, folder: Path) -> list[str]:
        """Names whose content in FOLDER differs from the original (the check after the clock)."""
        bad = []
        for name, data in self.files.items():
            try:
                got = (folder / name).read_bytes()
            except OSError:
                bad.append(name)
                continue
            if hashlib.blake2b(got).digest() != hashlib.blake2b(data).digest():
                bad.append(name)
        return bad


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


def tree_cpu_s(pid: int) -> float:
    """utime+stime+cutime+cstime of a process and its live descendants, in seconds."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def vm_hwm_mb(pid: int) -> float:
    """Peak RSS of the biggest process in the tree (Syncthing runs a monitor + its worker)."""
    peak = float("nan")
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kb = int(line.split()[1]) / 1024
                    peak = kb if peak != peak or kb > peak else peak
        except OSError:
            continue
    return peak


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def measure_drop(drop: Drop, staging: Path, src: Path, dest: Path, pids: tuple[int, int],
                 timeout_s: float) -> dict[str, Any]:
    """Drop the staged files into SRC; time until DEST has them all; CPU of both processes."""
    cpu0 = [tree_cpu_s(p) for p in pids]
    t0 = time.perf_counter()
    drop.drop_into(staging, src)
    dropped_s = time.perf_counter() - t0
    n = len(drop.files)
    wait_for(lambda: drop.arrived(dest) == n, timeout_s, f"{n} files in {dest}")
    elapsed = time.perf_counter() - t0
    cpu = [tree_cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
    bad = drop.wrong(dest)
    if bad:
        raise RuntimeError(f"{len(bad)} files in {dest} differ from the originals, "
                           f"e.g. {bad[:3]}")
    return {"files": n, "bytes": drop.total_bytes, "seconds": round(elapsed, 3),
            "files_per_s": round(n / elapsed, 1), "drop_s": round(dropped_s, 3),
            "sender_cpu_s": round(cpu[0], 2), "receiver_cpu_s": round(cpu[1], 2),
            "cpu_s": round(cpu[0] + cpu[1], 2),
            "sender_peak_rss_mb": round(vm_hwm_mb(pids[0]), 1),
            "receiver_peak_rss_mb": round(vm_hwm_mb(pids[1]), 1)}


def _warm_up(src: Path, dest: Path, name: str, timeout_s: float) -> None:
    data = f"warm-up {name}\n".encode()
    (src / name).write_bytes(data)
    wait_for(lambda: (dest / name).is_file() and (dest / name).read_bytes() == data,
             timeout_s, f"the warm-up file in {dest}")


# --------------------------------------------------------------------------- p2pfs


def run_p2pfs(drop: Drop, workdir: Path, transport: str, timeout_s: float,
              echo: Callable[[str], None]) -> dict[str, Any]:
    src = workdir / "p2pfs" / "drop"
    inbox = workdir / "p2pfs" / "inbox-B"
    staging = workdir / "p2pfs" / "staging"
    for d in (src, inbox):
        d.mkdir(parents=True)
    drop.stage(staging)
    with Testnet(workdir / "p2pfs" / "net", transport=transport) as net:
        net.start_bootstrap(ttl_s=120)
        net.add_node("A", share=[src], start=False)
        net.add_node("B", received_dir=inbox, start=False)
        # trust is written before the daemons start (the CLI writes trust.db offline)
        net.cli("A", "trust", net.peer_id("B"), "--name", "B", json=False)
        net.cli("B", "trust", net.peer_id("A"), "--name", "A", json=False)
        net.start_many(["A", "B"])
        net.wait_all_see_each_other(timeout=JOIN_TIMEOUT_S)
        dest = inbox / "A" / src.name
        _warm_up(src, dest, "warm-up.txt", WARMUP_TIMEOUT_S)
        pa, pb = net.node("A").pid, net.node("B").pid
        assert pa is not None and pb is not None
        echo(f"p2pfs ({transport}): dropping {len(drop.files)} files")
        return {"system": f"p2pfs ({transport})",
                **measure_drop(drop, staging, src, dest, (pa, pb), timeout_s)}


# --------------------------------------------------------------------------- Syncthing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _set(parent: ET.Element, tag: str, text: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


class SyncthingInstance:
    """One headless Syncthing with its home in the work dir, GUI/REST and sync on 127.0.0.1."""

    def __init__(self, binary: str, name: str, home: Path, env: dict[str, str]) -> None:
        self.binary = binary
        self.name = name
        self.home = home
        self.env = env
        self.gui_port = _free_port()
        self.sync_port = _free_port()
        self.api_key = secrets.token_hex(16)
        self.log = home.parent / f"syncthing-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.device_id = ""

    def generate(self) -> None:
        res = subprocess.run([self.binary, "generate", "--home", str(self.home),
                              "--no-default-folder", "--skip-port-probing"],
                             env=self.env, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"syncthing generate failed: {res.stderr.strip()[-300:]}")
        device = ET.parse(self.home / "config.xml").getroot().find("device")
        if device is None:
            raise RuntimeError("syncthing generate wrote no device to config.xml")
        self.device_id = device.get("id", "")

    def configure(self, peer: SyncthingInstance, folder: Path, folder_type: str) -> None:
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = root.find("gui")
        assert gui is not None
        gui.set("enabled", "true")
        gui.set("tls", "false")
        _set(gui, "address", f"{HOST}:{self.gui_port}")
        _set(gui, "apikey", self.api_key)
        opts = root.find("options")
        assert opts is not None
        for tag, text in {"listenAddress": f"tcp://{HOST}:{self.sync_port}",
                          "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false",
                          "relaysEnabled": "false", "natEnabled": "false",
                          "crashReportingEnabled": "false", "urAccepted": "-1",
                          "autoUpgradeIntervalH": "0", "startBrowser": "false",
                          "setLowPriority": "false"}.items():
            _set(opts, tag, text)
        dev = ET.SubElement(root, "device", {"id": peer.device_id, "name": peer.name,
                                             "compression": "metadata", "introducer": "false"})
        _set(dev, "address", f"tcp://{HOST}:{peer.sync_port}")
        _set(dev, "paused", "false")
        _set(dev, "autoAcceptFolders", "false")
        fol = ET.SubElement(root, "folder", {
            "id": SYNCTHING_FOLDER_ID, "label": SYNCTHING_FOLDER_ID, "path": str(folder),
            "type": folder_type, "rescanIntervalS": "3600", "fsWatcherEnabled": "true",
            "fsWatcherDelayS": str(SYNCTHING_WATCH_DELAY_S), "ignorePerms": "false",
            "autoNormalize": "true"})
        _set(fol, "filesystemType", "basic")
        ET.SubElement(fol, "device", {"id": self.device_id, "introducedBy": ""})
        ET.SubElement(fol, "device", {"id": peer.device_id, "introducedBy": ""})
        _set(fol, "markerName", ".stfolder")
        _set(fol, "paused", "false")
        (folder / ".stfolder").mkdir(parents=True, exist_ok=True)
        # ET.indent exists from 3.9; keeps the file readable for whoever debugs a run
        ET.indent(tree)
        tree.write(path, encoding="unicode")

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--home", str(self.home), "--no-browser",
                 "--no-restart", "--no-upgrade"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def get(self, endpoint: str) -> Any:
        req = urllib.request.Request(f"http://{HOST}:{self.gui_port}{endpoint}",
                                     headers={"X-API-Key": self.api_key})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def try_get(self, endpoint: str) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"syncthing {self.name} exited with code "
                               f"{self.proc.returncode}; log {self.log}")
        try:
            return self.get(endpoint)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def connected_to(self, peer: SyncthingInstance) -> bool:
        conns = self.try_get("/rest/system/connections")
        return bool(conns and conns.get("connections", {}).get(peer.device_id, {})
                    .get("connected"))

    def folder_idle(self) -> bool:
        st = self.try_get(f"/rest/db/status?folder={SYNCTHING_FOLDER_ID}")
        return bool(st and st.get("state") == "idle")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=SYNCTHING_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def run_syncthing(binary: str, drop: Drop, workdir: Path, timeout_s: float,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    base = workdir / "syncthing"
    home = base / "home"
    src, dest, staging = base / "A-send", base / "B-receive", base / "staging"
    for d in (home, src, dest):
        d.mkdir(parents=True)
    drop.stage(staging)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STN")}
    env.update({"HOME": str(home), "STNODEFAULTFOLDER": "1", "STNOUPGRADE": "1",
                "STNORESTART": "1", "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_STATE_HOME": str(home / ".local" / "state"),
                "XDG_DATA_HOME": str(home / ".local" / "share")})
    a = SyncthingInstance(binary, "A", base / "st-A", env)
    b = SyncthingInstance(binary, "B", base / "st-B", env)
    try:
        a.generate()
        b.generate()
        a.configure(b, src, "sendonly")
        b.configure(a, dest, "receiveonly")
        a.start()
        b.start()
        echo(f"syncthing A (pid {a.pid}) and B (pid {b.pid}) starting")
        wait_for(lambda: a.connected_to(b) and b.connected_to(a), SYNCTHING_START_TIMEOUT_S,
                 "the two Syncthing instances to connect")
        wait_for(lambda: a.folder_idle() and b.folder_idle(), SYNCTHING_START_TIMEOUT_S,
                 "both Syncthing folders idle")
        _warm_up(src, dest, "warm-up.txt", WARMUP_TIMEOUT_S)
        echo(f"syncthing: dropping {len(drop.files)} files")
        return {"system": "Syncthing " + _syncthing_version(binary),
                **measure_drop(drop, staging, src, dest, (a.pid, b.pid), timeout_s)}
    finally:
        a.stop()
        b.stop()


def _syncthing_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out[1] if len(out) > 1 else ""


# --------------------------------------------------------------------------- report


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ours = next((r for r in rows if r["system"].startswith("p2pfs")), None)
    st = next((r for r in rows if r["system"].startswith("Syncthing")), None)
    if ours is None or st is None:
        return []
    ratio = ours["files_per_s"] / st["files_per_s"]
    return [
        {"target": f"files/s >= {TARGET_VS_SYNCTHING_RATE}x Syncthing's on the same drop",
         "value": round(ratio, 2), "need": TARGET_VS_SYNCTHING_RATE, "unit": "x",
         "ok": ratio >= TARGET_VS_SYNCTHING_RATE,
         "detail": f"{ours['files_per_s']:.1f} vs {st['files_per_s']:.1f} files/s"},
        {"target": "CPU seconds (sender + receiver) < Syncthing's",
         "value": ours["cpu_s"], "need": st["cpu_s"], "unit": "s",
         "ok": ours["cpu_s"] < st["cpu_s"],
         "detail": f"{ours['cpu_s']:.2f} vs {st['cpu_s']:.2f} s"},
    ]


def _print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['files']} files, {result['bytes'] / 1024:.0f} KiB, seed {result['seed']}; "
          f"load {result['machine']['loadavg'][0]:.2f} on {result['machine']['cpus']} cpus\n")
    print(f"| {'system':<22} | {'seconds':>7} | {'files/s':>8} | {'CPU s snd/rcv':>13} | "
          f"{'CPU s':>6} | {'peak RSS snd/rcv':>16} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 18}|")
    for r in result["rows"]:
        cpu = f"{r['sender_cpu_s']:.2f}/{r['receiver_cpu_s']:.2f}"
        rss = f"{r['sender_peak_rss_mb']:.0f}/{r['receiver_peak_rss_mb']:.0f} MB"
        print(f"| {r['system']:<22} | {r['seconds']:>7.2f} | {r['files_per_s']:>8.1f} | "
              f"{cpu:>13} | {r['cpu_s']:>6.2f} | {rss:>16} |")
    print()
    for s in result["skipped"]:
        print(f"  {s}")
    for t in result["targets"]:
        mark = "PASS" if t["ok"] else "MISS"
        print(f"  [{mark}] {t['target']}: {t['value']} {t['unit']} (target {t['need']}; "
              f"{t['detail']})")


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=DEFAULT_FILES,
                    help=f"how many files (default {DEFAULT_FILES})")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of sizes and contents")
    ap.add_argument("--transport", choices=TRANSPORTS, default="tcp",
                    help="p2pfs transport (default tcp)")
    ap.add_argument("--vs-syncthing", action="store_true",
                    help="run the same drop through two Syncthing instances in the same run")
    ap.add_argument("--timeout", type=float, default=SYNC_TIMEOUT_S,
                    help="seconds to wait for each side to receive every file")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop sshd/Syncthing and the nodes
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not 1 <= args.files <= MAX_FILES or args.timeout <= 0:
        ap.error(f"--files must be 1..{MAX_FILES} and --timeout positive")

    def echo(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="p2pfs-bench-smallfiles-")
        workdir = Path(tmp)
    else:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    drop = Drop.make(args.files, args.seed)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        rows.append(run_p2pfs(drop, workdir, args.transport, args.timeout, echo))
        if args.vs_syncthing:
            binary = shutil.which("syncthing")
            if binary is None:
                skipped.append("skipped: Syncthing comparison: syncthing not installed "
                               "(apt-get install syncthing)")
                echo(skipped[-1])
            else:
                rows.append(run_syncthing(binary, drop, workdir, args.timeout, echo))
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
    result = {"files": len(drop.files), "bytes": drop.total_bytes, "seed": args.seed,
              "rows": rows, "targets": _targets(rows), "skipped": skipped,
              "machine": {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0 if all(t["ok"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

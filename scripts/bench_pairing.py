"""Benchmark: `node accept CODE` to mutual trust, with real node processes on 127.0.0.1.

Starts a bootstrap server (which hosts the pairing mailbox) and two nodes through
scripts/testnet_lib.py. Each trial: node a runs `node invite --json` (a process that
prints the code and waits); once the code is printed, node b runs `node accept CODE
--json`. Reported per trial, medians and worst over the trials:

* accept_ms: wall time of the whole `node accept` process (Python start-up and the
  CLI's imports included), from its launch to its exit: b trusts a at exit;
* mutual_ms: from launching `node accept` until both CLIs have exited (a trusts b);
* daemon_ms: inside b's daemon, from the accept request to b trusting a (claim,
  SPAKE2, both boxes: what pairing costs without the CLI process);
* exchange_ms: the part of daemon_ms after both SPAKE2 messages were at hand;
* cli_baseline_ms: wall time of `node status --json` on b, for scale: what a CLI
  process costs before it does anything.

Target: accept_ms < 1000 on 127.0.0.1. The mailbox allows 10 claims at once per
address (then one per 2 s), so keep --trials at 10 or fewer.

Then one-shot send throughput against `node share` of the same file between the same
two nodes (--send-mb, default 128; --send-trials, default 3, alternating): each trial
removes b's copy first, so every byte moves; one untimed warm-up of each comes first,
and the order alternates. Reported as medians:

* send_rate_MBps: `node send FILE` on a, `node receive CODE --yes` on b; the rate b's
  daemon reports (file bytes over the time from the open channel to a verified,
  fsynced copy; the code exchange before it is not transfer time);
* share_rate_MBps: `node share FILE --to b`; the rate b's daemon reports for it in
  `node transfers` (the same span: open channel to verified, fsynced copy);
* share_sender_rate_MBps: the rate a's `node share` prints (its span ends when b
  confirms, and starts before the channel is set up), for reference;
* send_wall_s / share_wall_s: the whole `node receive` / `node share` process, for scale;
* ratio: send_rate / share_rate (target >= 0.9).

Usage:
    .venv/bin/python scripts/bench_pairing.py               # 5 trials, table
    .venv/bin/python scripts/bench_pairing.py --trials 8 --json
    .venv/bin/python scripts/bench_pairing.py --send-mb 64 --send-trials 3
    .venv/bin/python scripts/bench_pairing.py --send-trials 0   # pairing only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
for _p in (str(SCRIPTS_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from testnet_lib import Testnet, TestnetError  # noqa: E402

MAX_TRIALS = 10
KEYS = ("accept_ms", "mutual_ms", "daemon_ms", "exchange_ms", "cli_baseline_ms")
SEND_KEYS = ("send_rate_MBps", "share_rate_MBps", "share_sender_rate_MBps", "send_wall_s",
             "share_wall_s")
MAX_SEND_MB = 2048
MIB = 1 << 20


def one_trial(net: Testnet) -> dict[str, float]:
    home_a, home_b = str(net.node("a").home), str(net.node("b").home)
    invite = subprocess.Popen([*net.node_cmd, "invite", "--json", "--home", home_a],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    try:
        assert invite.stdout is not None
        line = invite.stdout.readline()
        if not line:
            raise TestnetError(f"node invite printed no code: {invite.communicate()[1]}")
        code = json.loads(line)["event"]["code"]
        t0 = time.perf_counter()
        accept = subprocess.run([*net.node_cmd, "accept", code, "--json", "--home", home_b],
                                capture_output=True, text=True, env=net.env, cwd=net.root,
                                stdin=subprocess.DEVNULL, timeout=60)
        t_accept = time.perf_counter()
        _, err = invite.communicate(timeout=60)
        t_both = time.perf_counter()
    finally:
        if invite.poll() is None:
            invite.kill()
            invite.wait()
    if accept.returncode != 0 or invite.returncode != 0:
        raise TestnetError(f"pairing failed: {accept.stderr.strip()} {err.strip()}")
    result = json.loads(accept.stdout)
    return {"accept_ms": (t_accept - t0) * 1000, "mutual_ms": (t_both - t0) * 1000,
            "exchange_ms": float(result["exchange_ms"]), "daemon_ms": float(result["accept_ms"]),
            "cli_baseline_ms": cli_baseline_ms(net, home_b)}


def cli_baseline_ms(net: Testnet, home: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([*net.node_cmd, "status", "--json", "--home", home], capture_output=True,
                   env=net.env, cwd=net.root, stdin=subprocess.DEVNULL, timeout=60, check=True)
    return (time.perf_counter() - t0) * 1000


def _clear_received(net: Testnet, name: str) -> None:
    h = net.node(name)
    base = h.received_dir or h.home / "received"
    if base.is_dir():
        for child in base.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _last_json(out: str) -> Any:
    rest = [line for line in out.splitlines() if not line.startswith('{"event": ')]
    return json.loads("\n".join(rest))


def send_trial(net: Testnet, path: Path) -> dict[str, float]:
    """One `node send` on a + `node receive --yes` on b of `path`."""
    _clear_received(net, "b")
    home_a, home_b = str(net.node("a").home), str(net.node("b").home)
    send = subprocess.Popen([*net.node_cmd, "send", str(path), "--json", "--home", home_a],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    try:
        assert send.stdout is not None
        line = send.stdout.readline()
        if not line:
            raise TestnetError(f"node send printed no code: {send.communicate()[1]}")
        code = json.loads(line)["event"]["code"]
        t0 = time.perf_counter()
        rcv = subprocess.run([*net.node_cmd, "receive", code, "--yes", "--json",
                              "--home", home_b], capture_output=True, text=True, env=net.env,
                             cwd=net.root, stdin=subprocess.DEVNULL, timeout=300)
        wall = time.perf_counter() - t0
        if rcv.returncode != 0:
            raise TestnetError(f"node receive failed: {rcv.stderr.strip()}")
        _, err = send.communicate(timeout=60)
    finally:
        if send.poll() is None:
            send.kill()
            send.communicate()
    if rcv.returncode != 0 or send.returncode != 0:
        raise TestnetError(f"send/receive failed: {rcv.stderr.strip()} {err.strip()}")
    res = _last_json(rcv.stdout)
    if res["bytes_received"] != path.stat().st_size:
        raise TestnetError(f"receive moved {res['bytes_received']} bytes, not the whole file")
    return {"send_rate_MBps": res["rate_bps"] / 1e6, "send_wall_s": wall,
            "send_path": res.get("path", ""), "send_transport": res.get("transport", "")}


def share_trial(net: Testnet, path: Path) -> dict[str, float]:
    _clear_received(net, "b")
    t0 = time.perf_counter()
    proc = net.cli("a", "share", str(path), "--to", net.peer_id("b"), "--json", json=False,
                   timeout=300)
    wall = time.perf_counter() - t0
    [t] = _last_json(proc.stdout)["transfers"]
    if t["state"] != "done" or t["bytes_on_wire"] < path.stat().st_size:
        raise TestnetError(f"share failed or moved less than the file: {t}")
    # b's own row of it: the receiver's rate, measured as a one-shot receive's is
    rows = [r for r in net.cli("b", "transfers") if r["direction"] == "receive"
            and r["state"] == "done"]
    latest = max(rows, key=lambda r: r["started_at"])
    return {"share_rate_MBps": latest["rate_bps"] / 1e6, "share_wall_s": wall,
            "share_sender_rate_MBps": t["rate_bps"] / 1e6}


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())  # its write-back must not compete with the first trial


def run_benchmark(trials: int, send_trials: int = 0, send_mb: int = 128) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pairing-") as root, Testnet(Path(root)) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["a", "b"])
        rows = [one_trial(net) for _ in range(trials)]
        send_rows: list[dict[str, float]] = []
        if send_trials:
            if not rows:  # share needs mutual trust: pair once
                one_trial(net)
            path = Path(root) / "payload.bin"
            _write_random(path, send_mb * MIB)
            send_trial(net, path)  # warm-up, not counted: first channel, caches, threads
            share_trial(net, path)
            for i in range(send_trials):  # alternate the order: drift hits both alike
                if i % 2:
                    share = share_trial(net, path)
                    send_rows.append({**send_trial(net, path), **share})
                else:
                    send_rows.append({**send_trial(net, path), **share_trial(net, path)})
    out: dict[str, Any] = {"trials": trials, "load_avg_1m": round(os.getloadavg()[0], 2)}
    for key in KEYS if rows else ():
        values = [r[key] for r in rows]
        out[key] = {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}
    if send_rows:
        out["send"] = {"trials": send_trials, "file_mb": send_mb}
        out["send"]["paths"] = sorted({f"{r['send_transport']} {r['send_path']}"
                                       for r in send_rows})
        for key in SEND_KEYS:
            out["send"][key] = round(statistics.median(r[key] for r in send_rows), 2)
        out["send"]["ratio"] = round(out["send"]["send_rate_MBps"]
                                     / out["send"]["share_rate_MBps"], 2)
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"pairing on 127.0.0.1, {res['trials']} trials (load average "
             f"{res['load_avg_1m']}):"]
    if res["trials"]:
        lines.append(f"{'':<16}{'median':>10}{'worst':>10}")
        for key in KEYS:
            lines.append(f"{key:<16}{res[key]['median']:>8.1f}ms{res[key]['max']:>8.1f}ms")
    send = res.get("send")
    if send:
        lines.append(f"one-shot send vs share of one {send['file_mb']} MiB file, medians of "
                     f"{send['trials']}:")
        lines.append(f"  send  {send['send_rate_MBps']:>8.1f} MB/s  (node receive "
                     f"{send['send_wall_s']:.2f} s wall)")
        lines.append(f"  share {send['share_rate_MBps']:>8.1f} MB/s  (node share "
                     f"{send['share_wall_s']:.2f} s wall; the sender reports "
                     f"{send['share_sender_rate_MBps']:.1f} MB/s)")
        lines.append(f"  ratio {send['ratio']:.2f}  (target >= 0.9)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help=f"1-{MAX_TRIALS} (default 5)")
    ap.add_argument("--send-trials", type=int, default=3,
                    help="one-shot send vs share trials (default 3; 0 skips them)")
    ap.add_argument("--send-mb", type=int, default=128, help="file size in MiB (default 128)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    if not 0 <= args.trials <= MAX_TRIALS:
        print(f"error: --trials must be 0-{MAX_TRIALS}", file=sys.stderr)
        return 2
    if not 0 <= args.send_trials <= MAX_TRIALS or not 1 <= args.send_mb <= MAX_SEND_MB:
        print(f"error: --send-trials must be 0-{MAX_TRIALS}, --send-mb 1-{MAX_SEND_MB}",
              file=sys.stderr)
        return 2
    try:
        res = run_benchmark(args.trials, args.send_trials, args.send_mb)
    except (TestnetError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

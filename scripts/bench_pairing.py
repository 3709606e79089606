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

Usage:
    .venv/bin/python scripts/bench_pairing.py               # 5 trials, table
    .venv/bin/python scripts/bench_pairing.py --trials 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_benchmark(trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pairing-") as root, Testnet(Path(root)) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["a", "b"])
        rows = [one_trial(net) for _ in range(trials)]
    out: dict[str, Any] = {"trials": trials, "load_avg_1m": round(os.getloadavg()[0], 2)}
    for key in KEYS:
        values = [r[key] for r in rows]
        out[key] = {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"pairing on 127.0.0.1, {res['trials']} trials (load average "
             f"{res['load_avg_1m']}):", f"{'':<16}{'median':>10}{'worst':>10}"]
    for key in KEYS:
        lines.append(f"{key:<16}{res[key]['median']:>8.1f}ms{res[key]['max']:>8.1f}ms")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help=f"1-{MAX_TRIALS} (default 5)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    if not 1 <= args.trials <= MAX_TRIALS:
        print(f"error: --trials must be 1-{MAX_TRIALS}", file=sys.stderr)
        return 2
    try:
        res = run_benchmark(args.trials)
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

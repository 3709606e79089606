#!/usr/bin/env python3
"""Command-line launcher for local p2pfs testnets (bootstrap server + N real nodes).

    testnet.py up -n 5 [--dir DIR] [--transport tcp|udp|quic]   start, leave running
    testnet.py status [--dir DIR] [--json]                        who is alive, who sees whom
    testnet.py down [--dir DIR]                                   stop everything recorded
    testnet.py run SCENARIO [--dir DIR] [--json]                  run a .toml/.py scenario

`run` always tears down at the end, on failure and on Ctrl-C/SIGTERM, and prints
a per-step report with the log path of every node. All logic lives in
`testnet_lib.py`; this file only parses arguments and prints. It must not import
the project's packages (it drives them through the `node` CLI).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testnet_lib import (
    STATE_FILE_NAME,
    TRANSPORTS,
    Testnet,
    TestnetError,
    pid_alive,
    run_scenario,
)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def default_dir() -> Path:
    env = os.environ.get("P2PFS_TESTNET_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"p2pfs-testnet-{getpass.getuser()}"


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _echo(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    state = root / STATE_FILE_NAME
    if state.exists():
        try:
            old = Testnet.load_state(root)
            alive = [p.pid for p in old._all_processes if p.alive()]
        except TestnetError:
            alive = []
        if alive:
            print(f"a testnet is already running in {root} (pids {alive}); "
                  f"run `testnet.py down --dir {root}` first", file=sys.stderr)
            return EXIT_FAILED
    for sub in ("nodes", "logs", "bootstrap-server", "share"):
        shutil.rmtree(root / sub, ignore_errors=True)
    state.unlink(missing_ok=True)
    net = Testnet(root, transport=args.transport, detached=True, echo=_echo)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        net.start_bootstrap(ttl_s=args.ttl)
        timings["bootstrap_ready_s"] = time.monotonic() - t0
        names = [f"n{i}" for i in range(1, args.n + 1)]
        share_dirs = {}
        for n in names:
            share_dirs[n] = root / "share" / n
            share_dirs[n].mkdir(parents=True, exist_ok=True)
        for n in names:
            net.add_node(n, share=[share_dirs[n]], start=False)
        t1 = time.monotonic()
        net.start_many(names)
        timings["nodes_ready_s"] = time.monotonic() - t1
        net.save_state()
        if args.wait_peers:
            net.wait_all_see_each_other(names, timeout=args.timeout)
            timings["all_see_each_other_s"] = time.monotonic() - t1
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported; never leak nodes
        net.teardown()
        print(f"testnet up failed: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED
    print(f"testnet up in {root}: bootstrap {net.bootstrap_url}, {args.n} nodes; "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    _print_status(net, as_json=False)
    print(f"stop it with: {sys.executable} {Path(__file__).resolve()} down --dir {root}")
    return 0


def _status(net: Testnet) -> dict[str, Any]:
    b = net.bootstrap_process
    out: dict[str, Any] = {
        "root": str(net.root),
        "bootstrap": {"url": net.bootstrap_url if net.bootstrap_port else None,
                      "pid": b.pid if b else None, "alive": bool(b and b.alive()),
                      "log": str(net.bootstrap_log)},
        "nodes": [],
    }
    for name, h in net.nodes.items():
        alive = h.running()
        peers: int | None = None
        error = ""
        if alive:
            try:
                peers = len(net.cli(name, "peers", json=True, timeout=10))
            except TestnetError as exc:
                error = str(exc)
        out["nodes"].append({"name": name, "pid": h.pid, "alive": alive, "peer_id": h.peer_id,
                             "peers": peers, "dht": h.dht_addr, "ports": h.ports,
                             "home": str(h.home), "log": str(h.log_path), "error": error})
    return out


def _print_status(net: Testnet, *, as_json: bool) -> dict[str, Any]:
    st = _status(net)
    if as_json:
        print(json.dumps(st, indent=2))
        return st
    b = st["bootstrap"]
    print(f"bootstrap  {'up  ' if b['alive'] else 'DOWN'}  pid {b['pid']}  {b['url']}")
    print(f"{'node':<8} {'state':<5} {'pid':>7}  {'peers':>5}  {'dht':<21} peer id")
    for n in st["nodes"]:
        pid = (n["peer_id"] or "?")[:23]
        peers = "-" if n["peers"] is None else str(n["peers"])
        print(f"{n['name']:<8} {'up' if n['alive'] else 'DOWN':<5} {n['pid'] or '-':>7}  "
              f"{peers:>5}  {n['dht']:<21} {pid}")
        if n["error"]:
            print(f"         ! {n['error']}")
    return st


def cmd_status(args: argparse.Namespace) -> int:
    try:
        net = Testnet.load_state(Path(args.dir))
    except TestnetError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    st = _print_status(net, as_json=args.json)
    all_up = st["bootstrap"]["alive"] and all(n["alive"] for n in st["nodes"])
    return 0 if all_up else EXIT_FAILED


def cmd_down(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    try:
        net = Testnet.load_state(root)
    except TestnetError:
        # nothing recorded: still stop stray processes started from this dir
        net = Testnet(root, detached=True)
    pids = net.teardown(strays=True)
    left = [p for p in pids if pid_alive(p)]
    (root / STATE_FILE_NAME).unlink(missing_ok=True)
    print(f"testnet in {root} down; stopped {len(pids)} process(es); logs kept in {root / 'logs'}")
    if left:
        print(f"still alive: {left}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    scenario = Path(args.scenario)
    if not scenario.exists():
        here = Path(__file__).resolve().parent / "scenarios" / args.scenario
        if here.exists():
            scenario = here
        else:
            print(f"no scenario file {args.scenario}", file=sys.stderr)
            return EXIT_FAILED
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2pfs-scenario-"))
    report = run_scenario(scenario, root, transport=args.transport,
                          echo=None if args.json else _echo)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.format())
    if report.ok:
        return 0
    return EXIT_INTERRUPTED if report.error.startswith("interrupted") else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testnet.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a bootstrap server and N nodes; leave them running")
    up.add_argument("-n", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--dir", default=str(default_dir()), help="testnet dir (homes, logs, state)")
    up.add_argument("--transport", choices=TRANSPORTS, default="tcp")
    up.add_argument("--ttl", type=float, default=None, help="bootstrap registration TTL (s)")
    up.add_argument("--wait-peers", action="store_true",
                    help="also wait until every node lists every other one (and time it)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds for --wait-peers")
    st = sub.add_parser("status", help="which processes are alive and how many peers each sees")
    st.add_argument("--dir", default=str(default_dir()))
    st.add_argument("--json", action="store_true")
    dn = sub.add_parser("down", help="stop every process recorded (and strays from the dir)")
    dn.add_argument("--dir", default=str(default_dir()))
    rn = sub.add_parser("run", help="run a scenario (.toml or .py) in a fresh testnet")
    rn.add_argument("scenario", help="path, or a file name under scripts/scenarios/")
    rn.add_argument("--dir", default=None, help="where homes and logs go (default: a temp dir)")
    rn.add_argument("--transport", choices=TRANSPORTS, default="tcp")
    rn.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "n", 1) < 1:
        print("-n must be at least 1", file=sys.stderr)
        return EXIT_FAILED
    # SIGTERM unwinds like Ctrl-C, so every `finally: teardown()` runs
    signal.signal(signal.SIGTERM, _raise_interrupt)
    handlers = {"up": cmd_up, "status": cmd_status, "down": cmd_down, "run": cmd_run}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # `testnet.py status --json | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

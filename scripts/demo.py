#!/usr/bin/env python3
"""The local demo: a bootstrap server and 3 p2pfs nodes on 127.0.0.1, finding each other.

    .venv/bin/python scripts/demo.py [--dir DIR] [--keep] [--transport tcp|udp|quic]
                                     [--size-kib N] [--timeout S]

1. starts a bootstrap server and nodes n1, n2, n3 (real processes, own home dirs),
2. waits until each lists the other two in `node peers --json`, prints a table,
3. if the CLI offers `trust` and `share`: the nodes trust each other, n1 shares a
   generated file with n2 and n3, and the demo waits until each received copy
   has the same SHA-256 as the original,
4. tears everything down (or, with --keep, leaves it running; stop it with
   `scripts/testnet.py down --dir DIR`).

Exits non-zero with a one-line reason on any failure. It drives the nodes only
through the `node` CLI (via testnet_lib); it must not import the project's packages.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testnet_lib import TRANSPORTS, Testnet, TestnetError, normalize_peer_id

NODE_NAMES = ("n1", "n2", "n3")
DEFAULT_FILE_SIZE_KIB = 1024
DEFAULT_TIMEOUT_S = 60.0
HASH_CHUNK_BYTES = 1 << 20


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def peers_table(net: Testnet, names: tuple[str, ...]) -> str:
    rows = [("node", "sees", "peer id", "address", "source")]
    for n in names:
        listed = net.cli(n, "peers", json=True)
        for p in sorted(listed, key=lambda p: net.name_of(str(p.get("peer_id", ""))) or "~"):
            pid = str(p.get("peer_id", "?"))
            who = net.name_of(pid) or "(outside)"
            hosts = p.get("hosts") or []
            ports = p.get("ports") or {}
            addr = f"{hosts[0] if hosts else '?'}" + (
                f" tcp:{ports['tcp']}" if isinstance(ports, dict) and "tcp" in ports else "")
            src = p.get("source", "")
            src = ",".join(src) if isinstance(src, list) else str(src)
            rows.append((n, who, normalize_peer_id(pid)[:16] + "...", addr, src))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("    " + ln for ln in lines)


def find_received(received_dir: Path, size: int, digest: str) -> Path | None:
    """A fully written file in `received_dir` with the original's size and SHA-256."""
    if not received_dir.is_dir():
        return None
    for p in received_dir.rglob("*"):
        try:
            if p.is_file() and p.stat().st_size == size and sha256_file(p) == digest:
                return p
        except OSError:
            continue
    return None


def run_demo(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2pfs-demo-"))
    say(f"working dir {root} (node homes and logs)")
    net = Testnet(root, transport=args.transport, detached=args.keep,
                  echo=lambda m: say("  " + m))
    ok = False
    try:
        say("starting the bootstrap server")
        net.start_bootstrap()
        say(f"bootstrap server up at {net.bootstrap_url}")
        shares = {}
        for n in NODE_NAMES:
            shares[n] = root / "share" / n
            shares[n].mkdir(parents=True, exist_ok=True)
        say(f"starting nodes {', '.join(NODE_NAMES)}")
        for n in NODE_NAMES:
            net.add_node(n, share=[shares[n]], received_dir=root / "received" / n, start=False)
        net.start_many(list(NODE_NAMES))
        for n in NODE_NAMES:
            say(f"  {n}: peer id {net.peer_id(n)}")
        say("waiting until every node lists the other two (`node peers --json`)")
        net.wait_all_see_each_other(list(NODE_NAMES), timeout=args.timeout)
        say("every node sees the other two:")
        print(peers_table(net, NODE_NAMES), flush=True)

        if net.offers("trust", "share"):
            share_file(net, root, args)
        else:
            say("this build's CLI has no `share` command yet: skipping the file transfer part")
        ok = True
        if args.keep:
            state = net.save_state()
            say(f"--keep: the network stays up (state in {state})")
            say(f"stop it with: {sys.executable} {Path(__file__).resolve().parent / 'testnet.py'}"
                f" down --dir {root}")
        say("demo PASSED")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (TestnetError, OSError) as exc:
        say(f"demo FAILED: {exc}")
        return 1
    finally:
        if not (ok and args.keep):
            say("tearing down")
            net.teardown()
            say(f"logs kept in {root / 'logs'}")


def share_file(net: Testnet, root: Path, args: argparse.Namespace) -> None:
    say("making the nodes trust each other (`node trust`)")
    net.trust_all(list(NODE_NAMES))
    src = root / "share" / "n1" / "demo-file.bin"
    size = args.size_kib * 1024
    src.write_bytes(os.urandom(size))
    digest = sha256_file(src)
    say(f"n1 shares {src.name} ({size} bytes, sha256 {digest[:16]}...) with n2 and n3")
    out = net.cli("n1", "share", str(src), "--to", net.peer_id("n2"), "--to",
                  net.peer_id("n3"), "--transport", args.transport, json=False,
                  timeout=args.timeout)
    for line in out.stdout.strip().splitlines()[-5:]:
        say(f"  n1> {line}")
    for n in ("n2", "n3"):
        received_dir = net.node(n).received_dir or net.node(n).home / "received"
        got: Path = net.wait_until(functools.partial(find_received, received_dir, size, digest),
                                  args.timeout, 0.3, f"{n} has received {src.name} intact")
        say(f"  {n} received {got} - sha256 {sha256_file(got)[:16]}... matches")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="where homes and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="leave the network running at the end")
    p.add_argument("--transport", choices=TRANSPORTS, default="tcp")
    p.add_argument("--size-kib", type=int, default=DEFAULT_FILE_SIZE_KIB,
                   help="size of the shared file in KiB (default 1024)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds to wait for each step (default 60)")
    args = p.parse_args(argv)
    if args.size_kib < 1:
        p.error("--size-kib must be at least 1")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())

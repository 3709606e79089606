#!/usr/bin/env python3
"""Chaos run of two-way shared folders: N real nodes, random edits, random kill -9.

    chaos_folders.py [--nodes 5] [--duration 60] [--seed 1] [--kill-every 8]
                     [--converge-timeout 60] [--dir DIR] [--json]

Every node shares the folder id "chaos" with every other (folders.json written
before the start, versions kept without limit). For `--duration` seconds it
creates, edits, deletes and renames files on random nodes, running or stopped
(an edit on a stopped node is an offline edit), and every `--kill-every`
seconds kills a random node with SIGKILL and starts it again a few seconds
later. Then it starts every node, waits until all folders hold identical trees
(BLAKE3 of every file) and checks that every content ever written is still on
some node, as the current file, a conflict copy or in a versions folder, except
a content its own author replaced or deleted before any other node had it
(nothing could have kept that). It prints the operations done, the conflict
copies, the time to converge and the contents lost (must be 0); exit code 1 on
a loss or no convergence.

Drives the nodes through scripts/testnet_lib.py; imports the project only to
write folders.json (node.folders.config).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3
from testnet_lib import Testnet

from node.folders.config import FolderConfig, FolderStore
from node.identity import PeerId

FOLDER_ID = "chaos"
NAMES_POOL = 24  # how many distinct file names the run uses (so edits collide)
OP_INTERVAL_S = 0.15
RESTART_AFTER_S = (1.0, 4.0)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def all_contents(folder: Path) -> dict[str, bytes]:
    """rel path -> content of every file, the versions folder included."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            try:
                out[p.relative_to(folder).as_posix()] = p.read_bytes()
            except OSError:
                continue
    return out


def tree(folder: Path) -> dict[str, str]:
    return {rel: digest(data) for rel, data in all_contents(folder).items()
            if not rel.startswith(".p2pfs-versions/")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kill-every", type=float, default=8.0)
    ap.add_argument("--converge-timeout", type=float, default=60.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    root = args.dir or Path(tempfile.mkdtemp(prefix="p2pfs-chaos-"))
    names = [f"n{i}" for i in range(args.nodes)]
    folders = {n: (root / "data" / n).resolve() for n in names}
    written: dict[str, tuple[str, str]] = {}  # content digest -> (node, path)
    excluded: set[str] = set()
    ops = {"create": 0, "edit": 0, "delete": 0, "rename": 0, "kill": 0}
    with Testnet(root / "net") as net:
        net.start_bootstrap()
        net.add_nodes(names, start=False)
        for n in names:
            folders[n].mkdir(parents=True, exist_ok=True)
            store = FolderStore.load(net.node(n).home)
            peers = tuple(PeerId.parse(net.peer_id(o)) for o in names if o != n)
            store.put(FolderConfig(FOLDER_ID, folders[n], peers, versions_keep_count=0,
                                   versions_keep_days=0))
            store.save()
        net.start_many(names)
        net.trust_all()
        net.wait_all_see_each_other()

        def held_elsewhere(node: str, content: str) -> bool:
            return any(content in {digest(d) for d in all_contents(folders[o]).values()}
                       for o in names if o != node)

        def destroy(node: str, path: Path) -> None:
            try:
                content = digest(path.read_bytes())
            except OSError:
                return
            if content in written and not held_elsewhere(node, content):
                excluded.add(content)  # its author replaced it before anyone had it

        down: dict[str, float] = {}
        start = time.monotonic()
        next_kill = start + args.kill_every
        counter = 0
        while time.monotonic() - start < args.duration:
            now = time.monotonic()
            for n, at in list(down.items()):
                if now >= at:
                    net.start(n)
                    del down[n]
            if now >= next_kill and not down:
                victim = rnd.choice(names)
                net.kill(victim)
                ops["kill"] += 1
                down[victim] = now + rnd.uniform(*RESTART_AFTER_S)
                next_kill = now + args.kill_every
            node = rnd.choice(names)
            folder = folders[node]
            # the user's files: never the folder's marker (.p2pfs-folder) or other dot files
            existing = sorted(p for p in folder.iterdir()
                              if p.is_file() and not p.name.startswith("."))
            op = rnd.choice(["create", "edit", "edit", "delete", "rename"]) if existing \
                else "create"
            counter += 1
            data = f"{node} op {counter} {rnd.random()}\n".encode() * rnd.randint(1, 50)
            try:
                if op == "create":
                    path = folder / f"f{rnd.randrange(NAMES_POOL)}.txt"
                    if path.exists():
                        destroy(node, path)
                    path.write_bytes(data)
                    written[digest(data)] = (node, path.name)
                elif op == "edit":
                    path = rnd.choice(existing)
                    destroy(node, path)
                    path.write_bytes(data)
                    written[digest(data)] = (node, path.name)
                elif op == "delete":
                    path = rnd.choice(existing)
                    destroy(node, path)
                    path.unlink()
                else:
                    path = rnd.choice(existing)
                    dest = folder / f"f{rnd.randrange(NAMES_POOL)}.txt"
                    if dest != path:
                        if dest.exists():
                            destroy(node, dest)
                        os.replace(path, dest)
                ops[op] += 1
            except OSError:
                pass  # the node's sync moved it meanwhile
            time.sleep(OP_INTERVAL_S)
        for n in list(down):
            net.start(n)
        quiesce_start = time.monotonic()
        converged_s: float | None = None
        while time.monotonic() - quiesce_start < args.converge_timeout:
            trees = [tree(folders[n]) for n in names]
            if all(t == trees[0] for t in trees):
                converged_s = time.monotonic() - quiesce_start
                # stay identical for a moment: not a snapshot between two rounds
                time.sleep(3.0)
                if all(tree(folders[n]) == trees[0] for n in names):
                    break
                converged_s = None
            time.sleep(0.5)
        present: set[str] = set()
        for n in names:
            present.update(digest(d) for d in all_contents(folders[n]).values())
        lost = [c for c in written if c not in present and c not in excluded]
        final = tree(folders[names[0]])
        conflicts = sum(1 for rel in final if ".sync-conflict-" in rel)
    ok = converged_s is not None and not lost
    if args.dir is None and ok:
        shutil.rmtree(root, ignore_errors=True)  # a temp dir of ours; kept when it failed
    result = {
        "nodes": args.nodes, "duration_s": args.duration, "seed": args.seed, "ops": ops,
        "written": len(written), "excluded_overwritten_before_sync": len(excluded),
        "files_at_end": len(final), "conflict_copies": conflicts,
        "converged_s": round(converged_s, 1) if converged_s is not None else None,
        "lost": len(lost), "root": str(root) if root.exists() else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

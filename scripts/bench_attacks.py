"""Measure what floods before authentication cost the node, and whether trusted peers are served.

Runs every module in scripts/attacks/ (tcp, udp, dht, bootstrap, gossip, ...)
and prints one table: RSS before/after each pre-auth flood, trusted ping
success during each flood, DHT lookup p50/p99 with 0/100/1,000 fake contacts,
bootstrap p99 for honest clients during a flood.

    .venv/bin/python scripts/bench_attacks.py            # table
    .venv/bin/python scripts/bench_attacks.py --json     # machine-readable
    .venv/bin/python scripts/bench_attacks.py --only tcp dht --quick

All traffic goes to 127.0.0.1; each attack is bounded in count and time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks
from attacks import Row


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(attacks.__path__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help=f"modules to run (of {available()})")
    ap.add_argument("--quick", action="store_true", help="smaller floods, for a smoke run")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    args = ap.parse_args()
    names = args.only or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"error: no attack module {', '.join(unknown)} (have {', '.join(available())})",
              file=sys.stderr)
        return 2
    rows: list[Row] = []
    for name in names:
        mod = importlib.import_module(f"attacks.{name}")
        rows.extend(mod.run(quick=args.quick))
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"load_avg": load, "rows": [r.as_dict() for r in rows]}, indent=2))
        return 0
    print(f"{'attack':<34} {'metric':<34} {'value':>10} {'unit':<6} {'target':<14} ok")
    for r in rows:
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        print(f"{r.attack:<34} {r.metric:<34} {r.value:>10.4g} {r.unit:<6} {r.target:<14} {ok}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

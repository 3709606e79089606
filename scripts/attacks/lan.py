"""LAN discovery: what a flood of announcements costs (node/discovery/lan.py ``LanCache``).

Feeds 20,000 packets at 2,000 packets/s of virtual time (10 s) into one
``LanCache``, in memory: (1) validly signed records from 20,000 distinct keys,
with the shipped caps (1,000 packets/s looked at, 50 signature checks/s) and
with the caps off; (2) random bytes after the magic. Reports process CPU time
per virtual second and the outcomes. The cache-entry cap is lifted to isolate
the verification cap (the shipped 256-entry cap would refuse even more).

    .venv/bin/python scripts/attacks/lan.py [--packets N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.contact import ContactRecord  # noqa: E402
from node.discovery.lan import LanCache, encode_announcement  # noqa: E402
from node.identity import Identity  # noqa: E402

try:
    from attacks import Row
except ImportError:  # run as a script: scripts/ is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from attacks import Row

RATE_PPS = 2000


def flood(label: str, packets: list[bytes], me: Identity, **caps: float) -> dict[str, float]:
    """Feed `packets` at RATE_PPS of virtual time into one cache; CPU share and outcomes."""
    cache = LanCache(me.peer_id, 0.0, max_entries=len(packets) + 1, **caps)  # type: ignore[arg-type]
    t0 = time.process_time()
    for n, data in enumerate(packets):
        cache.receive(data, n / RATE_PPS)
    cpu_s = time.process_time() - t0
    virtual_s = len(packets) / RATE_PPS
    outcomes = {k: v for k, v in cache.stats.items() if v}
    print(f"{label}: {len(packets)} packets over {virtual_s:.0f} virtual s -> "
          f"{cpu_s * 1000:.0f} ms CPU ({cpu_s / virtual_s * 100:.1f}% of one core); {outcomes}",
          file=sys.stderr)
    return {"cpu_ms": cpu_s * 1000, "core_pct": cpu_s / virtual_s * 100}


def _floods(n: int) -> list[tuple[str, dict[str, float]]]:
    me = Identity.generate("me")
    now = time.time()
    signed = [encode_announcement(ContactRecord.create(Identity.generate(), ["198.18.0.9"],
                                                       {"tcp": 1, "dht": 2}, 1, now=now),
                                  os.urandom(8)) for _ in range(n)]
    garbage = [b"p2pfsLAN" + os.urandom(1500) for _ in range(n)]
    return [
        ("signed, distinct keys, shipped caps", flood("signed records, distinct keys, "
                                                      "shipped caps", signed, me)),
        ("signed, distinct keys, caps off", flood(
            "signed records, distinct keys, caps off", signed, me, verify_per_s=1e9,
            verify_burst=1e9, packets_per_s=1e9, packet_burst=1e9)),
        ("random bytes, shipped caps", flood("random bytes after the magic, shipped caps",
                                             garbage, me)),
    ]


def run(quick: bool = False) -> list[Row]:
    """scripts/bench_attacks.py's entry: CPU share of one core during each flood."""
    rows = []
    for label, fig in _floods(2000 if quick else 20000):
        capped = "caps off" not in label
        rows.append(Row(f"lan: {label}", "CPU share of one core", round(fig["core_pct"], 2),
                        "%", "< 10 %" if capped else "", fig["core_pct"] < 10 if capped else None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    _floods(args.packets)


if __name__ == "__main__":
    main()

"""Bootstrap server floods: honest p99 quiet / control / flood, first page, slowloris.

127.0.0.2 sends made-up ids (unsigned ones named to sort first, freshly signed
ones, 1,000-row listings) while 20 honest signed ids on 127.0.0.3-6 register
and list; in the control phase the same flooder at the same rate floods a trivial
server process instead (the machine as busy, our server not the target); then 50
sockets from 127.0.0.7 send half a request header and trickle bytes
(scripts/bench_bootstrap.py ``run_flood``, the same code). Before issue 8 the
flood's ids filled the whole first page of GET /peers and the 50 slowloris
sockets stayed open (aiohttp's default keep-alive timeout is an hour).

    .venv/bin/python scripts/attacks/bootstrap.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bootstrap import (
    FLOOD_IDS,
    FLOOD_P99_FACTOR_MAX,
    SLOWLORIS_CONNECTIONS,
    flood_ok,
    run_flood,
)

from attacks import Row

QUICK_FLOOD_IDS = 5000
QUICK_BASELINE_S = 3.0
# quick runs shorten the server's header timeout so the slowloris wait is short
QUICK_HEADER_TIMEOUT_S = 2.0


def run(quick: bool = False) -> list[Row]:
    nan = float("nan")
    with tempfile.TemporaryDirectory(prefix="attack-bootstrap-") as tmp:
        if quick:
            r = run_flood(Path(tmp), QUICK_FLOOD_IDS, QUICK_BASELINE_S, QUICK_HEADER_TIMEOUT_S)
        else:
            r = run_flood(Path(tmp))
    ok = flood_ok(r)
    n = QUICK_FLOOD_IDS if quick else FLOOD_IDS
    flood = f"bootstrap: 1 address, {n:,} ids"
    base = float(r["honest_p99_no_flood_ms"])
    control = float(r["honest_p99_control_ms"])
    held = {ph: float((r.get(ph) or {}).get("server_held_honest", {}).get("p99_ms", nan))
            for ph in ("quiet", "control", "flood")}
    return [
        Row("bootstrap: no flood", "honest request p99", base, "ms"),
        Row("bootstrap: control flood", "honest request p99", control, "ms"),
        Row(flood, "honest request p99", float(r["honest_p99_flood_ms"]), "ms",
            f"<= {FLOOD_P99_FACTOR_MAX * base:.1f} ms", ok["p99"]),
        Row(flood, "honest p99 / control p99",
            float(r["honest_p99_flood_ms"]) / control if control else nan, "x",
            f"<= {FLOOD_P99_FACTOR_MAX:g}", ok["p99_vs_control"]),
        # how long the server itself held the honest requests (bootstrap.stats)
        Row("bootstrap: no flood", "server-held honest p99", held["quiet"], "ms"),
        Row("bootstrap: control flood", "server-held honest p99", held["control"],
            "ms"),
        Row(flood, "server-held honest p99", held["flood"], "ms"),
        # the honest clients' own process waiting for a CPU: part of both p99s above
        Row("bootstrap: no flood", "honest client loop stalls > 5 ms",
            float((r.get("honest_client_stalls_no_flood") or {}).get("count", nan)), ""),
        Row(flood, "honest client loop stalls > 5 ms",
            float((r.get("honest_client_stalls_flood") or {}).get("count", nan)), ""),
        Row(flood, "server CPU per flood request",
            float(r.get("server_cpu_us_per_flood_request", nan)), "us"),
        Row(flood, "honest ids in GET /peers page 1", 100.0 * r["honest_in_first_page"]
            / r["honest_total"], "%", "100 %", ok["first_page"]),
        Row(flood, "ids online after the flood", float(r["online_after_flood"]), ""),
        Row(f"bootstrap: {SLOWLORIS_CONNECTIONS} slowloris sockets",
            f"open after {r['slowloris_wait_s']:g} s", float(r["slowloris_open_after_timeout"]),
            "", "0", ok["slowloris"]),
        Row("bootstrap: all of the above", "ERROR lines in server log",
            float(r["server_log_errors"]), "", "0", ok["log"]),
    ]


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    for row in run(quick=quick):
        ok = "" if row.ok is None else ("yes" if row.ok else "NO")
        print(f"{row.attack:<34} {row.metric:<34} {row.value:>9.4g} {row.unit:<3} "
              f"{row.target:<10} {ok}")

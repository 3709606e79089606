"""Gossip: a trusted peer relays events from 200 unknown origins; and `node status` on a big log.

Three measurements, all on 127.0.0.1 or in memory:

1. Relay flood by push: a trusted peer pushes every event of 200 origins we do
   not trust (``--quick``: 30 each, else 60) and 50 of an origin we do trust into
   one real ``GossipEngine`` over a SQLite ``EventLog`` file. Reported with the
   relay caps in force and "uncapped" (the caps and the relay rate lifted, which
   is what the code before the caps did with fewer than 10,000 events per
   origin): relay-only events and bytes stored, the log file's size, pushes
   passed on, and whether every trusted event was kept.
2. Relay flood by anti-entropy: a peer that trusts the 200 origins holds their
   whole history; our node exchanges digests with it until nothing moves.
   Reported: most untrusted events pulled in one exchange, events pulled in the
   last 5 exchanges (0 = pruned events are never pulled again), and whether an
   event was ever pulled twice.
3. ``node status`` with a big log (``--quick``: 100,000 events, else 1,000,000,
   bulk-inserted rows): the real daemon's ``status`` over its control socket
   (p50/p99), the gossip part of it (``GossipService.stats()``), the one-time
   count when the log is opened, and what a status that counted rows per call
   would cost (``SELECT COUNT(*)``).

    .venv/bin/python scripts/attacks/gossip.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from attacks import Row  # noqa: E402
from node.gossip import engine as engine_mod  # noqa: E402
from node.gossip import log as log_mod  # noqa: E402
from node.gossip.engine import Accept, Events, GossipEngine, Push, Send  # noqa: E402
from node.gossip.events import ChangeEvent  # noqa: E402
from node.gossip.log import EventLog  # noqa: E402
from node.gossip.service import GossipService  # noqa: E402
from node.identity import Identity, PeerId  # noqa: E402

ORIGINS = 200
TRUSTED_EVENTS = 50
FLOOD_SPAN_S = 60.0
H = b"\x42" * 32
MIB = 1024 * 1024
_CAP_NAMES = ("RELAY_ONLY_MAX_EVENTS_PER_ORIGIN", "RELAY_ONLY_MAX_BYTES_PER_ORIGIN",
              "RELAY_ONLY_MAX_ORIGINS", "RELAY_ONLY_MAX_EVENTS_TOTAL",
              "RELAY_ONLY_MAX_BYTES_TOTAL", "RELAY_ONLY_ORIGINS_REMEMBERED_MAX")


@contextmanager
def _uncapped() -> Iterator[None]:
    saved = {n: getattr(log_mod, n) for n in _CAP_NAMES}
    rate = (engine_mod.RELAY_ONLY_PUSH_PER_S, engine_mod.RELAY_ONLY_PUSH_BURST)
    try:
        for n in _CAP_NAMES:
            setattr(log_mod, n, 10**15)
        engine_mod.RELAY_ONLY_PUSH_PER_S, engine_mod.RELAY_ONLY_PUSH_BURST = 1e12, 10**12
        yield
    finally:
        for n, v in saved.items():
            setattr(log_mod, n, v)
        engine_mod.RELAY_ONLY_PUSH_PER_S, engine_mod.RELAY_ONLY_PUSH_BURST = rate


def _event(ident: Identity, seq: int) -> ChangeEvent:
    # a realistic path: ~250-byte events
    return ChangeEvent.create(ident, folder="docs", seq=seq, lamport=seq, kind="modified",
                              path=f"projects/report-{seq:05d}/notes.txt", size=1234, hash=H)


def _flood(strangers: list[Identity], trusted_origin: Identity, per_origin: int
           ) -> list[bytes]:
    """The relay's pushes, in arrival order: one round of every origin per seq."""
    blobs = []
    for seq in range(1, per_origin + 1):
        blobs += [Push((_event(s, seq).encode(),)).encode() for s in strangers]
        if seq <= TRUSTED_EVENTS:
            blobs.append(Push((_event(trusted_origin, seq).encode(),)).encode())
    for seq in range(per_origin + 1, TRUSTED_EVENTS + 1):
        blobs.append(Push((_event(trusted_origin, seq).encode(),)).encode())
    return blobs


def _held(log: EventLog) -> tuple[int, int]:
    return log._db.execute("SELECT COUNT(*), COALESCE(SUM(length(raw)), 0) FROM events"
                           " WHERE relay_only=1").fetchone()


def _push_flood(tmp: Path, label: str, blobs: list[bytes], relay: PeerId,
                trusted_origin: PeerId) -> dict[str, float]:
    path = tmp / f"{label}.db"
    log = EventLog(path)
    me = Identity.generate(name="target")
    eng = GossipEngine(me.peer_id, log, rand=random.Random(1),
                       is_trusted=lambda p: p in (relay, trusted_origin))
    eng.set_peers([relay] + [Identity.generate().peer_id for _ in range(6)])
    pushed = 0
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        # the flood arrives over FLOOD_SPAN_S of simulated time (the relay rate refills)
        actions = eng.receive(relay, blob, i * FLOOD_SPAN_S / len(blobs))
        if not any(isinstance(a, Accept) and a.trusted for a in actions):
            pushed += sum(1 for a in actions if isinstance(a, Send))
    elapsed = time.perf_counter() - t0
    events, nbytes = _held(log)
    trusted_kept = len(log.query(peer=trusted_origin, limit=1000))
    log.close()
    size = sum(f.stat().st_size for f in tmp.glob(f"{label}.db*"))
    return {"events": events, "bytes": nbytes, "file": size, "pushed": pushed,
            "trusted": trusted_kept, "s": elapsed}


def _pump(a: GossipEngine, b: GossipEngine, first: Send, budget: int = 100_000) -> list[Send]:
    by_id = {a.self_id: a, b.self_id: b}
    queue = [(a.self_id, first)]
    sent: list[Send] = []
    while queue and len(sent) < budget:
        src, send = queue.pop(0)
        sent.append(send)
        dst = by_id[send.peer]
        queue += [(dst.self_id, x) for x in dst.receive(src, send.msg.encode(), 0.0)
                  if isinstance(x, Send)]
    return sent


def _anti_entropy(tmp: Path, strangers: list[Identity], trusted_origin: Identity,
                  per_origin: int) -> dict[str, float]:
    r_id, n_id = Identity.generate(name="relay"), Identity.generate(name="node")
    r_log, n_log = EventLog(tmp / "ae-relay.db"), EventLog(tmp / "ae-node.db")
    for s in strangers:
        for seq in range(1, per_origin + 1):
            r_log.add(_event(s, seq))
    for seq in range(1, TRUSTED_EVENTS + 1):
        r_log.add(_event(trusted_origin, seq))
    relay = GossipEngine(r_id.peer_id, r_log, rand=random.Random(2))
    node = GossipEngine(n_id.peer_id, n_log, rand=random.Random(3),
                        is_trusted=lambda p: p in (r_id.peer_id, trusted_origin.peer_id))
    untrusted = {s.peer_id for s in strangers}
    pulled: list[int] = []
    blobs: list[bytes] = []
    max_held = 0
    rounds = ORIGINS * per_origin // engine_mod.MISSING_BATCH_MAX + 10
    for _ in range(rounds):
        sent = _pump(node, relay, Send(r_id.peer_id, node._digest(reply=False)))
        batch = [b for s in sent if isinstance(s.msg, Events) for b in s.msg.events]
        blobs += batch
        pulled.append(sum(1 for b in batch if ChangeEvent.decode(b).origin in untrusted))
        max_held = max(max_held, _held(n_log)[0])
    trusted_kept = len(n_log.query(peer=trusted_origin.peer_id, limit=1000))
    r_log.close()
    n_log.close()
    return {"max_per_exchange": max(pulled), "last5": sum(pulled[-5:]),
            "twice": len(blobs) - len(set(blobs)), "max_held": max_held,
            "trusted": trusted_kept, "total": sum(pulled)}


def _big_log(path: Path, n: int) -> float:
    """A log file holding `n` event rows (bulk insert); returns the seconds it took."""
    t0 = time.perf_counter()
    EventLog(path).close()  # schema
    template = _event(Identity.generate(), 1).encode()
    origins = [os.urandom(32) for _ in range(50)]
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("BEGIN")
    chunk = []
    for i in range(n):
        chunk.append((os.urandom(32), origins[i % 50], i // 50 + 1, i, 1_700_000_000_000 + i,
                      "docs", "modified", f"projects/report-{i:07d}/notes.txt", "", template,
                      0, 1_700_000_000_000 + i))
        if len(chunk) == 10_000:
            db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", chunk)
            chunk = []
    if chunk:
        db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", chunk)
    db.executemany("INSERT INTO watermarks VALUES (?,?,?)",
                   [(o, n // 50, n // 50) for o in origins])
    db.execute("COMMIT")
    db.close()
    return time.perf_counter() - t0


def _pcts(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    return (statistics.median(ordered) * 1000,
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000)


async def _service_stats(path: Path, calls: int) -> list[float]:
    log = EventLog(path)

    async def nothing(_e: ChangeEvent) -> None:
        return None

    async def no_channel(_p: PeerId) -> Any:
        raise OSError("no peers in this benchmark")

    svc = GossipService(Identity.generate(), log, peers=list, open_channel=no_channel,
                        is_trusted=lambda _p: True, on_event=nothing)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        svc.stats()
        out.append(time.perf_counter() - t0)
    log.close()
    return out


def _daemon_status(tmp: Path, big: Path, calls: int) -> tuple[list[float], int]:
    """Start a real node on a home whose events.db is a copy of `big`; time `status`."""
    from testnet_lib import Testnet

    from node.control import ControlClient

    with Testnet(tmp / "net") as net:
        h = net.add_node("big", bootstrap=False, start=False)
        shutil.copyfile(big, h.home / "events.db")
        os.chmod(h.home / "events.db", 0o600)
        net.start("big")

        async def timed() -> tuple[list[float], int]:
            client = ControlClient(h.home)
            out = []
            info: dict[str, Any] = {}
            for _ in range(calls):
                t0 = time.perf_counter()
                info = await client.call("status", timeout_s=10.0)
                out.append(time.perf_counter() - t0)
            return out, int(info.get("gossip", {}).get("log_events", -1))

        return asyncio.run(timed())


def run(quick: bool = False) -> list[Row]:
    per_origin = 30 if quick else 60  # either way more than the 4,096-event total cap
    big_n = 100_000 if quick else 1_000_000
    rows: list[Row] = []
    strangers = [Identity.generate(seed=bytes([7, i % 256, i // 256]) + bytes(29))
                 for i in range(ORIGINS)]
    trusted_origin = Identity.generate(name="trusted-origin")
    relay = Identity.generate(name="relay").peer_id
    a = f"relay flood {ORIGINS} origins x {per_origin}"
    with tempfile.TemporaryDirectory(prefix="p2pfs-attack-gossip-") as d:
        tmp = Path(d)
        blobs = _flood(strangers, trusted_origin, per_origin)
        with _uncapped():
            before = _push_flood(tmp, "uncapped", blobs, relay, trusted_origin.peer_id)
        after = _push_flood(tmp, "capped", blobs, relay, trusted_origin.peer_id)
        cap_ev, cap_b = log_mod.RELAY_ONLY_MAX_EVENTS_TOTAL, log_mod.RELAY_ONLY_MAX_BYTES_TOTAL
        push_cap = engine_mod.DEFAULT_FANOUT * (engine_mod.RELAY_ONLY_PUSH_BURST
                                                + FLOOD_SPAN_S * engine_mod.RELAY_ONLY_PUSH_PER_S)
        rows += [
            Row(a, "untrusted events stored, uncapped", before["events"], "events"),
            Row(a, "untrusted events stored, capped", after["events"], "events",
                f"<= {cap_ev}", after["events"] <= cap_ev),
            Row(a, "untrusted bytes stored, uncapped", before["bytes"] / MIB, "MiB"),
            Row(a, "untrusted bytes stored, capped", after["bytes"] / MIB, "MiB",
                f"<= {cap_b / MIB:g}", after["bytes"] <= cap_b),
            Row(a, "log file size, uncapped", before["file"] / MIB, "MiB"),
            Row(a, "log file size, capped", after["file"] / MIB, "MiB"),
            Row(a, "untrusted pushes passed on, uncapped", before["pushed"], "msgs"),
            Row(a, f"... capped (flood over {FLOOD_SPAN_S:g} s)", after["pushed"], "msgs",
                f"<= {push_cap:.0f}", after["pushed"] <= push_cap),
            Row(a, "trusted events kept, capped", after["trusted"], "events",
                f"= {TRUSTED_EVENTS}", after["trusted"] == TRUSTED_EVENTS),
        ]
        ae = _anti_entropy(tmp, strangers, trusted_origin, per_origin)
        b = f"anti-entropy {ORIGINS} origins x {per_origin}"
        rows += [
            Row(b, "untrusted pulled, max per exchange", ae["max_per_exchange"], "events",
                f"<= {engine_mod.MISSING_BATCH_MAX}",
                ae["max_per_exchange"] <= engine_mod.MISSING_BATCH_MAX),
            Row(b, "untrusted pulled, last 5 exchanges", ae["last5"], "events", "0",
                ae["last5"] == 0),
            Row(b, "events pulled twice", ae["twice"], "events", "0", ae["twice"] == 0),
            Row(b, "untrusted events held, max", ae["max_held"], "events", f"<= {cap_ev}",
                ae["max_held"] <= cap_ev),
            Row(b, "trusted events received", ae["trusted"], "events", f"= {TRUSTED_EVENTS}",
                ae["trusted"] == TRUSTED_EVENTS),
        ]
        c = f"node status, log of {big_n:,} events"
        path = tmp / "big.db"
        fill_s = _big_log(path, big_n)
        t0 = time.perf_counter()
        opened = EventLog(path)
        open_s = time.perf_counter() - t0
        counts = []
        for _ in range(5):
            t0 = time.perf_counter()
            opened._db.execute("SELECT COUNT(*) FROM events").fetchone()
            counts.append(time.perf_counter() - t0)
        opened.close()
        p50, p99 = _pcts(asyncio.run(_service_stats(path, 2000)))
        rows += [
            Row(c, "building the log (bulk insert)", fill_s, "s"),
            Row(c, "GossipService.stats() p50", p50 * 1000, "us"),
            Row(c, "GossipService.stats() p99", p99 * 1000, "us", "< 1 ms", p99 < 1.0),
            Row(c, "opening the log (one count)", open_s * 1000, "ms"),
            Row(c, "SELECT COUNT(*) per call (warm)", statistics.median(counts) * 1000, "ms"),
        ]
        try:
            samples, seen = _daemon_status(tmp, path, 50 if quick else 200)
        except Exception as exc:  # a node that cannot start here is a row, not a traceback
            rows.append(Row(c, f"daemon status failed: {type(exc).__name__}", 0, "", "", False))
        else:
            d50, d99 = _pcts(samples)
            rows += [Row(c, "daemon `status` p50 (control API)", d50, "ms"),
                     Row(c, "daemon `status` p99 (control API)", d99, "ms", "< 50 ms",
                         d99 < 50.0),
                     Row(c, "events the daemon reports", seen, "events", f"= {big_n}",
                         seen == big_n)]
    return rows


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    rows = run(quick=quick)
    for r in rows:
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        print(f"{r.attack:<38} {r.metric:<38} {r.value:>10.4g} {r.unit:<6} {r.target:<14} {ok}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A running NAT-lab world: relay (capturing), bootstrap server, node a behind router 1
and node b behind router 2, trusting each other, reserved at the relay and known to
each other through the bootstrap server. Shared by the relay and punch scenarios."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.identity import Identity
from node.trust import TrustStore
from tests.netns.nat_lab import HOST_ADDR, INTERNET_ADDR, REPO_ROOT, LabProcess, NatLab, wait_until

RELAY_PORT = 8474
BOOTSTRAP_PORT = 8470


@dataclass
class World:
    lab: NatLab
    homes: dict[str, Path]
    ids: dict[str, str]
    capture: Path
    relay: LabProcess

    def cli(self, name: str, *args: str, timeout_s: float = 60.0) -> object:
        res = self.lab.node_cli(self.homes[name], *args, "--json", timeout_s=timeout_s)
        assert res.returncode == 0, (f"node {' '.join(args)} on {name} exited "
                                     f"{res.returncode}: {res.stderr}{res.stdout}\n"
                                     + self.logs())
        return json.loads(res.stdout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-1500:]}" for p in self.lab.processes)


def start_world(lab: NatLab, *, tamper_after: int | None = None,
                throttle_mib_s: float | None = None) -> World:
    inet = lab.ns("inet")
    capture = lab.root / "relay.capture"
    relay_cmd = [sys.executable, str(REPO_ROOT / "tests" / "netns" / "capture_relay.py"),
                 "--host", INTERNET_ADDR, "--port", str(RELAY_PORT), "--capture", str(capture)]
    if tamper_after is not None:
        relay_cmd += ["--tamper-after", str(tamper_after)]
    if throttle_mib_s is not None:
        relay_cmd += ["--throttle-mib-s", str(throttle_mib_s)]
    relay = lab.spawn(inet, relay_cmd, "relay")
    lab.spawn(inet, [sys.executable, "-m", "bootstrap", "--host", INTERNET_ADDR, "--port",
                     str(BOOTSTRAP_PORT), "--db", str(lab.root / "bootstrap.sqlite3")],
              "bootstrap")
    homes = {n: lab.root / n for n in ("a", "b")}
    # identities and trust in-process: six CLI processes cost seconds on a busy machine
    idents = {n: Identity.generate(n) for n in homes}
    ids = {n: str(ident.peer_id) for n, ident in idents.items()}
    for name, home in homes.items():
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        idents[name].save(home)
        store = TrustStore.in_home(home)
        try:
            other = "b" if name == "a" else "a"
            store.trust(idents[other].peer_id, other)
        finally:
            store.close()
    wait_until(lambda: "relay ready" in relay.log() or not relay.alive(), 15, "relay is up")
    assert relay.alive(), relay.log()
    for i, name in ((1, "a"), (2, "b")):
        lab.spawn(lab.ns(f"h{i}"), [
            sys.executable, "-m", "node", "start", "--home", str(homes[name]),
            "--listen-host", HOST_ADDR[i], "--port", "0",
            "--bootstrap", f"http://{INTERNET_ADDR}:{BOOTSTRAP_PORT}",
            "--relay", f"{INTERNET_ADDR}:{RELAY_PORT}"], f"node-{name}")
    world = World(lab, homes, ids, capture, relay)

    def reserved(name: str) -> Callable[[], bool]:
        def check() -> bool:
            res = lab.node_cli(homes[name], "status", "--json", timeout_s=10)
            if res.returncode != 0:
                return False
            relays = json.loads(res.stdout).get("relays") or []
            return bool(relays) and relays[0]["state"] == "reserved"
        return check

    def knows(me: str, other: str) -> Callable[[], bool]:
        def check() -> bool:
            res = lab.node_cli(homes[me], "peers", "--json", timeout_s=10)
            return res.returncode == 0 and any(
                r["peer_id"] == ids[other] for r in json.loads(res.stdout))
        return check

    t0 = time.monotonic()
    for name in ("a", "b"):
        wait_until(reserved(name), 30, f"node {name} holds a relay reservation", world.logs)
    wait_until(knows("a", "b"), 30, "node a learned b's record from the bootstrap server",
               world.logs)
    print(f"lab: nodes reserved and discovered in {time.monotonic() - t0:.1f} s")
    return world

"""Multi-node testnet harness: a bootstrap server and N real `node start` processes.

Tests, benchmarks, `scripts/testnet.py` and `scripts/demo.py` all drive networks
through the `Testnet` class here. Every node is a real OS process with its own home
dir and its own free ports on 127.0.0.1; every process starts in its own session
(process group), so teardown reaches its children too. `Testnet` is a context
manager whose exit always tears down every process it started (SIGTERM, then
SIGKILL after a grace period) and keeps each node's log file for the report.

The harness only talks to nodes the way a user does: through the `node` CLI
(`python -m node ... --home H`) and the files the CLI contract names
(`H/daemon.json`, `H/node.log`). It must not import the project's packages
(`node`, `dht`, `bootstrap`): it tests them from the outside.

Scenarios (`run_scenario`) are a Python file defining `scenario(net)` (sync or
async) or a TOML file of `[[step]]` tables; see the README, "Local demo and testnets".
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json as jsonlib
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
CLI_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 40
REPORT_ERROR_LINES = 30
STATE_FILE_NAME = "testnet.json"
# ports each node listens on; udp and quic are UDP, dht is UDP, tcp is TCP
PORT_KINDS = ("tcp", "udp", "quic", "dht")
TRANSPORTS = ("tcp", "udp", "quic")
# node settings (P2PFS_<KEY> env vars) every testnet node gets unless overridden:
# re-register every few seconds so that the first node to register, which the
# bootstrap server answered with an empty peer list, learns of later ones quickly
# and no dashboard (gui_port 0): many nodes on one machine would all want port 8474;
# a testnet made with `gui=True` gives each node a free dashboard port instead
DEFAULT_NODE_SETTINGS: dict[str, str] = {"register_interval_s": "3", "gui_port": "0"}
# only these variables of the caller's environment reach node processes untouched;
# P2PFS_* settings of the user's own node must not leak into testnet nodes
_ENV_DROP_PREFIX = "P2PFS_"


class TestnetError(Exception):
    """A testnet operation failed; the message says what and shows the relevant log."""

    __test__ = False  # not a pytest test class


class CommandFailed(TestnetError):
    """A `node` CLI command exited non-zero (or printed something that is not JSON)."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str] | None = None):
        super().__init__(message)
        self.result = result


class WaitTimeout(TestnetError, TimeoutError):
    """`wait_until` gave up; the message names what was awaited and the last error."""


# ---------------------------------------------------------------------------
# small helpers


def normalize_peer_id(text: str) -> str:
    """Peer ids may be printed grouped (with dashes) or compact; compare them compact."""
    return re.sub(r"[\s\-]", "", str(text)).upper()


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last `lines` lines of a text file, or a note that it does not exist."""
    try:
        data = path.read_bytes()[-64_000:]
    except OSError:
        return f"(no file {path})"
    text = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else f"({path} is empty)"


class PortAllocator:
    """Hands out ports that are free for both TCP and UDP on 127.0.0.1, never twice.

    Ports come from below the kernel's ephemeral range (``ip_local_port_range``),
    so no client socket of any process (a DNS query, an outgoing connection, a
    UDP socket bound to port 0) can take a port between the moment it is handed
    out and the moment the node binds it; the harness keeps them for the node's
    lifetime so a restarted node keeps its ports.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._given: set[int] = set()
        self._rng = rng or random.Random()
        low, _high = _ephemeral_range()
        # a window under the ephemeral range, clear of the well-known ports
        self._range = (max(10000, low - 20000), low)

    def allocate(self) -> int:
        for _ in range(500):
            port = self._rng.randrange(*self._range)
            if port in self._given or not _bindable(port):
                continue
            self._given.add(port)
            return port
        raise TestnetError("could not find a free port on 127.0.0.1")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    """Free for TCP and UDP on 127.0.0.1 right now."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOCALHOST, port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOCALHOST, port))
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """True when `pid` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # the group exists; it is alive unless every member is a zombie
    members = _group_members(pgid)
    return any(pid_alive(p) for p in members) if members is not None else True


def _group_members(pgid: int) -> list[int] | None:
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def terminate_groups(pgids: Sequence[int], grace_s: float = STOP_GRACE_S,
                     reap: Callable[[], None] | None = None) -> list[int]:
    """SIGTERM every process group, wait up to `grace_s`, SIGKILL what is left.

    Returns the groups that had to be killed. `reap` is called while waiting so the
    caller can collect its own children (otherwise they linger as zombies).
    """
    pgids = [p for p in pgids if p > 0]
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = list(pgids)
    while left and time.monotonic() < deadline:
        if reap:
            reap()
        left = [p for p in left if group_alive(p)]
        if left:
            time.sleep(0.05)
    for pgid in left:
        _signal_group(pgid, signal.SIGKILL)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        if reap:
            reap()
        if not any(group_alive(p) for p in left):
            break
        time.sleep(0.05)
    return left


def _child_env(transport: str | None, extra: dict[str, str] | None,
               node_settings: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIX)}
    for key, value in {**DEFAULT_NODE_SETTINGS, **(node_settings or {})}.items():
        env[_ENV_DROP_PREFIX + key.upper()] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    # run this checkout's code, whatever is installed (a stale editable install can
    # map a package that has since gained an __init__.py as a namespace package)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if transport:
        env["P2PFS_TRANSPORT"] = transport
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------
# processes


@dataclass
class ManagedProcess:
    """One process the harness started (or found in a state file), in its own session."""

    pid: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pgid(self) -> int:
        return self.pid  # start_new_session=True makes the child its group's leader

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def reap(self) -> None:
        if self.popen is not None:
            self.popen.poll()


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
    return ManagedProcess(pid=popen.pid, popen=popen)


@dataclass
class NodeHandle:
    """A node of the testnet: its home dir, ports, log and (when running) process."""

    name: str
    home: Path
    log_path: Path
    ports: dict[str, int]
    share: list[Path] = field(default_factory=list)
    received_dir: Path | None = None
    bootstrap: bool = True
    bootstrap_peers: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None
    peer_id: str | None = None
    gui_port: int = 0  # the dashboard's port; 0 = no dashboard

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def dht_addr(self) -> str:
        return f"{LOCALHOST}:{self.ports['dht']}"

    @property
    def node_log(self) -> Path:
        return self.home / "node.log"

    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "home": str(self.home), "log": str(self.log_path),
            "node_log": str(self.node_log), "ports": self.ports, "pid": self.pid,
            "peer_id": self.peer_id, "share": [str(p) for p in self.share],
            "received_dir": str(self.received_dir) if self.received_dir else None,
            "bootstrap": self.bootstrap, "bootstrap_peers": self.bootstrap_peers,
            "extra_args": self.extra_args, "gui_port": self.gui_port,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeHandle:
        h = cls(
            name=str(d["name"]), home=Path(d["home"]), log_path=Path(d["log"]),
            ports={str(k): int(v) for k, v in d["ports"].items()},
            share=[Path(p) for p in d.get("share", [])],
            received_dir=Path(d["received_dir"]) if d.get("received_dir") else None,
            bootstrap=bool(d.get("bootstrap", True)),
            bootstrap_peers=list(d.get("bootstrap_peers", [])),
            extra_args=list(d.get("extra_args", [])), peer_id=d.get("peer_id"),
            gui_port=int(d.get("gui_port") or 0),
        )
        if d.get("pid"):
            h.process = ManagedProcess(pid=int(d["pid"]))
        return h


@dataclass
class StepResult:
    """One line of a scenario report."""

    index: int
    description: str
    ok: bool
    duration_s: float
    error: str = ""


_live_testnets: weakref.WeakSet[Testnet] = weakref.WeakSet()


@atexit.register
def _teardown_all_at_exit() -> None:
    for net in list(_live_testnets):
        with contextlib.suppress(Exception):
            net.teardown()


class Testnet:
    """A bootstrap server plus named nodes, all real processes on 127.0.0.1.

    Use as a context manager (teardown is guaranteed), or call `teardown()`.
    With `detached=True` (used by `testnet.py up`) the processes outlive this
    object: no atexit teardown, and `save_state()` records them for `down`.
    """

    __test__ = False

    def __init__(self, root: Path, *, python: str = sys.executable, transport: str = "tcp",
                 node_cmd: list[str] | None = None, bootstrap_cmd: list[str] | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, stop_grace_s: float = STOP_GRACE_S,
                 env: dict[str, str] | None = None,
                 node_settings: dict[str, str] | None = None, detached: bool = False,
                 echo: Callable[[str], None] | None = None, gui: bool = False) -> None:
        if transport not in TRANSPORTS:
            raise TestnetError(
                f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.transport = transport
        # P2PFS_TESTNET_NODE_CMD / _BOOTSTRAP_CMD let a user test an installed `p2pfs`
        env_node = os.environ.get("P2PFS_TESTNET_NODE_CMD")
        env_boot = os.environ.get("P2PFS_TESTNET_BOOTSTRAP_CMD")
        self.node_cmd = (list(node_cmd) if node_cmd else
                         shlex.split(env_node) if env_node else [python, "-m", "node"])
        self.bootstrap_cmd = (list(bootstrap_cmd) if bootstrap_cmd else
                              shlex.split(env_boot) if env_boot else
                              _default_bootstrap_cmd(python))
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.env = _child_env(transport, env, node_settings)
        self.detached = detached
        self.gui = gui  # each node gets a dashboard on a free port (`gui_url(name)`)
        self.echo = echo or (lambda _msg: None)
        self.ports = PortAllocator()
        self.nodes: dict[str, NodeHandle] = {}
        self.bootstrap_port: int | None = None
        self.bootstrap_process: ManagedProcess | None = None
        self.bootstrap_log = self.root / "logs" / "bootstrap.log"
        # not root/"bootstrap": `python -m bootstrap` runs with cwd=root and would import that dir
        self.bootstrap_db = self.root / "bootstrap-server" / "registry.sqlite3"
        self.steps: list[StepResult] = []
        self._all_processes: list[ManagedProcess] = []
        self._help_text: str | None = None
        if not detached:
            _live_testnets.add(self)

    # -- context manager -----------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- bootstrap server ----------------------------------------------------
    @property
    def bootstrap_url(self) -> str:
        if self.bootstrap_port is None:
            raise TestnetError("the bootstrap server was never started")
        return f"http://{LOCALHOST}:{self.bootstrap_port}"

    def start_bootstrap(self, ttl_s: float | None = None) -> str:
        """Start (or restart, same port and database) the bootstrap server; wait for /health."""
        if self.bootstrap_process and self.bootstrap_process.alive():
            return self.bootstrap_url
        if self.bootstrap_port is None:
            self.bootstrap_port = self.ports.allocate()
        self.bootstrap_db.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*self.bootstrap_cmd, "--host", LOCALHOST, "--port", str(self.bootstrap_port),
               "--db", str(self.bootstrap_db)]
        if ttl_s is not None:
            cmd += ["--ttl", _num(ttl_s)]
        proc = _spawn(cmd, self.bootstrap_log, self.env, self.root)
        self.bootstrap_process = proc
        self._all_processes.append(proc)
        self.echo(f"bootstrap server starting on {self.bootstrap_url} (pid {proc.pid})")

        def healthy() -> bool:
            if not proc.alive():
                raise TestnetError(
                    f"bootstrap server exited with code {proc.returncode()}; "
                    f"log {self.bootstrap_log}:\n{tail(self.bootstrap_log)}")
            try:
                with urllib.request.urlopen(self.bootstrap_url + "/health", timeout=2) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            self.wait_until(healthy, self.startup_timeout_s,
                            what="bootstrap server /health answers")
        except WaitTimeout as exc:
            raise TestnetError(
                f"{exc}\nlog {self.bootstrap_log}:\n{tail(self.bootstrap_log)}") from None
        return self.bootstrap_url

    def stop_bootstrap(self) -> None:
        """SIGTERM the bootstrap server (SIGKILL after the grace period)."""
        if self.bootstrap_process:
            terminate_groups([self.bootstrap_process.pgid], self.stop_grace_s,
                             self.bootstrap_process.reap)
            self._wait_dead(self.bootstrap_process)
            self.echo("bootstrap server stopped")

    def kill_bootstrap(self) -> None:
        """SIGKILL the bootstrap server."""
        if self.bootstrap_process:
            _signal_group(self.bootstrap_process.pgid, signal.SIGKILL)
            self._wait_dead(self.bootstrap_process)
            self.echo("bootstrap server killed")

    # -- nodes -----------------------------------------------------------------
    def add_node(self, name: str, *, share: list[Path] | None = None, bootstrap: bool = True,
                 bootstrap_peers: Sequence[str] = (), extra_args: Sequence[str] = (),
                 received_dir: Path | None = None, start: bool = True) -> NodeHandle:
        """Create a node (`node init`), allocate its ports and start it (`node start`)."""
        return self.add_nodes([name], share=share, bootstrap=bootstrap,
                              bootstrap_peers=bootstrap_peers, extra_args=extra_args,
                              received_dir=received_dir, start=start)[0]

    def add_nodes(self, names: Sequence[str], *, share: list[Path] | None = None,
                  bootstrap: bool = True, bootstrap_peers: Sequence[str] = (),
                  extra_args: Sequence[str] = (), received_dir: Path | None = None,
                  start: bool = True) -> list[NodeHandle]:
        """Like `add_node` for several nodes, started in parallel (much faster)."""
        handles = []
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
                raise TestnetError(f"node name {name!r}: use 1-40 letters, digits, '_', '.', '-'")
            if name in self.nodes:
                raise TestnetError(f"node {name!r} exists already")
            home = self.root / "nodes" / name
            home.mkdir(parents=True, exist_ok=True)
            h = NodeHandle(
                name=name, home=home, log_path=self.root / "logs" / f"{name}.log",
                ports={k: self.ports.allocate() for k in PORT_KINDS},
                share=[Path(p).resolve() for p in share or []],
                received_dir=Path(received_dir).resolve() if received_dir else None,
                bootstrap=bootstrap, bootstrap_peers=list(bootstrap_peers),
                extra_args=list(extra_args),
                gui_port=self.ports.allocate() if self.gui else 0,
            )
            self.nodes[name] = h
            res = self.cli(name, "init", "--name", name, json=False, check=False)
            if res.returncode != 0:
                raise CommandFailed(
                    f"`node init` for {name} failed (exit {res.returncode}):\n"
                    f"{(res.stdout + res.stderr).strip()}", res)
            h.peer_id = self._read_peer_id(name)
            handles.append(h)
        if start:
            self.start_many([h.name for h in handles])
        return handles

    def _read_peer_id(self, name: str) -> str:
        info = self.cli(name, "id", json=True)
        if not isinstance(info, dict) or not info.get("peer_id"):
            raise TestnetError(f"`node id --json` for {name} printed no peer_id: {info!r}")
        return str(info["peer_id"])

    def node(self, name: str) -> NodeHandle:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(self.nodes) or "none"
            raise TestnetError(f"no node named {name!r} (nodes: {known})") from None

    def peer_id(self, name: str) -> str:
        h = self.node(name)
        if h.peer_id is None:
            h.peer_id = self._read_peer_id(name)
        return h.peer_id

    def dht_addr(self, name: str) -> str:
        return self.node(name).dht_addr

    def gui_url(self, name: str) -> str:
        """The node's dashboard address with its token (`node gui`); needs `gui=True`."""
        info = self.cli(name, "gui", json=True)
        if not isinstance(info, dict) or not info.get("url"):
            raise TestnetError(f"`node gui --json` for {name} printed no url: {info!r}")
        return str(info["url"])

    def name_of(self, peer_id: str) -> str | None:
        """The node name for a peer id, or None for a peer outside this testnet."""
        want = normalize_peer_id(peer_id)
        for h in self.nodes.values():
            if h.peer_id and normalize_peer_id(h.peer_id) == want:
                return h.name
        return None

    def _start_cmd(self, h: NodeHandle) -> list[str]:
        cmd = [*self.node_cmd, "start", "--home", str(h.home), "--listen-host", LOCALHOST,
               "--tcp-port", str(h.ports["tcp"]), "--udp-port", str(h.ports["udp"]),
               "--quic-port", str(h.ports["quic"]), "--dht-port", str(h.ports["dht"])]
        if h.gui_port:  # else P2PFS_GUI_PORT=0 (DEFAULT_NODE_SETTINGS): no dashboard
            cmd += ["--gui-port", str(h.gui_port)]
        if h.bootstrap and self.bootstrap_port is not None:
            cmd += ["--bootstrap", self.bootstrap_url]
        for peer in h.bootstrap_peers:
            cmd += ["--bootstrap-peer", self.nodes[peer].dht_addr if peer in self.nodes else peer]
        for d in h.share:
            cmd += ["--share", str(d)]
        if h.received_dir:
            cmd += ["--received-dir", str(h.received_dir)]
        return cmd + list(h.extra_args)

    def start(self, name: str) -> NodeHandle:
        """Start a stopped node again (same home dir, same ports)."""
        return self.start_many([name])[0]

    def start_many(self, names: Sequence[str]) -> list[NodeHandle]:
        handles = [self.node(n) for n in names]
        for h in handles:
            if h.running():
                continue
            h.process = _spawn(self._start_cmd(h), h.log_path, self.env, self.root)
            self._all_processes.append(h.process)
            self.echo(f"node {h.name} starting (pid {h.process.pid}, dht {h.dht_addr})")
        for h in handles:
            self._wait_ready(h)
        return handles

    def _wait_ready(self, h: NodeHandle) -> None:
        assert h.process is not None
        proc = h.process
        daemon_json = h.home / "daemon.json"

        def ready() -> bool:
            if not proc.alive():
                raise TestnetError(f"node {h.name} exited with code {proc.returncode()}")
            try:
                info = jsonlib.loads(daemon_json.read_text())
            except (OSError, ValueError):
                return False
            # a stale daemon.json from a killed run names another pid
            if not isinstance(info, dict) or int(info.get("pid") or 0) != proc.pid:
                return False
            res = self.cli(h.name, "status", json=False, check=False, timeout=10)
            return res.returncode == 0

        try:
            self.wait_until(ready, self.startup_timeout_s, interval=0.1,
                            what=f"node {h.name} is ready (daemon.json + `node status`)")
        except TestnetError as exc:
            raise TestnetError(
                f"{exc}\n--- {h.log_path} (last lines) ---\n{tail(h.log_path)}") from None
        self.echo(f"node {h.name} ready")

    def stop(self, name: str) -> None:
        """SIGTERM the node's process group; SIGKILL after the grace period."""
        h = self.node(name)
        if h.process is None:
            return
        killed = terminate_groups([h.process.pgid], self.stop_grace_s, h.process.reap)
        self._wait_dead(h.process)
        self.echo(f"node {name} stopped" + (" (had to SIGKILL)" if killed else ""))

    def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group (a crash: no clean shutdown)."""
        h = self.node(name)
        if h.process is None:
            return
        _signal_group(h.process.pgid, signal.SIGKILL)
        self._wait_dead(h.process)
        self.echo(f"node {name} killed")

    def restart(self, name: str) -> NodeHandle:
        self.stop(name)
        return self.start(name)

    def _wait_dead(self, proc: ManagedProcess, timeout_s: float = 5.0) -> None:
        # a multi-threaded process shows its leader as a zombie while other threads
        # still exit, and cannot be reaped until they have: wait for the real exit
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive() and not group_alive(proc.pgid):
                return
            time.sleep(0.02)
        raise TestnetError(f"process {proc.pid} is still running {timeout_s:g}s after SIGKILL")

    def running_nodes(self) -> list[str]:
        return [n for n, h in self.nodes.items() if h.running()]

    # -- CLI -------------------------------------------------------------------
    def cli(self, name: str, *args: str, json: bool = True, check: bool = True,
            timeout: float = CLI_TIMEOUT_S) -> Any:
        """Run `node ARGS --home H` for node `name`.

        json=True adds `--json` (unless given) and returns the parsed output;
        json=False returns the CompletedProcess. check=True raises CommandFailed
        on a non-zero exit.
        """
        h = self.node(name)
        argv = [str(a) for a in args]
        if json and "--json" not in argv:
            argv.append("--json")
        cmd = [*self.node_cmd, *argv, "--home", str(h.home)]
        try:
            res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                                 env=self.env, cwd=self.root, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"`node {' '.join(argv)}` on {name} timed out after {timeout}s") \
                from None
        if check and res.returncode != 0:
            msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise CommandFailed(
                f"`node {' '.join(argv)}` on {name} exited {res.returncode}: "
                f"{' | '.join(msg[-5:]) or '(no output)'}", res)
        if not json:
            return res
        if res.returncode != 0:
            return res
        try:
            return jsonlib.loads(res.stdout)
        except ValueError:
            raise CommandFailed(
                f"`node {' '.join(argv)}` on {name} printed no JSON: {res.stdout[:300]!r}",
                res) from None

    def offers(self, *commands: str) -> bool:
        """True when `node --help` lists every one of `commands` (features land over time)."""
        if self._help_text is None:
            res = subprocess.run([*self.node_cmd, "--help"], check=False, capture_output=True,
                                 text=True,
                                 timeout=CLI_TIMEOUT_S, env={**self.env, "COLUMNS": "100"},
                                 cwd=self.root, stdin=subprocess.DEVNULL)
            self._help_text = res.stdout if res.returncode == 0 else ""
        return all(re.search(rf"(^|[\s\u2502|]){re.escape(c)}\s{{2,}}", self._help_text,
                             re.MULTILINE)
                   for c in commands)

    def peers_of(self, name: str) -> set[str]:
        """Compact peer ids that `node peers --json` on `name` lists."""
        out = self.cli(name, "peers", json=True)
        if not isinstance(out, list):
            raise TestnetError(f"`node peers --json` on {name} is not a list: {out!r}")
        return {normalize_peer_id(p["peer_id"]) for p in out
                if isinstance(p, dict) and p.get("peer_id")}

    def sees(self, name: str, others: Sequence[str]) -> bool:
        ids = self.peers_of(name)
        return all(normalize_peer_id(self.peer_id(o)) in ids for o in others)

    def wait_all_see_each_other(self, names: Sequence[str] | None = None,
                                timeout: float = 30.0) -> None:
        names = list(names) if names is not None else self.running_nodes()
        for n in names:
            others = [o for o in names if o != n]
            self.wait_until(functools.partial(self.sees, n, others), timeout,
                            what=f"node {n} lists {', '.join(others)} in `node peers`")

    def trust_all(self, names: Sequence[str] | None = None) -> None:
        """Each node trusts every other one (`node trust PEER --name OTHER`)."""
        names = list(names) if names is not None else list(self.nodes)
        for a in names:
            for b in names:
                if a != b:
                    self.cli(a, "trust", self.peer_id(b), "--name", b, json=False)

    # -- waiting ---------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], Any], timeout: float = 30.0,
                   interval: float = POLL_INTERVAL_S, what: str = "condition") -> Any:
        """Poll `predicate` until it returns a truthy value, which is returned.

        A predicate that raises counts as "not yet" (its last error is reported),
        except TestnetError, which means the wait can never succeed (a process died).
        """
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except CommandFailed as exc:
                last_error = str(exc)
            except TestnetError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported in the timeout message
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                detail = f"; last error: {last_error}" if last_error else ""
                raise WaitTimeout(f"timed out after {timeout:g}s waiting until {what}{detail}")
            time.sleep(interval)

    # -- reporting -------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """Record a named step (for Python scenarios): pass/fail and duration."""
        t0 = time.monotonic()
        index = len(self.steps) + 1
        self.echo(f"step {index}: {description}")
        try:
            yield
        except BaseException as exc:
            self.steps.append(StepResult(index, description, False, time.monotonic() - t0,
                                         f"{type(exc).__name__}: {exc}"))
            raise
        self.steps.append(StepResult(index, description, True, time.monotonic() - t0))

    def log_paths(self) -> dict[str, Path]:
        paths = {"bootstrap": self.bootstrap_log}
        for n, h in self.nodes.items():
            paths[n] = h.log_path
        return paths

    # -- state file (for `testnet.py up/status/down`) ---------------------------
    def save_state(self) -> Path:
        state = {
            "root": str(self.root), "transport": self.transport, "node_cmd": self.node_cmd,
            "bootstrap": {
                "port": self.bootstrap_port, "db": str(self.bootstrap_db),
                "log": str(self.bootstrap_log),
                "pid": self.bootstrap_process.pid if self.bootstrap_process else None,
                "url": self.bootstrap_url if self.bootstrap_port else None,
            },
            "nodes": [h.to_json() for h in self.nodes.values()],
            "pids": sorted({p.pid for p in self._all_processes}),
        }
        path = self.root / STATE_FILE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(jsonlib.dumps(state, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load_state(cls, root: Path, **kwargs: Any) -> Testnet:
        """Re-attach to a testnet that `testnet.py up` left running in `root`."""
        path = Path(root) / STATE_FILE_NAME
        try:
            state = jsonlib.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TestnetError(f"no testnet recorded in {path} ({exc})") from None
        kwargs.setdefault("transport", state.get("transport", "tcp"))
        kwargs.setdefault("node_cmd", state.get("node_cmd"))
        net = cls(Path(state["root"]), detached=True, **kwargs)
        b = state.get("bootstrap") or {}
        net.bootstrap_port = b.get("port")
        if b.get("pid"):
            net.bootstrap_process = ManagedProcess(pid=int(b["pid"]))
        for d in state.get("nodes", []):
            h = NodeHandle.from_json(d)
            net.nodes[h.name] = h
            net.ports._given.update(h.ports.values())
        net._all_processes = [ManagedProcess(pid=int(p)) for p in state.get("pids", [])]
        return net

    # -- teardown --------------------------------------------------------------
    def stray_pids(self) -> list[int]:
        """Processes (not started by this object) whose command line names our root dir."""
        mine = {p.pid for p in self._all_processes}
        root = str(self.root)
        out: list[int] = []
        proc = Path("/proc")
        if not proc.is_dir():
            return out
        for entry in proc.iterdir():
            if (not entry.name.isdigit() or int(entry.name) in mine
                    or int(entry.name) == os.getpid()):
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # only our own node/bootstrap commands: an argument under our root dir (a
            # daemon re-exec'd by `node start` carries its home inside one JSON argument)
            if any(root + os.sep in a.decode(errors="replace") for a in args) \
                    and pid_alive(int(entry.name)):
                out.append(int(entry.name))
        return out

    def teardown(self, *, strays: bool = False) -> list[int]:
        """Stop every process this testnet started: SIGTERM, then SIGKILL after the grace.

        Returns the pids that were signalled. Idempotent; logs stay on disk.
        """
        procs = [p for p in self._all_processes if p.alive() or group_alive(p.pgid)]
        pgids = [p.pgid for p in procs]
        extra = self.stray_pids() if strays else []

        def reap() -> None:
            for p in self._all_processes:
                p.reap()

        if pgids:
            terminate_groups(pgids, self.stop_grace_s, reap)
        for pid in extra:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        if extra:
            deadline = time.monotonic() + self.stop_grace_s
            while time.monotonic() < deadline and any(pid_alive(p) for p in extra):
                time.sleep(0.05)
            for pid in extra:
                if pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        reap()
        for p in self._all_processes:
            if p.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=2)
        _live_testnets.discard(self)
        return [p.pid for p in procs] + extra

    def all_pids(self) -> list[int]:
        return [p.pid for p in self._all_processes]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _default_bootstrap_cmd(python: str) -> list[str]:
    # `python -m bootstrap` is the server's own entry point; fall back to the node CLI's
    # `node bootstrap` subcommand when the package has no __main__ module
    if importlib.util.find_spec("bootstrap.__main__") is not None:
        return [python, "-m", "bootstrap"]
    return [python, "-m", "node", "bootstrap"]


# ---------------------------------------------------------------------------
# scenarios

STEP_ACTIONS = ("start", "stop", "kill", "restart", "start_bootstrap", "stop_bootstrap",
                "kill_bootstrap", "cli", "wait", "assert", "sleep", "trust_all")
CONDITION_CHECKS = ("len_ge", "len_le", "len_eq", "includes_peers", "excludes_peers",
                    "contains", "stdout_contains", "exit_code", "eq", "ne", "ge", "le",
                    "alive", "file_exists")


class _NodeView:
    """What `{n1.peer_id}`-style placeholders in a TOML scenario can read."""

    def __init__(self, net: Testnet, name: str) -> None:
        self._net, self.name = net, name

    @property
    def peer_id(self) -> str:
        return self._net.peer_id(self.name)

    @property
    def dht_addr(self) -> str:
        return self._net.dht_addr(self.name)

    @property
    def home(self) -> str:
        return str(self._net.node(self.name).home)

    def __format__(self, spec: str) -> str:
        return self.name


class _Placeholders(dict[str, Any]):
    def __init__(self, net: Testnet, scenario_dir: Path) -> None:
        super().__init__()
        self.net, self.scenario_dir = net, scenario_dir

    def __missing__(self, key: str) -> Any:
        if key == "bootstrap_url":
            return self.net.bootstrap_url
        if key == "root":
            return str(self.net.root)
        if key == "scenario_dir":
            return str(self.scenario_dir)
        if key in self.net.nodes:
            return _NodeView(self.net, key)
        raise TestnetError(f"unknown placeholder {{{key}}}")


def expand(value: Any, net: Testnet, scenario_dir: Path) -> Any:
    """Fill `{n1.peer_id}`, `{n1.dht_addr}`, `{n1.home}`, `{bootstrap_url}`, `{root}`."""
    if isinstance(value, str):
        return value.format_map(_Placeholders(net, scenario_dir))
    if isinstance(value, list):
        return [expand(v, net, scenario_dir) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, net, scenario_dir) for k, v in value.items()}
    return value


def _dig(obj: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if isinstance(obj, list):
            try:
                obj = obj[int(part)]
            except (ValueError, IndexError):
                raise TestnetError(f"path {path!r}: no item {part!r} in a list") from None
        elif isinstance(obj, dict):
            if part not in obj:
                raise TestnetError(f"path {path!r}: no key {part!r} (keys: {sorted(obj)})")
            obj = obj[part]
        else:
            raise TestnetError(f"path {path!r}: cannot index {type(obj).__name__} with {part!r}")
    return obj


def _targets(spec: dict[str, Any], net: Testnet) -> list[str]:
    nodes = spec.get("nodes")
    if nodes == "all":
        return list(net.nodes)
    if nodes == "running":
        return net.running_nodes()
    if isinstance(nodes, list):
        return [str(n) for n in nodes]
    if "node" in spec:
        return [str(spec["node"])]
    return []


def check_condition(net: Testnet, cond: dict[str, Any], scenario_dir: Path) -> tuple[bool, str]:
    """Evaluate one condition table once; returns (holds, explanation)."""
    cond = dict(cond)
    unknown = set(cond) - {"cli", "node", "nodes", "path", *CONDITION_CHECKS}
    if unknown:
        raise TestnetError(f"unknown condition key(s) {sorted(unknown)}")
    targets = _targets(cond, net)
    if not targets and ("cli" in cond or "alive" in cond):
        raise TestnetError("a condition with `cli` or `alive` needs `node` or `nodes`")
    for name in targets or [""]:
        ok, why = _check_one(net, name, cond, scenario_dir)
        if not ok:
            return False, (f"{name}: {why}" if name else why)
    return True, "ok"


def _check_one(net: Testnet, name: str, cond: dict[str, Any],
               scenario_dir: Path) -> tuple[bool, str]:
    if "alive" in cond:
        alive = net.node(name).running()
        if alive != bool(cond["alive"]):
            return False, f"process alive={alive}, want {bool(cond['alive'])}"
    if "file_exists" in cond:
        p = Path(expand(str(cond["file_exists"]), net, scenario_dir))
        if not p.exists():
            return False, f"{p} does not exist"
    if "cli" not in cond:
        return True, "ok"
    args = expand([str(a) for a in cond["cli"]], net, scenario_dir)
    res = net.cli(name, *args, json=False, check=False)
    out: Any = None
    if "exit_code" in cond:
        if res.returncode != int(cond["exit_code"]):
            return False, f"exit code {res.returncode}, want {cond['exit_code']}"
    elif res.returncode != 0:
        err = (res.stderr.strip() or res.stdout.strip()).splitlines()
        return False, f"`node {' '.join(args)}` exited {res.returncode}: {' | '.join(err[-3:])}"
    if "stdout_contains" in cond:
        want = expand(str(cond["stdout_contains"]), net, scenario_dir)
        if want not in res.stdout:
            return False, f"output does not contain {want!r}"
    json_checks = {"len_ge", "len_le", "len_eq", "includes_peers", "excludes_peers", "contains",
                   "eq", "ne", "ge", "le"} & set(cond)
    if not json_checks:
        return True, "ok"
    try:
        out = jsonlib.loads(res.stdout)
    except ValueError:
        return False, f"output is not JSON: {res.stdout[:200]!r}"
    if "path" in cond:
        out = _dig(out, str(cond["path"]))
    if "len_ge" in cond and not len(out) >= int(cond["len_ge"]):
        return False, f"length {len(out)}, want >= {cond['len_ge']}"
    if "len_le" in cond and not len(out) <= int(cond["len_le"]):
        return False, f"length {len(out)}, want <= {cond['len_le']}"
    if "len_eq" in cond and len(out) != int(cond["len_eq"]):
        return False, f"length {len(out)}, want {cond['len_eq']}"
    for key in ("includes_peers", "excludes_peers"):
        if key not in cond:
            continue
        want_names = cond[key]
        if want_names == "others":
            want_names = [n for n in net.nodes if n != name]
        listed = {normalize_peer_id(p.get("peer_id", "")) for p in out if isinstance(p, dict)}
        for other in want_names:
            present = normalize_peer_id(net.peer_id(other)) in listed
            if key == "includes_peers" and not present:
                return False, f"does not list {other}"
            if key == "excludes_peers" and present:
                return False, f"still lists {other}"
    if "contains" in cond:
        want = expand(cond["contains"], net, scenario_dir)
        if isinstance(out, (list, dict)) and not isinstance(want, str):
            found = want in out
        else:
            found = str(want) in (out if isinstance(out, str) else jsonlib.dumps(out))
        if not found:
            return False, f"{want!r} not found"
    for op, fn in (("eq", lambda a, b: a == b), ("ne", lambda a, b: a != b),
                   ("ge", lambda a, b: a >= b), ("le", lambda a, b: a <= b)):
        if op in cond:
            want = expand(cond[op], net, scenario_dir)
            got = normalize_peer_id(out) if isinstance(out, str) and isinstance(want, str) \
                and _looks_like_peer_id(want) else out
            is_id = isinstance(want, str) and _looks_like_peer_id(want)
            want_n = normalize_peer_id(want) if is_id else want
            if not fn(got, want_n):
                return False, f"value {out!r}, want {op} {want!r}"
    return True, "ok"


def _looks_like_peer_id(s: str) -> bool:
    norm = normalize_peer_id(s)
    return len(norm) == 56 and bool(re.fullmatch(r"[A-Z2-7]+", norm))


def _describe(step: dict[str, Any]) -> str:
    if "name" in step:
        return str(step["name"])
    action = step.get("action", "?")
    bits = [str(action)]
    t = step.get("nodes", step.get("node"))
    if t is not None:
        bits.append(t if isinstance(t, str) else ",".join(map(str, t)))
    if "args" in step:
        bits.append("`node " + " ".join(map(str, step["args"])) + "`")
    cond = step.get("until") or step.get("expect")
    if isinstance(cond, dict) and "cli" in cond:
        bits.append("until `node " + " ".join(map(str, cond["cli"])) + "`")
    if action == "sleep":
        bits.append(f"{step.get('seconds', 1)}s")
    return " ".join(bits)


def run_toml_step(net: Testnet, step: dict[str, Any], scenario_dir: Path) -> None:
    """Execute one `[[step]]` table; raises TestnetError (or WaitTimeout) on failure."""
    action = step.get("action")
    if action not in STEP_ACTIONS:
        raise TestnetError(f"unknown action {action!r} (one of: {', '.join(STEP_ACTIONS)})")
    timeout = float(step.get("timeout", 30))
    targets = _targets(step, net)
    if action == "start":
        if not targets:
            raise TestnetError("`start` needs `node` or `nodes`")
        new = [n for n in targets if n not in net.nodes]
        old = [n for n in targets if n in net.nodes]
        if new:
            share = [Path(expand(str(p), net, scenario_dir)) for p in step.get("share", [])]
            for d in share:
                d.mkdir(parents=True, exist_ok=True)
            net.add_nodes(new, share=share, bootstrap=bool(step.get("bootstrap", True)),
                          bootstrap_peers=expand([str(p) for p in step.get("bootstrap_peers", [])],
                                                 net, scenario_dir),
                          extra_args=expand([str(a) for a in step.get("extra_args", [])],
                                            net, scenario_dir))
        if old:
            net.start_many(old)
    elif action in ("stop", "kill", "restart"):
        if not targets:
            raise TestnetError(f"`{action}` needs `node` or `nodes`")
        for n in targets:
            getattr(net, action)(n)
    elif action == "start_bootstrap":
        net.start_bootstrap(ttl_s=step.get("ttl_s"))
    elif action == "stop_bootstrap":
        net.stop_bootstrap()
    elif action == "kill_bootstrap":
        net.kill_bootstrap()
    elif action == "trust_all":
        net.trust_all(targets or None)
    elif action == "sleep":
        time.sleep(float(step.get("seconds", 1)))
    elif action == "cli":
        if not targets:
            raise TestnetError("`cli` needs `node` or `nodes`")
        args = expand([str(a) for a in step.get("args", [])], net, scenario_dir)
        for n in targets:
            if "expect" in step:
                cond = {"node": n, "cli": args, **step["expect"]}
                ok, why = check_condition(net, cond, scenario_dir)
                if not ok:
                    raise TestnetError(f"`node {' '.join(args)}` on {why}")
            else:
                net.cli(n, *args, json=False, check=bool(step.get("check", True)), timeout=timeout)
    elif action == "wait":
        until = step.get("until")
        if not isinstance(until, dict):
            raise TestnetError("`wait` needs an `until` condition table")
        last = ["never evaluated"]

        def holds() -> bool:
            ok, why = check_condition(net, until, scenario_dir)
            last[0] = why
            return ok

        try:
            net.wait_until(holds, timeout, float(step.get("interval", POLL_INTERVAL_S)),
                           what=_describe(step))
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; last check: {last[0]}") from None
    elif action == "assert":
        expect = step.get("expect")
        if not isinstance(expect, dict):
            raise TestnetError("`assert` needs an `expect` condition table")
        ok, why = check_condition(net, expect, scenario_dir)
        if not ok:
            raise TestnetError(f"assertion failed: {why}")


@dataclass
class ScenarioReport:
    scenario: Path
    ok: bool
    steps: list[StepResult]
    logs: dict[str, Path]
    error: str = ""
    duration_s: float = 0.0

    def format(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"scenario {self.scenario.name}: {verdict} ({self.duration_s:.1f}s)"]
        for s in self.steps:
            mark = "PASS" if s.ok else "FAIL"
            lines.append(f"  [{mark}] {s.index:>2}. {s.description}  ({s.duration_s:.1f}s)")
            if s.error:
                err = s.error.splitlines()
                if len(err) > REPORT_ERROR_LINES:  # keep the head (what) and tail (why)
                    err = [*err[:3], "...", *err[-(REPORT_ERROR_LINES - 4):]]
                lines.extend("         " + ln for ln in err)
        if self.error and not any(s.error for s in self.steps):
            lines.append(f"  error: {self.error}")
        lines.append("  logs:")
        lines.extend(f"    {k:<12} {v}" for k, v in self.logs.items() if v.exists())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": str(self.scenario), "ok": self.ok, "error": self.error,
                "duration_s": round(self.duration_s, 3),
                "steps": [dataclasses.asdict(s) for s in self.steps],
                "logs": {k: str(v) for k, v in self.logs.items()}}


def load_toml_scenario(path: Path) -> list[dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TestnetError(f"{path}: cannot read scenario ({exc})") from None
    steps = data.get("step")
    if not isinstance(steps, list) or not steps:
        raise TestnetError(f"{path}: a TOML scenario needs at least one [[step]] table")
    for i, s in enumerate(steps, 1):
        if s.get("action") not in STEP_ACTIONS:
            raise TestnetError(f"{path}: step {i}: unknown action {s.get('action')!r}")
    return steps


def run_scenario(path: Path, root: Path, *, python: str = sys.executable, transport: str = "tcp",
                 echo: Callable[[str], None] | None = None,
                 net_factory: Callable[..., Testnet] | None = None) -> ScenarioReport:
    """Run a .toml or .py scenario in a fresh testnet under `root`; always tears down."""
    path = Path(path).resolve()
    t0 = time.monotonic()
    factory = net_factory or Testnet
    net = factory(root, python=python, transport=transport, echo=echo)
    error = ""
    try:
        if path.suffix == ".toml":
            steps = load_toml_scenario(path)
            for i, step in enumerate(steps, 1):
                desc = _describe(step)
                s0 = time.monotonic()
                if echo:
                    echo(f"step {i}: {desc}")
                try:
                    run_toml_step(net, step, path.parent)
                except Exception as exc:  # noqa: BLE001 - goes into the report
                    net.steps.append(StepResult(i, desc, False, time.monotonic() - s0, str(exc)))
                    error = str(exc)
                    break
                net.steps.append(StepResult(i, desc, True, time.monotonic() - s0))
        elif path.suffix == ".py":
            fn = _load_python_scenario(path)
            try:
                result = fn(net)
                if inspect.isawaitable(result):
                    asyncio.run(_await(result))
            except Exception as exc:  # noqa: BLE001 - goes into the report
                error = f"{type(exc).__name__}: {exc}"
                if not any(not s.ok for s in net.steps):
                    net.steps.append(StepResult(len(net.steps) + 1, "scenario", False, 0.0, error))
        else:
            raise TestnetError(f"{path}: a scenario is a .toml or .py file")
    except TestnetError as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted (Ctrl-C / SIGTERM); everything was torn down"
        net.steps.append(StepResult(len(net.steps) + 1, "interrupted", False, 0.0, error))
    finally:
        net.teardown()
    return ScenarioReport(path, ok=not error, steps=net.steps, logs=net.log_paths(),
                          error=error, duration_s=time.monotonic() - t0)


async def _await(aw: Any) -> Any:
    return await aw


def _load_python_scenario(path: Path) -> Callable[[Testnet], Any]:
    spec = importlib.util.spec_from_file_location(f"scenario_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise TestnetError(f"{path}: cannot load")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken scenario is a report line
        raise TestnetError(f"{path}: failed to import: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, "scenario", None)
    if not callable(fn):
        raise TestnetError(f"{path}: defines no `scenario(net)` function")
    return fn  # type: ignore[no-any-return]

"""The `node` / `p2pfs` command line: thin. Parses, calls the daemon's control API, prints.

Only `init`, `id`, `trust`, `untrust`, `trusted`, `bootstrap` and `start` work
without a running daemon (they touch files in the home dir or start a
server). Every expected failure is one line on stderr and a non-zero exit code
from the error class (node/errors.py); no traceback reaches a user.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from typer.core import TyperGroup

from node.config import (
    MAX_PORT,
    TRANSPORTS,
    Settings,
    absolute_paths,
    default_home,
    load_settings,
    port_overrides,
)
from node.control import ControlClient, EventsPage, LogPage
from node.errors import (
    ConfigError,
    LocalIOError,
    NodeNotRunning,
    P2PError,
    UnknownPeer,
    describe_os_error,
)
from node.identity import Identity, PeerId, is_full_length_id, load_identity
from node.trust import TrustStore, resolve_peer


def _flags_without_placeholder(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows no `<bool>` placeholder.

    typer 0.29's rich help prints the value type of every option, flags included
    (`--json <bool>`); an empty metavar is what it prints instead.
    """
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


# click's UsageError (typer 0.29 vendors click and re-exports only BadParameter, its child)
_UsageError: Any = typer.BadParameter.__base__


class _NodeGroup(TyperGroup):
    """The root group: flags in every command's help (and its own) show no placeholder."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_placeholder(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        # a mistyped flag or command fails in parsing, before handle_errors runs: with
        # --json among the words, say it on stdout as JSON too (typer prints the box)
        words = [*getattr(ctx, "_protected_args", []), *ctx.args]  # cleared by invoke
        words = words[:words.index("--")] if "--" in words else words
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            if "--json" in words and not getattr(exc, "p2pfs_json_said", False):
                exc.p2pfs_json_said = True  # type: ignore[attr-defined]
                _json_error("UsageError", exc.format_message(), exc.exit_code)
            raise

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _flags_without_placeholder(cmd.get_params(ctx))
            if cmd.short_help is None and cmd.help:
                cmd.short_help = _summary(cmd.help)
        return cmd


def _summary(help_text: str) -> str:
    """A command's line in `node --help`: the first paragraph of its docstring as one
    flowing sentence (typer's rich help keeps the docstring's line breaks, which cut the
    command list mid-sentence)."""
    first = inspect.cleandoc(help_text).split("\n\n")[0]
    return " ".join(first.split())


app = typer.Typer(
    cls=_NodeGroup,
    name="node",
    help="p2pfs: direct, end-to-end encrypted, serverless file sharing between trusted peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# markup off by default: what is printed holds peer ids, aliases, paths and errors (some
# a peer's own words), and a `[` in them must be shown, never read as a style tag (or
# crash on `[/x]`); the few styled lines pass markup=True and escape what they hold
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

F = TypeVar("F", bound=Callable[..., Any])

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="P2PFS_HOME", show_envvar=True,
                 help="Node home dir (identity, config.toml, databases, logs). "
                      "Default: the platform's user data dir."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TransportOpt = Annotated[
    str | None,
    typer.Option("--transport", "-t", help="tcp, udp or quic (default: config `transport`)."),
]


def _version(value: bool) -> None:
    if value:
        from node import __version__

        out.print(f"p2pfs {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """p2pfs: direct, end-to-end encrypted, serverless file sharing between trusted peers.

    Start with `node init`, `node trust PEER_ID`, `node start`; then `node share FILE`.
    Every command takes --home DIR (env P2PFS_HOME) to pick a node.
    """


def _print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report it


def _json_error(kind: str, message: str, exit_code: int) -> None:
    """With --json, a failure is a JSON object on stdout too (one line, after any event
    lines), so a script that parses stdout gets the cause and the code, not nothing."""
    sys.stdout.write(json.dumps({"error": {"type": kind, "message": message,
                                           "exit_code": exit_code}}) + "\n")
    sys.stdout.flush()


def _fail(kind: str, message: str, exit_code: int, as_json: bool) -> typer.Exit:
    _print_error(message)
    if as_json:
        _json_error(kind, message, exit_code)
    return typer.Exit(exit_code)


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except P2PError as exc:
            raise _fail(type(exc).__name__, str(exc), exc.exit_code, as_json) from None
        except OSError as exc:  # last resort: nothing closer to the cause mapped it
            raise _fail(LocalIOError.__name__, describe_os_error(exc), LocalIOError.exit_code,
                        as_json) from None
        except KeyboardInterrupt as exc:  # a command may say what goes on (its args)
            message = f"interrupted: {exc.args[0]}" if exc.args else "interrupted"
            err.print(message)
            if as_json:
                _json_error("Interrupted", message, INTERRUPTED_EXIT_CODE)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]


def _home(home: Path | None) -> Path:
    h = (home or default_home()).expanduser()
    if h.exists() and not h.is_dir():  # else: "File exists", "Not a directory", no path
        raise ConfigError(f"node home {h} is a file, not a folder; pick another with "
                          "--home DIR (or env P2PFS_HOME)")
    return h


def _call(home: Path | None, cmd: str, args: dict[str, Any] | None = None, *,
          on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
    client = ControlClient(_home(home))
    return asyncio.run(client.call(cmd, args, on_event=on_event))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _duration_text(seconds: float) -> str:
    """How long a code still works, as a person says it: 45 s, 10 min (not "0 min")."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    delta = max(0.0, time.time() - ts)
    if delta < 90:
        return f"{delta:.0f}s ago"
    if delta < 5400:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def _resolve_offline(home: Path, text: str) -> PeerId:
    """Resolve a peer name without a daemon: full id, or trusted alias/prefix."""
    store = TrustStore.in_home(home)
    try:
        return resolve_peer(text, [(t.peer_id, [t.alias]) for t in store.all()])
    finally:
        store.close()


def _check_transport(transport: str | None) -> None:
    """A mistyped --transport is the user's error, said before asking the node."""
    if transport is not None and transport not in TRANSPORTS:
        raise ConfigError(f"option --transport must be one of {', '.join(TRANSPORTS)}, "
                          f"got {transport!r}")


# ---------------------------------------------------------------------------- identity


@app.command()
@handle_errors
def init(
    home: HomeOpt = None,
    name: Annotated[str, typer.Option("--name", "-n", help="A name peers will see.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
) -> None:
    """Create this node's Ed25519 identity (key file mode 0600) and print its peer id."""
    h = _home(home)
    identity = Identity.generate(name)
    path = identity.save(h, force=force)
    out.print(f"created identity in {path}")
    out.print(f"peer id:     {identity.peer_id}")
    out.print(f"fingerprint: {identity.peer_id.fingerprint}")
    out.print("give the peer id to the people you share with; they run "
              f"`node trust {identity.peer_id}`")


@app.command("id")
@handle_errors
def show_id(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print this node's peer id, name and fingerprint."""
    identity = load_identity(_home(home))
    info = {"peer_id": str(identity.peer_id), "name": identity.name,
            "fingerprint": identity.peer_id.fingerprint}
    if as_json:
        _print_json(info)
    else:
        out.print(f"peer id:     {info['peer_id']}\nname:        {info['name'] or '-'}\n"
                  f"fingerprint: {info['fingerprint']}")


# ---------------------------------------------------------------------------- servers


def _setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    from node.daemon_main import setup_logging

    setup_logging(settings, level)


# ServerLimits field -> the `node bootstrap` flag that sets it (for error messages)
_BOOTSTRAP_FLAG_OF = {
    "register_rate_per_s": "--register-rate", "register_burst": "--register-burst",
    "list_rate_per_s": "--list-rate", "list_burst": "--list-burst",
    "legacy_ids_per_source": "--legacy-per-ip", "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout", "concurrent_per_source": "--turns-per-ip",
    "pace_per_s": "--pace-per-ip",
    "block_after_refusals": "--block-after", "block_s": "--block-for",
}


@app.command()
@handle_errors
def bootstrap(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8470,
    db: Annotated[Path | None, typer.Option(help="SQLite registry file.")] = None,
    ttl: Annotated[float, typer.Option(help="Seconds a registration lives unless refreshed.")]
    = 300.0,
    register_rate: Annotated[float, typer.Option(
        help="Registrations per second per address (0 = unlimited).")] = 50.0,
    register_burst: Annotated[int, typer.Option(help="Registrations at once per address.")]
    = 500,
    list_rate: Annotated[float, typer.Option(
        help="GET /peers per second per address (0 = unlimited).")] = 50.0,
    list_burst: Annotated[int, typer.Option(help="Listings at once per address.")] = 500,
    legacy_per_ip: Annotated[int, typer.Option(
        help="Unsigned legacy ids one address may hold (0 = unlimited).")] = 64,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a client has to send request headers (and idle keep-alive).")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a client has to send a request body.")] = 10.0,
    turns_per_ip: Annotated[int, typer.Option(
        help="Requests of one address handled at once; more wait their turn "
             "(0 = no turns).")] = 2,
    pace_per_ip: Annotated[float, typer.Option(
        help="Turns of one address started per second, after 8 at once: a burst is "
             "spread out (0 = unpaced; --turns-per-ip 0 also turns pacing off).")] = 250.0,
    block_after: Annotated[int, typer.Option(
        help="Connections of one address refused at accept within 1 s (it ignores its "
             "429s) before the kernel drops its connection attempts for --block-for "
             "seconds (0 = never; Linux).")] = 64,
    block_for: Annotated[float, typer.Option(
        help="Seconds an address that keeps flooding is dropped in the kernel.")] = 10.0,
) -> None:
    """Run the bootstrap registration server in the foreground (Ctrl-C stops it)."""
    from bootstrap.limits import ServerLimits
    from bootstrap.server import run

    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"option --port must be 0-{MAX_PORT}, got {port}")
    if not ttl > 0:
        raise ConfigError(f"option --ttl must be a positive number of seconds, got {ttl:g}")
    try:
        limits = ServerLimits(register_rate_per_s=register_rate, register_burst=register_burst,
                              list_rate_per_s=list_rate, list_burst=list_burst,
                              legacy_ids_per_source=legacy_per_ip,
                              header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                              concurrent_per_source=turns_per_ip, pace_per_s=pace_per_ip,
                              block_after_refusals=block_after, block_s=block_for)
    except ValueError as exc:
        message = str(exc)
        for field, flag in _BOOTSTRAP_FLAG_OF.items():  # name the flag, not the field
            message = message.replace(field, f"option {flag}")
        raise ConfigError(f"node bootstrap: {message}") from None
    _setup_logging(None)
    run(host=host, port=port, db_path=db, ttl_s=ttl, limits=limits)


@app.command()
@handle_errors
def relay(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free one).")] = 8479,
    max_reservations_per_ip: Annotated[int, typer.Option(
        help="Reservations one address may hold.")] = 16,
    max_circuits: Annotated[int, typer.Option(
        help="Circuits one reservation may have open at once.")] = 16,
    max_circuit_mib: Annotated[int, typer.Option(
        help="MiB one circuit may carry (both directions).")] = 4096,
    max_circuit_s: Annotated[int, typer.Option(help="Seconds one circuit may live.")] = 3600,
    reservation_ttl: Annotated[int, typer.Option(
        help="Seconds a reservation lives unless renewed.")] = 120,
) -> None:
    """Run a relay in the foreground: nodes behind NAT stay reachable through it (Ctrl-C stops)."""
    from bootstrap.relay import RelayLimits
    from bootstrap.relay import run as run_relay

    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"option --port must be 0-{MAX_PORT}, got {port}")
    try:
        limits = RelayLimits(reservation_ttl_s=reservation_ttl,
                             max_reservations_per_ip=max_reservations_per_ip,
                             max_circuits_per_reservation=max_circuits,
                             max_circuit_bytes=max_circuit_mib * 1024 * 1024,
                             max_circuit_s=max_circuit_s)
    except ValueError as exc:
        raise ConfigError(f"node relay: {exc}") from None
    _setup_logging(None)
    run_relay(host, port, limits)


@app.command()
@handle_errors
def start(
    home: HomeOpt = None,
    bootstrap_url: Annotated[list[str], typer.Option(
        "--bootstrap", "-b", metavar="URL", help="Bootstrap server URL (repeatable).")] = [],
    bootstrap_peer: Annotated[list[str], typer.Option(
        "--bootstrap-peer", metavar="HOST:PORT",
        help="HOST:PORT of a known node's DHT port (repeatable).")] = [],
    relay: Annotated[list[str], typer.Option(
        "--relay", metavar="HOST:PORT",
        help="HOST:PORT of a relay to stay reachable through, behind NAT "
             "(repeatable; config key relays).")] = [],
    share: Annotated[list[Path], typer.Option(
        "--share", "-s", metavar="DIR",
        help="Folder to mirror one way to every trusted peer (repeatable).")] = [],
    port: Annotated[int | None, typer.Option(
        "--port", "-p", help="Base port P: TCP P, UDP P+1, QUIC P+2, DHT P+3, dashboard "
                             "P+4 (a --*-port given on its own wins; 0 = any free ports "
                             "and no dashboard).")] = None,
    tcp_port: Annotated[int | None, typer.Option(
        help=f"TCP transport port (default {Settings.tcp_port}).")] = None,
    udp_port: Annotated[int | None, typer.Option(
        help=f"UDP transport port (default {Settings.udp_port}).")] = None,
    quic_port: Annotated[int | None, typer.Option(
        help=f"QUIC transport port, UDP (default {Settings.quic_port}).")] = None,
    dht_port: Annotated[int | None, typer.Option(
        help=f"Kademlia DHT port, UDP (default {Settings.dht_port}).")] = None,
    gui_port: Annotated[int | None, typer.Option(
        help=f"Dashboard port on --gui-host (default {Settings.gui_port}; 0 = no "
             "dashboard). `node gui` prints its address.")] = None,
    gui_host: Annotated[str | None, typer.Option(
        help="Address the dashboard listens on (default 127.0.0.1: this machine only).")]
    = None,
    listen_host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    advertise_host: Annotated[str | None, typer.Option(
        help="Address to advertise to peers (default: the listen address).")] = None,
    received_dir: Annotated[Path | None, typer.Option(
        help="Where received files go (default HOME/received).")] = None,
    transport: TransportOpt = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    no_lan_discovery: Annotated[bool, typer.Option(
        "--no-lan-discovery", help="Do not announce or listen on the local network "
                                   "(config key lan_discovery = false).")] = False,
) -> None:
    """Run the node in the foreground: listen, join the DHT, register, serve the CLI."""
    overrides: dict[str, Any] = {
        "bootstrap": bootstrap_url, "bootstrap_peers": bootstrap_peer, "relays": relay,
        "shared_dirs": [str(p) for p in share],
        **port_overrides(port, {"tcp_port": tcp_port, "udp_port": udp_port,
                                "quic_port": quic_port, "dht_port": dht_port,
                                "gui_port": gui_port}),
        "gui_host": gui_host,
        "listen_host": listen_host, "advertise_host": advertise_host,
        "received_dir": str(received_dir) if received_dir else None,
        "transport": transport, "log_level": log_level,
        "lan_discovery": False if no_lan_discovery else None,
    }
    settings = load_settings(_home(home), overrides)
    load_identity(settings.home)  # fail early and clearly without an identity
    _check_received_dir_writable(settings.received_path)
    from node import daemon_main

    if _reexec_daemon and daemon_main.can_reexec():
        # the daemon runs in a fresh interpreter, without typer/rich/pydantic (~10 MB)
        daemon_main.reexec(_home(home), overrides)
    _setup_logging(settings)
    from node.daemon import run_daemon

    run_daemon(settings)


def _writable(path: Path) -> bool:
    """May this process create files in the folder `path` (access(2): mode bits, ACLs,
    read-only mounts)."""
    return os.access(path, os.W_OK | os.X_OK)


def check_writable_folder(path: Path, what: str, option: str) -> None:
    """ConfigError, before the node is asked, when files cannot land in the folder `path`:
    it (or the nearest part of it that exists) is a file, is on a read-only file system or
    may not be written. A missing folder is fine where its parent can be written: the node
    creates it."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    where = "" if existing == path else f": {existing}"
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} is not a folder{where and where + ' is a file'}; "
                          f"{option}")
    if not _writable(existing):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "it is on a read-only file system" if read_only else "permission denied"
        raise ConfigError(f"{what} {path} is not writable ({why}{where}); {option}")


def _check_received_dir_writable(path: Path) -> None:
    """Said before the node starts (else it fails later, in the file index, with an
    errno)."""
    check_writable_folder(path, "received dir",
                          "pick another with --received-dir (config key received_dir)")


@app.command()
@handle_errors
def gui(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print the address of the running node's dashboard, with its token (HOME/gui.token,
    mode 0600: whoever has the address can drive the node)."""
    info = _call(home, "gui")
    if as_json:
        _print_json(info)
        return
    out.print(f"dashboard: {info['url']}")


@app.command()
@handle_errors
def stop(home: HomeOpt = None) -> None:
    """Ask the running node to stop."""
    _call(home, "stop")
    out.print("node is stopping")


@app.command()
@handle_errors
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the running node: id, ports, uptime, peers known."""
    info = _call(home, "status")
    if as_json:
        _print_json(info)
        return
    for key in ("peer_id", "name", "fingerprint", "host", "ports", "uptime_s", "peers_known",
                "trusted", "dht_contacts", "bootstrap"):
        value = info.get(key)
        if key == "uptime_s":
            value = f"{value:.0f} s"
        elif isinstance(value, dict):  # ports: "tcp 8471, udp 8472", not a Python dict
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        out.print(f"{key:<13} {value}")
    for r in info.get("relays") or []:  # reservations at relays (node/reach)
        out.print(f"{'relay':<13} {r['relay']}: {r['state']}"
                  + (f", {r['expires_in_s']:.0f} s left" if r["state"] == "reserved" else "")
                  + (f" ({r['last_error']})" if r.get("last_error") else ""))
    _print_discovery(info)


def _print_discovery(info: dict[str, Any]) -> None:
    """The advertised hosts, observed addresses and LAN discovery of `node status`."""
    out.print(f"{'hosts':<13} {', '.join(info.get('hosts') or []) or '-'}")
    seen = [f"{o['host']}:{o['port']} (via {o['via']} {o['reporter']})"
            for o in info.get("observed") or []]
    out.print(f"{'observed':<13} {'; '.join(seen) or 'none yet'}")
    if info.get("advertised_observed"):
        out.print(f"{'advertised':<13} {', '.join(info['advertised_observed'])}")
    lan = info.get("lan_discovery") or {}
    lan_text = (f"on, UDP port {lan.get('port')}, {lan.get('peers', 0)} peer(s) heard"
                if lan.get("enabled") else "off")
    out.print(f"{'lan':<13} {lan_text}")


# ---------------------------------------------------------------------------- peers


@app.command()
@handle_errors
def peers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List peers this node knows (bootstrap, DHT, LAN, cache, gossip) and if they are online."""
    rows = _call(home, "peers")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no peers known yet")
        return
    table = Table("peer", "name", "trusted", "address", "transports", "last seen", "source",
                  "path")
    for r in rows:
        via = f" ({r['added_via']})" if r.get("added_via") else ""
        # a name is the peer's own words (any stranger's, from the LAN or the DHT): text
        table.add_row(r["short_id"], r["alias"] or r["name"] or "-",
                      ("yes" + via) if r["trusted"] else "no", ",".join(r["hosts"]),
                      " ".join(f"{t}:{r['ports'][t]}" for t in r["transports"]),
                      ("online, " if r["online"] else "") + _ago(r["last_seen"]), r["source"],
                      ",".join(r.get("paths") or []) or "-")
    out.print(table)


@app.command()
@handle_errors
def lookup(
    peer: Annotated[str, typer.Argument(help="Peer id, unique prefix or alias.")],
    home: HomeOpt = None, as_json: JsonOpt = False,
) -> None:
    """Find a peer's current contact record through the DHT (not the bootstrap server)."""
    res = _call(home, "lookup", {"peer": peer})
    if as_json:
        _print_json(res)
        return
    rec = res["record"]
    out.print(f"{rec['peer_id']} ({rec['name'] or '-'})")  # the peer's own words
    out.print(f"  hosts {', '.join(rec['hosts'])}  ports {rec['ports']}  seq {rec['seq']}")
    out.print(f"  found in {res['hops']} hop(s), {res['queries']} queries, "
              f"{res['elapsed_ms']:.1f} ms")


@app.command()
@handle_errors
def trust(
    peer: Annotated[str, typer.Argument(help="Full peer id (or a prefix of a known peer).")],
    home: HomeOpt = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Local alias for the peer.")] = "",
) -> None:
    """Trust a peer: it may open channels, send files and sync with this node.
    PEER may also be a pairing code from `node invite` (the same as `node accept CODE`)."""
    h = _home(home)
    from node.pairing.code import looks_like_code

    if looks_like_code(peer):
        _accept(home, peer, name, None, as_json=False)
        return
    try:
        peer_id = PeerId.parse(peer)
    except P2PError as exc:
        if is_full_length_id(peer):  # a typo in a full id: say which, resolve nothing
            raise UnknownPeer(str(exc)) from None
        try:
            peer_id = PeerId.parse(_call(home, "resolve", {"peer": peer}))
        except UnknownPeer as exc:
            if "ambiguous" in str(exc):
                raise
            # the node's words are about trusted peers; here the peer is to be trusted
            raise UnknownPeer(f"no peer this node knows (from the bootstrap server, the DHT "
                              f"or the LAN) matches {peer!r}; give its full peer id (`node "
                              "id` on that device prints it), or pair with `node invite` "
                              "and `node accept CODE`") from None
        except NodeNotRunning:
            try:  # already trusted (a new alias for it): the trust store knows it
                peer_id = _resolve_offline(h, peer)
            except UnknownPeer as offline:
                raise UnknownPeer(f"{offline}; no node is running to look up other peers it "
                                  "knows, so give the full peer id") from None
    identity = load_identity(h)
    if peer_id == identity.peer_id:
        raise UnknownPeer("that is this node's own id")
    store = TrustStore.in_home(h)
    try:
        before = store.get(peer_id)
        entry = store.trust(peer_id, name)
    finally:
        store.close()
    label = f" as {entry.alias!r}" if entry.alias else ""
    out.print(f"trusted {peer_id}{label} (fingerprint {peer_id.fingerprint})")
    old_label = (before.alias if before else "") or peer_id.short
    if old_label != (entry.alias or peer_id.short):
        _keep_received_together(h, peer_id, old_label, entry.alias or peer_id.short)


def _keep_received_together(home: Path, peer_id: PeerId, old_label: str, new_label: str) -> None:
    """A peer's received files live in a folder named by its label: when the label
    changes (a new alias), move the folder, so its files do not split in two."""
    from node.transfer.paths import sanitize_label

    try:
        received = absolute_paths(load_settings(home)).received_path
    except P2PError as exc:
        err.print(f"warning: files received from it stay where they are ({exc})", markup=False)
        return
    old = received / sanitize_label(old_label, peer_id.short)
    new = received / sanitize_label(new_label, peer_id.short)
    if old == new or not old.is_dir():
        return
    if new.exists():
        err.print(f"warning: files received from it so far stay in {old}; new ones go to "
                  f"{new} (that folder exists already, so nothing was moved)", markup=False)
        return
    try:
        old.rename(new)
    except OSError as exc:
        err.print(f"warning: could not move {old} to {new} ({describe_os_error(exc)}); files "
                  "received from it so far stay there, new ones go to the new folder",
                  markup=False)
        return
    out.print(f"moved the files received from it: {old} -> {new}", markup=False)


@app.command()
@handle_errors
def untrust(
    peer: Annotated[str, typer.Argument(help="Peer id, unique prefix or alias.")],
    home: HomeOpt = None,
) -> None:
    """Stop trusting a peer: new channels from or to it are refused, and a running node
    closes the open ones within a second (transfers with it fail, partials are kept)."""
    h = _home(home)
    peer_id = _resolve_offline(h, peer)
    store = TrustStore.in_home(h)
    try:
        removed = store.untrust(peer_id)
    finally:
        store.close()
    if not removed:
        raise UnknownPeer(f"{peer_id.short} was not trusted")
    out.print(f"no longer trusting {peer_id}")


@app.command()
@handle_errors
def trusted(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List trusted peers."""
    store = TrustStore.in_home(_home(home))
    try:
        rows = [t.to_json() for t in store.all()]
    finally:
        store.close()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no trusted peers; add one with `node trust PEER_ID --name NAME`")
        return
    table = Table("peer id", "alias", "fingerprint", "since", "added via")
    for r in rows:
        table.add_row(r["peer_id"], r["alias"] or "-", r["fingerprint"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["added_at"])),
                      r.get("added_via", "id"))
    out.print(table)


# ---------------------------------------------------------------------------- pairing

RendezvousOpt = Annotated[
    str | None,
    typer.Option("--rendezvous", help="Pairing mailbox URL (default: the node's first "
                                      "--bootstrap server)."),
]


def _print_paired(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(res)
        return
    label = f" as {res['alias']!r}" if res.get("alias") else ""
    # the name is the other device's to choose: shown, never read as rich markup
    out.print(f"paired: now trusting {res['peer_id']}{label} "
              f"(calls itself {res.get('name') or '-'!r})")
    out.print(f"its fingerprint:   {res['fingerprint']}")
    out.print(f"verification:      {res['verification']}  (the other device shows the same "
              "words; compare them if you like)")


@app.command()
@handle_errors
def invite(
    home: HomeOpt = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Local alias for the peer that "
                                                           "accepts.")] = "",
    expires: Annotated[str, typer.Option("--expires", help="How long the code works: 90s, "
                                                           "10m, 1h.")] = "10m",
    rendezvous: RendezvousOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a one-time pairing code and wait until another device runs `node accept CODE`;
    then both trust each other. A wrong code trusts nobody."""
    from node.pairing.code import parse_duration_s

    try:
        expires_s = parse_duration_s(expires)
    except ValueError as exc:
        raise ConfigError(f"option --expires: {exc}") from None

    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("type") != "code":
            return
        if as_json:
            sys.stdout.write(json.dumps({"event": ev}) + "\n")
            sys.stdout.flush()
            return
        left = max(0.0, float(ev.get("expires_at", 0)) - time.time())
        out.print(f"pairing code: [bold]{escape(str(ev['code']))}[/]", markup=True)
        out.print(f"on the other device run: node accept {ev['code']}   "
                  f"(works once, for {_duration_text(left)})")
        sys.stdout.flush()

    res = _call(home, "invite", {"name": name, "expires_s": expires_s,
                                 "rendezvous": rendezvous}, on_event=on_event)
    _print_paired(res, as_json)


def _accept(home: Path | None, code: str, name: str, rendezvous: str | None, *,
            as_json: bool) -> None:
    from node.pairing.code import parse_code

    parse_code(code)  # a mistyped code is said before asking the node
    res = _call(home, "accept", {"code": code, "name": name, "rendezvous": rendezvous})
    _print_paired(res, as_json)


@app.command()
@handle_errors
def accept(
    code: Annotated[str, typer.Argument(help="The code `node invite` printed, e.g. "
                                             "7-crossover-eyetooth.")],
    home: HomeOpt = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Local alias for the inviting "
                                                           "peer.")] = "",
    rendezvous: RendezvousOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Use a pairing code from `node invite`: both devices trust each other."""
    _accept(home, code, name, rendezvous, as_json=as_json)


@app.command()
@handle_errors
def ping(
    peer: Annotated[str, typer.Argument(help="Peer id, unique prefix or alias.")],
    home: HomeOpt = None, transport: TransportOpt = None,
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=1000,
                                       help="Round trips to measure.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Open an authenticated channel to a trusted peer and measure round trips."""
    _check_transport(transport)

    def on_event(ev: dict[str, Any]) -> None:
        if not as_json:
            out.print(f"reply {ev['seq']}: {ev['rtt_ms']:.2f} ms")

    res = _call(home, "ping", {"peer": peer, "transport": transport, "count": count},
                on_event=on_event)
    if as_json:
        _print_json(res)
        return
    rtts = sorted(res["rtt_ms"])
    via = (f" via relay {res['relay']}" if res.get("relay") else
           " (hole-punched)" if res.get("path") == "hole-punched" else "")
    out.print(f"{res['transport']} channel to {res['peer_id'][:7]} at "
              f"{res['remote'][0]}:{res['remote'][1]}{via}: "
              f"handshake {res['handshake_ms']:.1f} ms, "
              f"rtt min/median/max {rtts[0]:.2f}/{rtts[len(rtts) // 2]:.2f}/{rtts[-1]:.2f} ms")


# ---------------------------------------------------------------------------- files


def transfer_progress(as_json: bool) -> Any:
    """The progress bars of `share`, `send` and `receive` on stderr (off with --json or
    without a terminal). A peer's alias or a file name is text, never markup: the
    description column parses markup on its own, whatever the console says ("bob [/x]"
    raised MarkupError, "[laptop]" vanished)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=err, disable=as_json or not err.is_terminal)


@app.command()
@handle_errors
def share(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to share.")],
    home: HomeOpt = None,
    to: Annotated[list[str], typer.Option(
        "--to", metavar="PEER", help="Peer (id, prefix or alias) to send to now (repeatable). "
                     "Default: every trusted peer that is online.")] = [],
    transport: TransportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send files or folders to trusted peers, end-to-end encrypted, and wait until each
    peer has verified its copy. Peers are also notified by a signed "shared" event.
    The node does the work: Ctrl-C here does not stop the transfer (`node cancel` does)."""
    _check_transport(transport)
    for p in paths:
        if not p.exists():
            raise LocalIOError(f"{p} does not exist")
    progress = transfer_progress(as_json)
    bars: dict[str, Any] = {}
    transfer_ids: dict[str, None] = {}  # in order seen, for what Ctrl-C says

    def on_event(ev: dict[str, Any]) -> None:
        tid = ev.get("id", "")
        if tid:
            transfer_ids.setdefault(str(tid))
        if as_json:
            sys.stdout.write(json.dumps({"event": ev}) + "\n")
            sys.stdout.flush()
            return
        if tid not in bars:
            bars[tid] = progress.add_task(f"{ev.get('peer', '?')} ({ev.get('transport')})",
                                          total=ev.get("bytes_total") or None)
        progress.update(bars[tid], completed=ev.get("bytes_done", 0),
                        total=ev.get("bytes_total") or None)
        if ev.get("type") == "retry":
            err.print(f"{ev.get('peer')}: {ev.get('error')}; retrying")
        elif ev.get("type") == "finished" and not err.is_terminal:
            pass

    try:
        with progress:
            res = _call(home, "share", {"paths": [str(p.resolve()) for p in paths], "to": to,
                                        "transport": transport}, on_event=on_event)
    except KeyboardInterrupt:
        ids = " ".join(transfer_ids) or "ID"
        raise KeyboardInterrupt(f"the node goes on sending; `node transfers` shows it, "
                                f"`node cancel {ids}` stops it") from None
    if as_json:
        _print_json(res)
    failed = [t for t in res["transfers"] if t["state"] != "done"]
    if not as_json:
        for t in res["transfers"]:
            if t["state"] == "done":
                out.print(f"{t['peer']}: verified {t['files_done']} file(s), "
                          f"{_size(t['bytes_total'])} over {t['transport']} "
                          f"({_size(t['rate_bps'])}/s)")
            else:
                peer, why = str(t["peer"]), str(t["error"])
                # "bob aborted the transfer: disk full" names the peer already
                said = why if why.startswith(f"{peer} ") else f"{peer}: {t['state']}: {why}"
                err.print(f"[bold red]error:[/] {escape(said)}", markup=True)
    if failed:
        raise typer.Exit(1)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@app.command()
@handle_errors
def transfers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show transfers in progress and recent ones."""
    rows = _call(home, "transfers")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no transfers yet")
        return
    # the id is what `node cancel` takes: never cut
    table = Table(Column("id", no_wrap=True, min_width=12), "dir", "peer", "transport",
                  "state", "progress", "files", "error")
    for r in rows:
        done = f"{_size(r['bytes_done'])}/{_size(r['bytes_total'])}"
        table.add_row(r["id"], r["direction"], r["peer"], r["transport"], r["state"], done,
                      f"{r['files_done']}/{r['files_total']}", r["error"] or "")
    out.print(table)


@app.command()
@handle_errors
def cancel(
    transfer_id: Annotated[str, typer.Argument(help="Transfer id (or a unique prefix).")],
    home: HomeOpt = None,
) -> None:
    """Cancel a running transfer; what was verified so far is kept for a later resume."""
    res = _call(home, "cancel", {"id": transfer_id})
    out.print(f"cancelling transfer {res['id']} with {res['peer']}")


# ---------------------------------------------------------------------------- change log


@app.command("log")
@handle_errors
def show_log(
    home: HomeOpt = None,
    peer: Annotated[str | None, typer.Option("--peer", help="Only this origin peer.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Epoch ms, or a duration like 10m, 2h, 3d.")] = None,
    path: Annotated[str | None, typer.Option("--path", help="Glob on the path.")] = None,
    limit: Annotated[int, typer.Option(
        min=1, max=10000, help="Show the newest N matching events.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Query the change log: every accepted create/edit/delete/move/share event.
    When more events match than --limit, the newest are shown and stderr says how many
    were left out (with --json too, as a JSON line)."""
    if since is not None:
        from node.gossip.log import ms_from_text

        ms_from_text(since)  # a bad --since is the user's error, said before asking the node
    res = _call(home, "log", {"peer": peer, "since": since, "path": path, "limit": limit})
    rows, cut = _log_page(res)
    if as_json:
        _print_json(rows)
        if cut is not None:
            sys.stderr.write(json.dumps(cut) + "\n")
        return
    if not rows:
        out.print("no events")
        return
    table = Table("time", "origin", "seq", "kind", "folder", "path", "size")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["wall_ms"] / 1000))
        shown = r["path"] if not r.get("old_path") else f"{r['old_path']} -> {r['path']}"
        table.add_row(when, r["origin_label"], str(r["seq"]), r["kind"], r["folder"], shown,
                      _size(r["size"]) if r["kind"] != "deleted" else "")
    out.print(table)
    if cut is not None:
        err.print(cut["message"], markup=False)


def _log_page(res: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows of a `log` reply, and a note on what was cut (None when nothing was)."""
    page = LogPage.from_json(res)
    if not page.more:
        return page.events, None
    if page.total <= page.limit_max:
        how = f"show them all with --limit {page.total}"
    else:
        how = f"--limit goes up to {page.limit_max:,}; narrow with --since, --peer or --path"
    message = f"... {len(page.events):,} of {page.total:,} events shown (the newest); {how}"
    return page.events, {"more": True, "shown": len(page.events), "total": page.total,
                         "message": message}


@app.command()
@handle_errors
def events(
    home: HomeOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming.")] = False,
    since: Annotated[int | None, typer.Option(
        "--since", help="Only notifications with id > N (ids go up by exactly one). "
                        "Default: the newest 100.")] = None,
    limit: Annotated[int, typer.Option(
        min=1, max=10000, help="At most N notifications (a page; not with --follow).")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Stream notifications: file shared/updated/deleted/moved/received, transfer failed,
    peer joined/left, event rejected, folder offered, locally changed, conflict. Use
    --since with the last id you saw to miss nothing; when output was cut, stderr says so
    and gives the --since of the next page."""

    def on_event(ev: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(ev) + "\n")
        else:
            sys.stdout.write(_event_line(ev) + "\n")
        sys.stdout.flush()

    res = _call(home, "events", {"follow": follow, "since": since, "limit": limit},
                on_event=on_event)
    cut = _events_cut(res, since)
    if cut is not None:
        sys.stderr.write((json.dumps(cut) if as_json else cut["message"]) + "\n")


def _event_line(ev: dict[str, Any]) -> str:
    from node.notifications import render

    when = time.strftime("%H:%M:%S", time.localtime(ev.get("at_ms", 0) / 1000))
    kind = str(ev.get("kind", "?"))
    return f"{ev.get('id'):>6} {when} {kind:<15} {render(kind, ev.get('data'), ev.get('labels'))}"


def _events_cut(res: Any, since: int | None) -> dict[str, Any] | None:
    """What an `events` reply left out: newer ones past --limit, or older ones before the
    default window. None when nothing was cut."""
    page = EventsPage.from_json(res)
    if page.more:
        total = page.shown + page.newer
        message = f"... {page.shown:,} of {total:,} shown; page with --since {page.last_id}"
        return {"more": True, "shown": page.shown, "total": total,
                "next_since": page.last_id, "message": message}
    if since is None and page.older > 0:
        total = page.shown + page.older
        message = (f"... the newest {page.shown:,} of {total:,} shown; see the older ones "
                   "with --since 0")
        return {"more": True, "shown": page.shown, "total": total, "next_since": 0,
                "message": message}
    return None


# `node send` / `node receive` (one-shot sends by a code) live in their own module
from node.cli_send import register as _register_send  # noqa: E402

_register_send(app)

import node.cli_folders  # noqa: E402,F401 - adds `node folder ...` (built on the helpers above)

# set by main(), the real program entry: `node start` then execs the daemon's own entry
# (node/daemon_main.py); an in-process caller (typer's CliRunner) keeps its process
_reexec_daemon = False


def main() -> None:
    global _reexec_daemon
    _reexec_daemon = True
    app()


if __name__ == "__main__":
    main()

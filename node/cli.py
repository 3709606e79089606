"""The `node` / `p2pfs` command line: thin. Parses, calls the daemon's control API, prints.

Only `init`, `id`, `trust`, `untrust`, `trusted`, `bootstrap` and `start` work
without a running daemon (they touch files in the home dir or start a
server). Every expected failure is one line on stderr and a non-zero exit code
from the error class (node/errors.py); no traceback reaches a user.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from node.config import (
    MAX_PORT,
    TRANSPORTS,
    Settings,
    default_home,
    load_settings,
    port_overrides,
)
from node.control import ControlClient
from node.errors import (
    ConfigError,
    LocalIOError,
    NodeNotRunning,
    P2PError,
    UnknownPeer,
    describe_os_error,
)
from node.identity import Identity, PeerId, load_identity
from node.trust import TrustStore, resolve_peer

app = typer.Typer(
    name="node",
    help="p2pfs: direct, end-to-end encrypted, serverless file sharing between trusted peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

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


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except P2PError as exc:
            _print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # last resort: nothing closer to the cause mapped it
            _print_error(describe_os_error(exc))
            raise typer.Exit(LocalIOError.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _home(home: Path | None) -> Path:
    return (home or default_home()).expanduser()


def _call(home: Path | None, cmd: str, args: dict[str, Any] | None = None, *,
          on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
    client = ControlClient(_home(home))
    return asyncio.run(client.call(cmd, args, on_event=on_event))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


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
    from node.logfmt import SafeFormatter
    from node.statefiles import PrivateRotatingFileHandler, private_dir

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings is not None:
        private_dir(settings.home)
        handlers.append(PrivateRotatingFileHandler(
            settings.log_file, maxBytes=5 * 1024 * 1024, backupCount=3))
        level = settings.log_level
    # file names reach log messages: escaped, so a name cannot forge a log line
    for handler in handlers:
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    # kademlia logs every RPC at DEBUG/INFO; keep it quiet unless asked
    for noisy in ("kademlia", "rpcudp", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


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
                              header_timeout_s=header_timeout, body_timeout_s=body_timeout)
    except ValueError as exc:
        raise ConfigError(f"node bootstrap: {exc}") from None
    _setup_logging(None)
    run(host=host, port=port, db_path=db, ttl_s=ttl, limits=limits)


@app.command()
@handle_errors
def start(
    home: HomeOpt = None,
    bootstrap_url: Annotated[list[str], typer.Option(
        "--bootstrap", "-b", help="Bootstrap server URL (repeatable).")] = [],
    bootstrap_peer: Annotated[list[str], typer.Option(
        "--bootstrap-peer", help="HOST:PORT of a known node's DHT port (repeatable).")] = [],
    share: Annotated[list[Path], typer.Option(
        "--share", "-s", help="Folder to watch and share (repeatable).")] = [],
    port: Annotated[int | None, typer.Option(
        "--port", "-p", help="Base port P: TCP P, UDP P+1, QUIC P+2, DHT P+3 (a --*-port "
                             "given on its own wins; 0 = any free ports).")] = None,
    tcp_port: Annotated[int | None, typer.Option(
        help=f"TCP transport port (default {Settings.tcp_port}).")] = None,
    udp_port: Annotated[int | None, typer.Option(
        help=f"UDP transport port (default {Settings.udp_port}).")] = None,
    quic_port: Annotated[int | None, typer.Option(
        help=f"QUIC transport port, UDP (default {Settings.quic_port}).")] = None,
    dht_port: Annotated[int | None, typer.Option(
        help=f"Kademlia DHT port, UDP (default {Settings.dht_port}).")] = None,
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
        "bootstrap": bootstrap_url, "bootstrap_peers": bootstrap_peer,
        "shared_dirs": [str(p) for p in share],
        **port_overrides(port, {"tcp_port": tcp_port, "udp_port": udp_port,
                                "quic_port": quic_port, "dht_port": dht_port}),
        "listen_host": listen_host, "advertise_host": advertise_host,
        "received_dir": str(received_dir) if received_dir else None,
        "transport": transport, "log_level": log_level,
        "lan_discovery": False if no_lan_discovery else None,
    }
    settings = load_settings(_home(home), overrides)
    load_identity(settings.home)  # fail early and clearly without an identity
    _setup_logging(settings)
    from node.daemon import run_daemon

    run_daemon(settings)


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
        out.print(f"{key:<13} {value}")
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
    table = Table("peer", "name", "trusted", "address", "transports", "last seen", "source")
    for r in rows:
        table.add_row(r["short_id"], r["alias"] or r["name"] or "-",
                      "yes" if r["trusted"] else "no", ",".join(r["hosts"]),
                      " ".join(f"{t}:{r['ports'][t]}" for t in r["transports"]),
                      ("online, " if r["online"] else "") + _ago(r["last_seen"]), r["source"])
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
    out.print(f"{rec['peer_id']} ({rec['name'] or '-'})")
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
    """Trust a peer: it may open channels, send files and sync with this node."""
    h = _home(home)
    try:
        peer_id = PeerId.parse(peer)
    except P2PError:
        try:
            peer_id = PeerId.parse(_call(home, "resolve", {"peer": peer}))
        except NodeNotRunning:
            raise UnknownPeer(f"{peer!r} is not a full peer id, and no node is running to "
                              "resolve a prefix; give the full 56-character id") from None
    identity = load_identity(h)
    if peer_id == identity.peer_id:
        raise UnknownPeer("that is this node's own id")
    store = TrustStore.in_home(h)
    try:
        entry = store.trust(peer_id, name)
    finally:
        store.close()
    label = f" as {entry.alias!r}" if entry.alias else ""
    out.print(f"trusted {peer_id}{label} (fingerprint {peer_id.fingerprint})")


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
    table = Table("peer id", "alias", "fingerprint", "since")
    for r in rows:
        table.add_row(r["peer_id"], r["alias"] or "-", r["fingerprint"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["added_at"])))
    out.print(table)


@app.command()
@handle_errors
def ping(
    peer: Annotated[str, typer.Argument(help="Peer id, unique prefix or alias.")],
    home: HomeOpt = None, transport: TransportOpt = None,
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=1000)] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Open an authenticated channel to a trusted peer and measure round trips."""
    if transport is not None and transport not in TRANSPORTS:
        raise typer.BadParameter(f"transport must be one of {', '.join(TRANSPORTS)}")

    def on_event(ev: dict[str, Any]) -> None:
        if not as_json:
            out.print(f"reply {ev['seq']}: {ev['rtt_ms']:.2f} ms")

    res = _call(home, "ping", {"peer": peer, "transport": transport, "count": count},
                on_event=on_event)
    if as_json:
        _print_json(res)
        return
    rtts = sorted(res["rtt_ms"])
    out.print(f"{res['transport']} channel to {res['peer_id'][:7]} at "
              f"{res['remote'][0]}:{res['remote'][1]}: handshake {res['handshake_ms']:.1f} ms, "
              f"rtt min/median/max {rtts[0]:.2f}/{rtts[len(rtts) // 2]:.2f}/{rtts[-1]:.2f} ms")


# ---------------------------------------------------------------------------- files


@app.command()
@handle_errors
def share(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to share.")],
    home: HomeOpt = None,
    to: Annotated[list[str], typer.Option(
        "--to", help="Peer (id, prefix or alias) to send to now (repeatable). "
                     "Default: every trusted peer that is online.")] = [],
    transport: TransportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send files or folders to trusted peers, end-to-end encrypted, and wait until each
    peer has verified its copy. Peers are also notified by a signed "shared" event.
    The node does the work: Ctrl-C here does not stop the transfer (`node cancel` does)."""
    if transport is not None and transport not in TRANSPORTS:
        raise typer.BadParameter(f"transport must be one of {', '.join(TRANSPORTS)}")
    for p in paths:
        if not p.exists():
            raise LocalIOError(f"{p} does not exist")
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                        disable=as_json or not err.is_terminal)
    bars: dict[str, Any] = {}

    def on_event(ev: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps({"event": ev}) + "\n")
            sys.stdout.flush()
            return
        tid = ev.get("id", "")
        if tid not in bars:
            bars[tid] = progress.add_task(f"{ev.get('peer', '?')} ({ev.get('transport')})",
                                          total=ev.get("bytes_total") or None)
        progress.update(bars[tid], completed=ev.get("bytes_done", 0),
                        total=ev.get("bytes_total") or None)
        if ev.get("type") == "retry":
            err.print(f"{ev.get('peer')}: {ev.get('error')}; retrying")
        elif ev.get("type") == "finished" and not err.is_terminal:
            pass

    with progress:
        res = _call(home, "share", {"paths": [str(p.resolve()) for p in paths], "to": to,
                                    "transport": transport}, on_event=on_event)
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
                err.print(f"[bold red]error:[/] {t['peer']}: {t['state']}: {t['error']}",
                          markup=True)
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
    table = Table("id", "dir", "peer", "transport", "state", "progress", "files", "error")
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
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Query the change log: every accepted create/edit/delete/move/share event."""
    if since is not None:
        from node.gossip.log import ms_from_text

        ms_from_text(since)  # a bad --since is the user's error, said before asking the node
    rows = _call(home, "log", {"peer": peer, "since": since, "path": path, "limit": limit})
    if as_json:
        _print_json(rows)
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


@app.command()
@handle_errors
def events(
    home: HomeOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming.")] = False,
    since: Annotated[int | None, typer.Option(
        "--since", help="Only notifications with id > N (ids go up by exactly one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stream notifications: file shared/updated/deleted/moved/received, transfer failed,
    peer joined/left, event rejected. Use --since with the last id you saw to miss nothing."""

    def on_event(ev: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(ev) + "\n")
        else:
            when = time.strftime("%H:%M:%S", time.localtime(ev.get("at_ms", 0) / 1000))
            sys.stdout.write(f"{ev.get('id'):>6} {when} {ev.get('kind'):<15} "
                             f"{_describe(ev)}\n")
        sys.stdout.flush()

    _call(home, "events", {"follow": follow, "since": since}, on_event=on_event)


def _describe(ev: dict[str, Any]) -> str:
    d = ev.get("data") or {}
    who = d.get("peer") or d.get("origin_label") or (d.get("origin") or d.get("peer_id") or "")[:7]
    path = d.get("path") or ",".join(d.get("paths") or [])
    if ev.get("kind") == "file_received":
        return f"received {path} ({_size(d.get('size', 0))}) from {who}"
    if ev.get("kind") == "transfer_failed":
        return f"{path} with {who}: {d.get('error')}"
    if d.get("local"):
        who = "me"
    return f"{path} by {who}" if path else f"{who} {d.get('name', '')}".strip()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

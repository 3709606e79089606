"""Settings: built-in defaults < ``config.toml`` in the home dir < environment < flags.

Every key of ``Settings`` may appear in config.toml, and as ``P2PFS_<KEY>`` in the
environment (lists comma-separated). A malformed file or value is a ConfigError
naming the file (or variable) and the key. The home dir itself comes from
``--home``, else ``P2PFS_HOME``, else the platform's user data dir.

Imports nothing of the project except errors.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.errors import ConfigError

CONFIG_FILE_NAME = "config.toml"
TRANSPORTS = ("tcp", "udp", "quic")
ENV_PREFIX = "P2PFS_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# `--port P` sets every port of the node, each one given on its own wins
# (the dashboard's gui_port too: P+4, and `--port 0` turns the dashboard off)
PORT_OFFSETS = {"tcp_port": 0, "udp_port": 1, "quic_port": 2, "dht_port": 3, "gui_port": 4}
MAX_PORT = 65535
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass
class Settings:
    home: Path
    name: str = ""
    # where the node listens; 127.0.0.1 unless the user opens it up on purpose
    listen_host: str = "127.0.0.1"
    # address written into the contact record; empty = listen_host
    advertise_host: str = ""
    tcp_port: int = 8471
    udp_port: int = 8472
    quic_port: int = 8473
    dht_port: int = 8468
    transport: str = "tcp"
    transports: list[str] = field(default_factory=lambda: list(TRANSPORTS))
    bootstrap: list[str] = field(default_factory=list)
    bootstrap_peers: list[str] = field(default_factory=list)
    # HOST:PORT of relays to keep a reservation at (bootstrap/relay.py), for a node behind NAT
    relays: list[str] = field(default_factory=list)
    register_interval_s: float = 60.0
    shared_dirs: list[str] = field(default_factory=list)
    received_dir: str = ""
    log_level: str = "INFO"
    # UDP transport datagram size (bytes); loopback can go far larger
    udp_datagram_bytes: int = 1452
    # the local dashboard (node/gui): TCP port on gui_host, 0 = no dashboard
    gui_port: int = 8474
    gui_host: str = "127.0.0.1"
    # signed announcements by UDP broadcast/multicast (node/discovery/lan.py)
    lan_discovery: bool = True
    lan_discovery_port: int = 21029
    # HOST:PORT destinations instead of broadcast + multicast (tests: 127.0.0.1 ports)
    lan_announce_targets: list[str] = field(default_factory=list)
    # seconds between signed presence heartbeats to trusted peers; a peer not heard from
    # within 3 x this (15 s by default) shows offline in `node peers`
    heartbeat_s: float = 5.0

    @property
    def control_socket(self) -> Path:
        return self.home / "control.sock"

    @property
    def received_path(self) -> Path:
        return Path(self.received_dir).expanduser() if self.received_dir else self.home / "received"

    @property
    def advertised_host(self) -> str:
        return self.advertise_host or self.listen_host

    @property
    def log_file(self) -> Path:
        return self.home / "node.log"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["home"] = str(self.home)
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "home"}


def default_home() -> Path:
    env = os.environ.get(ENV_PREFIX + "HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs  # only here: a daemon started with its home never loads it (1.6 MB)

    return Path(platformdirs.user_data_dir("p2pfs", appauthor=False))


def _coerce(key: str, value: Any, source: str, *, from_text: bool) -> Any:
    f = _FIELDS[key]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("list"):
            if from_text and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            bad = [v for v in value if not is_bootstrap_url(v)] if key == "bootstrap" else []
            if bad:
                raise ValueError(f"URLs like http://host:port ({bad[0]!r} is not one)")
            if key == "relays":
                _check_relay_addrs(value)
            bad = ([v for v in value if not is_hostport(v)]
                   if key in ("lan_announce_targets", "bootstrap_peers") else [])
            if bad:
                raise ValueError(f"HOST:PORT entries ({bad[0]!r} is not one)")
            bad = [v for v in value if v not in TRANSPORTS] if key == "transports" else []
            if bad:
                raise ValueError(f"some of {', '.join(TRANSPORTS)} ({bad[0]!r} is not one)")
            return value
        if kind == "bool":
            if from_text and isinstance(value, str):
                text = value.strip().lower()
                if text not in TRUE_WORDS + FALSE_WORDS:
                    raise TypeError("true or false")
                value = text in TRUE_WORDS
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if kind == "int":
            if isinstance(value, bool):
                raise TypeError("an integer")
            if from_text:
                value = value.strip()
                if not value.lstrip("-").isdigit():
                    raise TypeError("an integer")
                value = int(value)
            if not isinstance(value, int):
                raise TypeError("an integer")
            if key.endswith("_port") and not 0 <= value <= MAX_PORT:
                raise ValueError(f"a port number 0-{MAX_PORT}")
            if key == "udp_datagram_bytes" and not 512 <= value <= 65000:
                raise ValueError("between 512 and 65000")
            return value
        if kind == "float":
            value = float(value) if from_text else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise TypeError("a positive number")
            return float(value)
        if not isinstance(value, str):
            raise TypeError("a string")
        if key == "log_level":
            if value.upper() not in LOG_LEVELS:
                raise ValueError(f"one of {', '.join(LOG_LEVELS)}")
            return value.upper()
        if key == "transport" and value not in TRANSPORTS:
            raise ValueError(f"one of {', '.join(TRANSPORTS)}")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: key {key!r} must be {exc}, got {value!r}") from None


def _validate(s: Settings, source: str) -> None:
    if s.transport not in TRANSPORTS:
        raise ConfigError(f"{source}: key 'transport' must be one of {', '.join(TRANSPORTS)}")
    bad = [t for t in s.transports if t not in TRANSPORTS]
    if bad:
        raise ConfigError(f"{source}: key 'transports' has unknown transport(s) {bad}")


# settings whose command-line flag is not the key's name (a repeatable flag is singular)
_OPTION_NAMES = {"relays": "--relay", "bootstrap_peers": "--bootstrap-peer",
                 "shared_dirs": "--share"}


def _check_relay_addrs(values: list[str]) -> None:
    from node.contact import MAX_RELAYS
    from node.errors import ProtocolError
    from node.reach.relay_client import parse_relay_addr

    if len(values) > MAX_RELAYS:
        raise ValueError(f"at most {MAX_RELAYS} relays")
    for v in values:
        try:
            parse_relay_addr(v)
        except ProtocolError:
            raise ValueError(f"HOST:PORT addresses ({v!r} is not one)") from None


def is_hostport(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) <= MAX_PORT)


def is_bootstrap_url(url: str) -> bool:
    """http(s)://host[:port] with a host and, if given, a valid port."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def port_overrides(port: int | None, given: Mapping[str, int | None]) -> dict[str, int | None]:
    """The port flags of `node start`: `--port P` gives tcp P, udp P+1, quic P+2, dht
    P+3 and the dashboard P+4, except where a port is given on its own (in `given`,
    None = not given). `--port 0` means any free ports, and no dashboard."""
    span = max(PORT_OFFSETS.values())
    if port is not None and not 0 <= port <= MAX_PORT - span:
        raise ConfigError(f"option --port must be 0-{MAX_PORT - span} (it also sets the next "
                          f"{span}), got {port}")
    out: dict[str, int | None] = {}
    for key, offset in PORT_OFFSETS.items():
        alone = given.get(key)
        out[key] = alone if alone is not None else (
            None if port is None else (0 if port == 0 else port + offset))
    return out


def port_option(service: str, *, bad_address: bool = False) -> str:
    """What changes the port of a service (tcp, udp, quic, dht), or the address all of
    them listen on, for error messages."""
    if bad_address:
        host = "gui_host" if service == "gui" else "listen_host"
        return (f"--{host.replace('_', '-')} (config key {host}, "
                f"env {ENV_PREFIX}{host.upper()})")
    key = f"{service}_port"
    return f"--{service}-port or --port (config key {key}, env {ENV_PREFIX}{key.upper()})"


def load_settings(home: Path | None = None, overrides: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from defaults, the home dir's config.toml, env and flag overrides.

    `overrides` holds flag values; None values mean "flag not given".
    """
    env = os.environ if env is None else env
    home = (home or default_home()).expanduser()
    settings = Settings(home=home)

    path = home / CONFIG_FILE_NAME
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"{path}: unknown key {key!r}")
            setattr(settings, key, _coerce(key, value, str(path), from_text=False))
        _validate(settings, str(path))

    for key in _FIELDS:
        var = ENV_PREFIX + key.upper()
        if var in env:
            setattr(settings, key, _coerce(key, env[var], f"environment {var}", from_text=True))
    _validate(settings, "environment")

    for key, value in (overrides or {}).items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        option = _OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
        setattr(settings, key, _coerce(key, value, f"option {option}", from_text=False))
    _validate(settings, "command-line options")
    return absolute_paths(settings)


def absolute_paths(settings: Settings) -> Settings:
    """`settings` with the home, shared and received dirs absolute and symlink-resolved
    (relative ones against the current dir), so every later comparison of paths (the
    watcher's own-write suppression, the home checks) sees one spelling of each."""
    def resolve(text: str | Path) -> Path:
        return Path(text).expanduser().resolve()

    return dataclasses.replace(
        settings, home=resolve(settings.home),
        shared_dirs=[str(resolve(d)) for d in settings.shared_dirs],
        received_dir=str(resolve(settings.received_dir)) if settings.received_dir else "")

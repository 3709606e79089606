"""No traceback reaches a user: a busy port or a bad flag, env var or config key is one
`error:` line naming what to change, with the exit code of its class, as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.errors import ConfigError, PortUnavailable

EPHEMERAL = ["--tcp-port", "0", "--udp-port", "0", "--quic-port", "0", "--dht-port", "0",
             "--gui-port", "0"]
RUN_TIMEOUT_S = 30


def _node(home: Path, *args: str,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("P2PFS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=full_env, cwd=home.parent)


def _assert_one_error_line(res: subprocess.CompletedProcess[str], code: int, home: Path,
                           *names: str) -> str:
    """Exit `code`, one `error:` line on stderr naming each of `names`, no traceback."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    log_text = (home / "node.log").read_text() if (home / "node.log").exists() else ""
    for where in (res.stdout, res.stderr, log_text):
        assert "Traceback" not in where, where
    assert " ERROR " not in log_text, log_text
    return errors[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "h"
    assert _node(h, "init", "--home", str(h)).returncode == 0
    return h


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def busy_udp() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("service", ["tcp", "udp", "quic", "dht", "gui"])
def test_busy_port_at_start_is_one_line(home: Path, service: str, request: pytest.FixtureRequest,
                                        ) -> None:
    port = request.getfixturevalue("busy_tcp" if service in ("tcp", "gui") else "busy_udp")
    flag = f"--{service}-port"
    args = list(EPHEMERAL)
    args[args.index(flag) + 1] = str(port)
    res = _node(home, "start", "--home", str(home), *args)
    line = _assert_one_error_line(res, PortUnavailable.exit_code, home, str(port), flag,
                                  "already in use")
    assert line == res.stderr.splitlines()[-1]
    assert not (home / "daemon.json").exists()
    assert "stopped" not in res.stderr  # a node that never said "is up" did not stop either


def test_busy_port_at_bootstrap_is_one_line(tmp_path: Path, busy_tcp: int) -> None:
    res = _node(tmp_path, "bootstrap", "--port", str(busy_tcp), "--db", str(tmp_path / "b.db"))
    _assert_one_error_line(res, PortUnavailable.exit_code, tmp_path, str(busy_tcp), "--port",
                           "already in use")
    # the same cause, the same code and words from `python -m bootstrap`
    direct = subprocess.run([sys.executable, "-m", "bootstrap", "--port", str(busy_tcp), "--db",
                             str(tmp_path / "b.db")], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    _assert_one_error_line(direct, PortUnavailable.exit_code, tmp_path, str(busy_tcp), "--port")


@pytest.mark.parametrize("args, env, config, names", [
    (["--log-level", "LOUD"], {}, "", ["--log-level", "LOUD"]),
    ([], {}, 'log_level = "LOUD"\n', ["config.toml", "log_level"]),
    ([], {"P2PFS_TCP_PORT": "abc"}, "", ["P2PFS_TCP_PORT", "tcp_port", "an integer", "abc"]),
    (["--received-dir", "/proc/x"], {}, "", ["--received-dir", "/proc/x"]),
    ([], {}, 'bootstrap = ["http//no-scheme"]\n', ["config.toml", "bootstrap", "http//no-scheme"]),
    ([], {}, 'bootstrap = ["http://127.0.0.1:99999"]\n', ["config.toml", "bootstrap"]),
    (["--port", "65534"], {}, "", ["--port", "65534"]),
], ids=["log-level-flag", "log-level-key", "env-port", "received-dir", "bootstrap-url",
        "bootstrap-url-port", "port-too-high"])
def test_bad_input_at_start_is_one_line(home: Path, args: list[str], env: dict[str, str],
                                        config: str, names: list[str]) -> None:
    if config:
        (home / "config.toml").write_text(config)
    res = _node(home, "start", "--home", str(home), *EPHEMERAL, *args, env=env)
    _assert_one_error_line(res, ConfigError.exit_code, home, *names)
    assert not (home / "daemon.json").exists()


def test_bad_since_is_one_line_without_asking_the_node(home: Path) -> None:
    res = _node(home, "log", "--home", str(home), "--since", "5x")
    _assert_one_error_line(res, ConfigError.exit_code, home, "--since", "5x")


@pytest.mark.parametrize("args, names", [
    (["--port", "99999"], ["--port", "99999"]),
    (["--port", "0", "--ttl", "-1"], ["--ttl", "-1"]),
])
def test_bad_bootstrap_flags_are_one_line(tmp_path: Path, args: list[str],
                                          names: list[str]) -> None:
    res = _node(tmp_path, "bootstrap", *args, "--db", str(tmp_path / "b.db"))
    _assert_one_error_line(res, ConfigError.exit_code, tmp_path, *names)

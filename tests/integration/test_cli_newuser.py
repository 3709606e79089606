"""What a new (or mildly hostile) user runs into: errors with --json are JSON on stdout
too, text from peers and aliases is printed as text (never read as rich markup), the
root --help lists each command on its own lines, and `node start` says up front when the
received dir cannot be written. In-process through typer's CliRunner, no daemon: the
control API is faked where a reply from the node is needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.errors import ConfigError, IdentityError, NodeNotRunning

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def home(tmp_path: Path) -> str:
    h = str(tmp_path / "h")
    assert run("init", "--home", h).exit_code == 0
    return h


def _json_error(stdout: str) -> dict[str, Any]:
    """The last stdout line, which with --json must be the error object."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])["error"]


@pytest.mark.parametrize("argv", [["status"], ["peers"], ["transfers"], ["gui"],
                                  ["lookup", "bob"], ["folder", "status", "docs"]])
def test_json_error_without_a_node_is_json_on_stdout(home: str, argv: list[str]) -> None:
    res = run(*argv, "--home", home, "--json")
    assert res.exit_code == NodeNotRunning.exit_code, res.output
    error = _json_error(res.stdout)
    assert error == {"type": "NodeNotRunning", "message": error["message"],
                     "exit_code": NodeNotRunning.exit_code}
    assert "node start" in error["message"]
    assert res.stderr.startswith("error: ")  # people still get their one line


def test_json_error_without_an_identity(tmp_path: Path) -> None:
    res = run("id", "--home", str(tmp_path / "none"), "--json")
    assert res.exit_code == IdentityError.exit_code
    assert _json_error(res.stdout)["type"] == "IdentityError"


def test_without_json_stdout_stays_empty_on_error(home: str) -> None:
    res = run("status", "--home", home)
    assert res.exit_code == NodeNotRunning.exit_code
    assert res.stdout == ""


@pytest.mark.parametrize("command", ["ping", "share"])
def test_a_mistyped_transport_is_one_error_line(home: str, tmp_path: Path,
                                                command: str) -> None:
    target = "bob" if command == "ping" else str(tmp_path)
    res = run(command, target, "--home", home, "-t", "tpc", "--json")
    assert res.exit_code == ConfigError.exit_code, res.output
    assert res.stderr.splitlines() == [
        "error: option --transport must be one of tcp, udp, quic, got 'tpc'"]
    assert _json_error(res.stdout)["type"] == "ConfigError"

"""`node invite` / `node accept` / `node trust CODE` without a daemon: clear one-line
errors with the right exit codes, a mistyped code refused before the node is asked."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from node.cli import app
from node.errors import ConfigError, NodeNotRunning
from node.pairing.code import BadCode

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_pairing_commands_need_a_running_node(tmp_path: Path) -> None:
    home = str(tmp_path)
    run("init", "--home", home)
    for args in (("invite",), ("accept", "7-crossover-eyetooth"),
                 ("trust", "7-crossover-eyetooth")):
        res = run(*args, "--home", home)
        assert res.exit_code == NodeNotRunning.exit_code, (args, res.output)
        assert "node is not running" in res.output and "Traceback" not in res.output


def test_a_mistyped_code_is_refused_before_asking_the_node(tmp_path: Path) -> None:
    home = str(tmp_path)
    run("init", "--home", home)
    for code, says in (("7-eyetooth-crossover", "out of order"),
                       ("7-crossovr-eyetooth", "check the spelling")):
        res = run("accept", code, "--home", home)
        assert res.exit_code == BadCode.exit_code and says in res.output, res.output
    res = run("trust", "7-crossovr-eyetooth", "--home", home)
    assert res.exit_code == BadCode.exit_code and "check the spelling" in res.output


def test_a_bad_expiry_is_a_config_error(tmp_path: Path) -> None:
    res = run("invite", "--expires", "3d", "--home", str(tmp_path))
    assert res.exit_code == ConfigError.exit_code and "--expires" in res.output


def test_trusted_shows_how_each_peer_was_added(tmp_path: Path) -> None:
    from node.identity import Identity

    home = str(tmp_path)
    run("init", "--home", home)
    other = Identity.generate("bob").peer_id
    assert run("trust", str(other), "--home", home).exit_code == 0
    rows = json.loads(run("trusted", "--home", home, "--json").output)
    assert [r["added_via"] for r in rows] == ["id"]
    assert "added via" in run("trusted", "--home", home).output

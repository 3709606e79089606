"""`--help` of every command: flags take no value, so they show no value placeholder."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from node.cli import app

runner = CliRunner()
PLACEHOLDER = re.compile(r"<bool>|BOOLEAN", re.IGNORECASE)


def _commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_every_command_help_has_no_bool_placeholder() -> None:
    names = _commands()
    assert {"events", "share", "init", "status"} <= set(names)
    for args in [["--help"]] + [[name, "--help"] for name in names]:
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, (args, res.output)
        assert "--help" in res.output
        bad = [line for line in res.output.splitlines() if PLACEHOLDER.search(line)]
        assert not bad, (args, bad)


def test_value_options_still_show_their_type() -> None:
    res = runner.invoke(app, ["events", "--help"], env={"COLUMNS": "200"})
    assert re.search(r"--since\s+<int>", res.output), res.output
    assert re.search(r"--json\s+Print JSON", res.output), res.output

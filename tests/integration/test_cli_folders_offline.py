"""`node folder ...` with no node running: add/list/pause/resume/remove edit folders.json
with the node's own checks and say the change applies at the next start; the commands
that need a node say so; bad arguments are one clear line and a non-zero exit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from node.cli import app
from node.identity import Identity

runner = CliRunner()
PLACEHOLDER = re.compile(r"<bool>|BOOLEAN", re.IGNORECASE)
SUBCOMMANDS = ("add", "list", "remove", "pause", "resume", "rescan", "status", "override",
               "revert")


def run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def home(tmp_path: Path) -> str:
    h = str(tmp_path / "home")
    assert run("init", "--home", h, "--name", "me").exit_code == 0
    return h


def test_add_list_pause_resume_remove_offline(home: str, tmp_path: Path) -> None:
    bob = Identity.generate("bob").peer_id
    assert run("trust", str(bob), "--name", "bob", "--home", home).exit_code == 0
    photos = tmp_path / "Photos"
    photos.mkdir()
    res = run("folder", "add", str(photos), "--id", "photos", "--peer", "bob",
              "--label", "Family", "--home", home)
    assert res.exit_code == 0, res.output
    assert "added folder photos" in res.output and "applies when the node starts" in res.output
    rows = json.loads(run("folder", "list", "--json", "--home", home).stdout)
    assert [(r["id"], r["peers"], r["label"], r["status"]["source"]) for r in rows] == [
        ("photos", [str(bob)], "Family", "config")]
    assert run("folder", "pause", "photos", "--home", home).exit_code == 0
    rows = json.loads(run("folder", "list", "--json", "--home", home).stdout)
    assert rows[0]["paused"] is True and rows[0]["status"]["state"] == "paused"
    assert run("folder", "resume", "photos", "--home", home).exit_code == 0
    saved = json.loads((Path(home) / "folders.json").read_text())
    assert saved["folders"][0]["paused"] is False
    res = run("folder", "remove", "photos", "--home", home)
    assert res.exit_code == 0 and "its files stay" in res.output
    assert json.loads(run("folder", "list", "--json", "--home", home).stdout) == []
    assert photos.is_dir()


def test_bad_arguments_are_one_line_and_change_nothing(home: str, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    cases = [
        (["--mode", "sendonly"], 2, "use one of: send-receive, send-only, receive-only"),
        (["--peer", str(Identity.generate("x").peer_id)], 9, "node trust"),
        (["--peer", "bob"], 8, "trusted peers only"),
    ]
    for extra, code, words in cases:
        res = run("folder", "add", str(d), "--id", "d", *extra, "--home", home)
        assert res.exit_code == code, res.output
        assert words in res.output and "Traceback" not in res.output
    assert not (Path(home) / "folders.json").exists()
    assert run("folder", "add", str(d), "--id", "d", "--home", home).exit_code == 0
    res = run("folder", "add", str(d / "sub"), "--id", "e", "--home", home)
    assert res.exit_code == 2 and "does not exist" in res.output
    (d / "sub").mkdir()
    res = run("folder", "add", str(d / "sub"), "--id", "e", "--home", home)
    assert res.exit_code == 2 and "overlaps folder d" in res.output
    res = run("folder", "pause", "nope", "--home", home)
    assert res.exit_code == 2 and "no folder with id 'nope' (folders: d)" in res.output


def test_commands_that_need_a_node_say_so(home: str) -> None:
    for cmd in ("rescan", "status", "override", "revert"):
        res = run("folder", cmd, "x", "--home", home)
        assert res.exit_code == 5, res.output
        assert "needs a running node" in res.output and "node start" in res.output


def test_every_subcommand_has_help_with_an_example_and_no_bool_placeholder() -> None:
    group = typer.main.get_command(app)
    folder = group.commands["folder"]  # type: ignore[attr-defined]
    assert set(SUBCOMMANDS) <= set(folder.commands)
    for name in SUBCOMMANDS:
        res = run("folder", name, "--help")
        assert res.exit_code == 0, res.output
        assert "Example: node folder" in res.output, name
        assert not [line for line in res.output.splitlines() if PLACEHOLDER.search(line)]

"""CLI commands that work without a daemon, and the error a user sees without one."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from node.cli import app
from node.errors import NodeNotRunning
from node.identity import Identity

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_init_id_and_refuse_overwrite(tmp_path) -> None:
    home = str(tmp_path / "h")
    res = run("init", "--home", home, "--name", "alice")
    assert res.exit_code == 0, res.output
    info = json.loads(run("id", "--home", home, "--json").output)
    assert info["name"] == "alice" and info["peer_id"] in res.output
    again = run("init", "--home", home)
    assert again.exit_code != 0 and "already exists" in again.output
    forced = run("init", "--home", home, "--force")
    assert forced.exit_code == 0
    assert json.loads(run("id", "--home", home, "--json").output)["peer_id"] != info["peer_id"]


def test_trust_untrust_trusted(tmp_path) -> None:
    home = str(tmp_path)
    run("init", "--home", home)
    other = Identity.generate("bob").peer_id
    assert run("trust", str(other), "--home", home, "--name", "bob").exit_code == 0
    rows = json.loads(run("trusted", "--home", home, "--json").output)
    assert [(r["peer_id"], r["alias"]) for r in rows] == [(str(other), "bob")]
    bad = run("trust", str(other)[:-1] + ("Q" if str(other)[-1] != "Q" else "R"), "--home", home)
    assert bad.exit_code != 0
    assert run("untrust", "bob", "--home", home).exit_code == 0
    assert json.loads(run("trusted", "--home", home, "--json").output) == []
    again = run("untrust", str(other), "--home", home)
    assert again.exit_code != 0 and "was not trusted" in again.output


def test_commands_needing_daemon_say_so(tmp_path) -> None:
    home = str(tmp_path)
    run("init", "--home", home)
    for args in (["peers", "--json"], ["status"], ["lookup", "ABCDEFG"], ["stop"]):
        res = run(*args, "--home", home)
        assert res.exit_code == NodeNotRunning.exit_code, (args, res.output)
        assert "node is not running; start it with `node start`" in res.output


def test_start_without_identity_is_clear(tmp_path) -> None:
    res = run("start", "--home", str(tmp_path / "empty"))
    assert res.exit_code != 0 and "node init" in res.output


def test_malformed_config_is_clear(tmp_path) -> None:
    run("init", "--home", str(tmp_path))
    (tmp_path / "config.toml").write_text("tcp_port = 'x'\n")
    res = run("start", "--home", str(tmp_path))
    assert res.exit_code != 0 and "config.toml" in res.output and "tcp_port" in res.output


def test_missing_shared_folder_is_a_config_error(tmp_path) -> None:
    run("init", "--home", str(tmp_path))
    res = run("start", "--home", str(tmp_path), "--share", str(tmp_path / "nope"))
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.output and "nope" in res.output
    assert not (tmp_path / "daemon.json").exists()


def test_start_help_shows_the_default_ports() -> None:
    res = run("start", "--help")
    assert res.exit_code == 0
    for default in ("8471", "8472", "8473", "8468", "P+3"):
        assert default in res.output, (default, res.output)


def test_trust_with_a_typo_says_what_is_wrong(tmp_path) -> None:
    home = str(tmp_path)
    run("init", "--home", home)
    other = str(Identity.generate("bob").peer_id)
    typo = other[:3] + ("A" if other[3] != "A" else "B") + other[4:]
    res = run("trust", typo, "--home", home)
    assert res.exit_code != 0
    out = " ".join(res.output.split())
    assert "looks like a full peer id but its checksum does not match" in out, out
    assert "not a full peer id" not in out and "56-character" not in out
    short = run("trust", other[:-1], "--home", home)  # grouped, one character missing
    assert "has 62 with its dashes" in " ".join(short.output.split()), short.output
    assert run("trust", other, "--home", home, "--name", "bob").exit_code == 0
    near = run("trust", "bbo", "--home", home, "--name", "b2")
    assert near.exit_code != 0
    assert "did you mean 'bob'?" in " ".join(near.output.split()), near.output


def test_retrust_under_a_new_alias_keeps_received_files_together(tmp_path) -> None:
    home = tmp_path / "h"
    run("init", "--home", str(home))
    bob = Identity.generate("bob").peer_id
    assert run("trust", str(bob), "--home", str(home), "--name", "bob").exit_code == 0
    (home / "received" / "bob" / "docs").mkdir(parents=True)
    (home / "received" / "bob" / "docs" / "a.txt").write_text("kept")
    res = run("trust", str(bob), "--home", str(home), "--name", "robert")
    assert res.exit_code == 0, res.output
    assert "moved the files received from it" in res.output
    assert (home / "received" / "robert" / "docs" / "a.txt").read_text() == "kept"
    assert not (home / "received" / "bob").exists()
    # back to no alias: the folder follows to the short id
    assert run("trust", str(bob), "--home", str(home)).exit_code == 0
    assert (home / "received" / bob.short / "docs" / "a.txt").read_text() == "kept"
    # the target exists already: nothing is merged, the user is told where things are
    (home / "received" / "rob").mkdir()
    res = run("trust", str(bob), "--home", str(home), "--name", "rob")
    assert res.exit_code == 0
    said = " ".join(res.output.split())
    assert "files received from it so far stay in" in said and "nothing was moved" in said
    assert (home / "received" / bob.short / "docs" / "a.txt").exists()

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

import node.cli
from node.cli import app
from node.errors import Cancelled, ConfigError, IdentityError, NodeNotRunning
from node.identity import Identity

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


# ------------------------------------------------------------------ text is text

BRACKETS = "bob [laptop]"
HOSTILE = "x[/oops] [bold]y"  # a closing tag nothing opened: rich raises MarkupError


def test_an_alias_with_brackets_is_shown_whole(home: str) -> None:
    pid = str(Identity.generate("b").peer_id)
    res = run("trust", pid, "--name", BRACKETS, "--home", home)
    assert res.exit_code == 0, res.output
    assert f"as {BRACKETS!r}" in res.stdout
    listed = run("trusted", "--home", home)
    assert listed.exit_code == 0 and BRACKETS in listed.stdout, listed.stdout


def _fake_node(monkeypatch: pytest.MonkeyPatch, replies: dict[str, Any]) -> None:
    def call(home: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        return replies[cmd]

    monkeypatch.setattr(node.cli, "_call", call)


def _transfer(state: str, error: str) -> dict[str, Any]:
    return {"id": "abc123", "direction": "send", "peer": BRACKETS, "transport": "tcp",
            "state": state, "bytes_done": 0, "bytes_total": 10, "files_done": 0,
            "files_total": 1, "error": error, "rate_bps": 0.0}


def test_a_peers_error_text_is_printed_not_parsed(home: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The error of a failed share can be the other peer's words: it must not crash the
    CLI (a traceback) or lose its brackets."""
    _fake_node(monkeypatch, {"share": {"transfers": [_transfer("failed", HOSTILE)],
                                       "announced": []},
                             "transfers": [_transfer("failed", HOSTILE)]})
    src = tmp_path / "f.txt"
    src.write_text("x")
    res = run("share", str(src), "--home", home)
    assert res.exit_code == 1, (res.output, res.exception)
    assert f"error: {BRACKETS}: failed: {HOSTILE}" in res.stderr
    listed = runner.invoke(app, ["transfers", "--home", home], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.exception
    assert "[/oops]" in listed.stdout and "[laptop]" in listed.stdout


def test_a_peers_abort_names_it_once(home: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    why = f"{BRACKETS} aborted the transfer: cannot write: disk full"
    _fake_node(monkeypatch, {"share": {"transfers": [_transfer("failed", why)],
                                       "announced": []}})
    src = tmp_path / "f.txt"
    src.write_text("x")
    res = run("share", str(src), "--home", home)
    assert res.exit_code == 1, (res.output, res.exception)
    assert f"error: {why}" in res.stderr and res.stderr.count(BRACKETS) == 1, res.stderr


def test_a_peers_name_and_paths_in_a_receive_offer(home: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    offer = {"session": "s", "fingerprint": "ab:cd", "name": HOSTILE, "bytes_total": 1,
             "files": [{"path": "dir[/a]/b", "size": 1}], "default_dir": str(tmp_path)}
    done = {"state": "done", "files": ["dir[/a]/b"], "bytes_total": 1, "dir": str(tmp_path)}
    _fake_node(monkeypatch, {"receive_offer": offer, "receive_accept": done})
    res = run("receive", "7-crossover-eyetooth", "--yes", "--home", home)
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"(calls itself {HOSTILE!r})" in res.stdout
    assert "  dir[/a]/b  1 B" in res.stdout
    assert "\\[" not in res.stdout  # escaping for markup would show as a backslash


def test_root_help_lists_each_command_as_flowing_text() -> None:
    """`node --help` shows each command's first paragraph as one sentence: the line
    breaks of a docstring no longer cut the command list mid-sentence."""
    import typer.main

    group = typer.main.get_command(app)
    ctx = group.make_context("node", [], resilient_parsing=True)
    summaries = {name: group.get_command(ctx, name).short_help
                 for name in group.list_commands(ctx)}
    assert summaries["gui"] == ("Print the address of the running node's dashboard, with its "
                                "token (HOME/gui.token, mode 0600: whoever has the address "
                                "can drive the node).")
    broken = {name: text for name, text in summaries.items() if "\n" in (text or "")}
    assert not broken
    res = run("--help")
    assert res.exit_code == 0
    line = next(x for x in res.stdout.splitlines() if x.startswith("│ gui "))
    assert "token (HOME/gui.token" in line or len(line.rstrip(" │")) > 60, line


# ------------------------------------------------------------------ node start, early checks


def test_start_refuses_a_received_dir_that_is_a_file(home: str, tmp_path: Path) -> None:
    afile = tmp_path / "report.pdf"
    afile.write_text("x")
    res = run("start", "--home", home, "--port", "0", "--received-dir", str(afile))
    assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
    assert res.stderr.splitlines() == [
        f"error: received dir {afile} is not a folder; pick another with --received-dir "
        "(config key received_dir)"]


def test_start_refuses_a_received_dir_it_cannot_write(home: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only (a read-only mount, a folder without write permission): said before the node
    binds anything, naming the flag; as root no mode bit refuses, so the check is faked."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = node.cli._writable
    monkeypatch.setattr(node.cli, "_writable", lambda p: p != ro and real(p))
    res = run("start", "--home", home, "--port", "0", "--received-dir", str(ro))
    assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
    assert res.stderr.splitlines() == [
        f"error: received dir {ro} is not writable (permission denied); pick another with "
        "--received-dir (config key received_dir)"]
    assert not (Path(home) / "daemon.json").exists()


@pytest.mark.parametrize("argv", [["init"], ["id"], ["status"], ["trusted"],
                                  ["folder", "list"]])
def test_a_home_that_is_a_file_is_named(tmp_path: Path, argv: list[str]) -> None:
    afile = tmp_path / "report.pdf"
    afile.write_text("x")
    res = run(*argv, "--home", str(afile))
    assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
    assert res.stderr.splitlines() == [
        f"error: node home {afile} is a file, not a folder; pick another with --home DIR "
        "(or env P2PFS_HOME)"]
    assert afile.read_text() == "x"


@pytest.mark.parametrize(("env", "flags", "says"), [
    ({"P2PFS_TRANSPORT": "tpc"}, [],
     "environment P2PFS_TRANSPORT: key 'transport' must be one of tcp, udp, quic, got 'tpc'"),
    ({"P2PFS_TRANSPORTS": "tcp,qiuc"}, [],
     "environment P2PFS_TRANSPORTS: key 'transports' must be some of tcp, udp, quic "
     "('qiuc' is not one)"),
    ({}, ["--bootstrap-peer", "127.0.0.1"],
     "option --bootstrap-peer: key 'bootstrap_peers' must be HOST:PORT entries "
     "('127.0.0.1' is not one)"),
])
def test_start_names_the_bad_variable_or_flag_and_value(home: str, env: dict[str, str],
                                                        flags: list[str], says: str) -> None:
    """A bad --bootstrap-peer was only a warning in the log, and a bad P2PFS_TRANSPORT
    named neither the variable nor the value."""
    res = runner.invoke(app, ["start", "--home", home, "--port", "0", *flags], env=env)
    assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: {says}"), line


@pytest.mark.parametrize(("expires_s", "shown"), [(30, "30 s"), (600, "10 min")])
@pytest.mark.parametrize("command", ["invite", "send"])
def test_a_short_code_life_is_said_in_seconds(home: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, command: str,
                                              expires_s: int, shown: str) -> None:
    """`--expires 30s` printed "works once, for 0 min"."""
    import time

    def call(home_: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        on_event({"type": "code", "code": "7-crossover-eyetooth",
                  "expires_at": time.time() + expires_s + 0.4})
        raise Cancelled("stopped here")

    monkeypatch.setattr(node.cli, "_call", call)
    src = tmp_path / "f.txt"
    src.write_text("x")
    argv = [command, "--expires", f"{expires_s}s", "--home", home]
    res = run(*(argv if command == "invite" else [*argv, str(src)]))
    assert f"(works once, for {shown})" in res.stdout, res.output


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_during_share_says_the_node_goes_on(home: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   as_json: bool) -> None:
    """Ctrl-C ends the CLI, not the transfer: "interrupted" alone let a user believe the
    send had stopped. It now names the transfer and the command that stops it."""
    def call(home_: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        on_event({**_transfer("running", ""), "type": "progress", "id": "4dbf4696b5ec"})
        raise KeyboardInterrupt

    monkeypatch.setattr(node.cli, "_call", call)
    src = tmp_path / "big.bin"
    src.write_text("x")
    res = run("share", str(src), "--to", "bob", "--home", home, *(["--json"] if as_json else []))
    assert res.exit_code == node.cli.INTERRUPTED_EXIT_CODE, (res.output, res.exception)
    said = ("interrupted: the node goes on sending; `node transfers` shows it, "
            "`node cancel 4dbf4696b5ec` stops it")
    assert said in res.stderr.splitlines()
    if as_json:
        assert _json_error(res.stdout) == {"type": "Interrupted", "message": said,
                                           "exit_code": 130}


def test_the_transfers_table_never_cuts_the_id(home: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{**_transfer("running", "x " * 40), "id": "4dbf4696b5ec", "peer": "bob"}]
    _fake_node(monkeypatch, {"transfers": rows})
    res = runner.invoke(app, ["transfers", "--home", home], env={"COLUMNS": "60"})
    assert res.exit_code == 0, res.output
    assert "4dbf4696b5ec" in res.stdout, res.stdout


@pytest.mark.parametrize(("argv", "says"), [
    (["status", "--json", "--bogus"], "No such option: --bogus"),
    (["folder", "list", "--json", "--bogus"], "No such option: --bogus"),
    (["ping", "--json"], "Missing argument 'peer'."),
    (["staus", "--json"], "No such command 'staus'."),
])
def test_a_usage_error_with_json_is_json_too(argv: list[str], says: str) -> None:
    res = run(*argv)
    assert res.exit_code == 2, res.output
    error = _json_error(res.stdout)
    assert error["type"] == "UsageError" and error["exit_code"] == 2
    assert error["message"].startswith(says), error
    assert res.stdout.count("\n") == 1  # said once, also from a nested group


def test_a_usage_error_without_json_prints_nothing_on_stdout() -> None:
    res = run("status", "--bogus")
    assert res.exit_code == 2 and res.stdout == ""


# ------------------------------------------------------------------ node receive --dir


def _no_receive_call(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []

    def call(home_: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        asked.append(cmd)
        raise AssertionError(f"the node was asked ({cmd}) though --dir cannot be written")

    monkeypatch.setattr(node.cli, "_call", call)
    return asked


def test_receive_into_a_file_is_refused_before_the_code_is_used(
        home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver learnt only after accepting, and the sender was told to send again."""
    asked = _no_receive_call(monkeypatch)
    afile = tmp_path / "report.pdf"
    afile.write_text("x")
    for dest, says in ((afile, f"--dir {afile} is not a folder; pick another folder"),
                       (afile / "sub", f"--dir {afile / 'sub'} is not a folder: {afile} is a "
                                       "file; pick another folder")):
        res = run("receive", "7-crossover-eyetooth", "--yes", "--dir", str(dest),
                  "--home", home)
        assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
        assert res.stderr.splitlines() == [f"error: {says}"]
    assert asked == []


def test_receive_into_a_folder_it_cannot_write_is_refused(
        home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _no_receive_call(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = node.cli._writable
    monkeypatch.setattr(node.cli, "_writable", lambda p: p != ro and real(p))
    res = run("receive", "7-crossover-eyetooth", "--yes", "--dir", str(ro / "new"),
              "--home", home, "--json")
    assert res.exit_code == ConfigError.exit_code, (res.output, res.exception)
    said = f"--dir {ro / 'new'} is not writable (permission denied: {ro}); pick another folder"
    assert res.stderr.splitlines() == [f"error: {said}"]
    assert _json_error(res.stdout)["message"] == said
    assert asked == [] and not (ro / "new").exists()


def test_trust_of_an_unknown_name_says_how_to_name_a_peer(home: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With a node running, `node trust NOPE` said "no trusted peer or alias matches":
    true, and no help to someone who is trying to trust it."""
    from node.errors import UnknownPeer
    from node.trust import no_match_message

    def call(home_: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        assert cmd == "resolve"
        raise UnknownPeer(no_match_message(args["peer"], []))

    monkeypatch.setattr(node.cli, "_call", call)
    res = run("trust", "NOPE", "--home", home)
    assert res.exit_code == UnknownPeer.exit_code, (res.output, res.exception)
    [line] = res.stderr.splitlines()
    assert "no trusted peer" not in line
    assert "matches 'NOPE'; give its full peer id (`node id` on that device" in line
    assert "`node invite` and `node accept CODE`" in line


def test_status_shows_ports_and_servers_as_text(home: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`node status` printed Python reprs: {'tcp': 8471, ...} and ['http://...']."""
    _fake_node(monkeypatch, {"status": {
        "peer_id": "P", "name": "alice", "fingerprint": "f", "host": "127.0.0.1",
        "ports": {"tcp": 8471, "udp": 8472, "quic": 8473, "dht": 8468}, "uptime_s": 7.2,
        "peers_known": 1, "trusted": 0, "dht_contacts": 1, "bootstrap": [], "hosts": []}})
    res = run("status", "--home", home)
    assert res.exit_code == 0, (res.output, res.exception)
    lines = res.stdout.splitlines()
    assert "ports         tcp 8471, udp 8472, quic 8473, dht 8468" in lines
    assert "bootstrap     -" in lines
    assert "{" not in res.stdout and "[" not in res.stdout


def test_list_options_show_what_they_take() -> None:
    """`--bootstrap <list[str]>` told a newcomer a Python type, not that it takes a URL."""
    start = runner.invoke(app, ["start", "--help"], env={"COLUMNS": "200"})
    assert "<list[" not in start.stdout, start.stdout
    for flag, shown in (("--bootstrap", "URL"), ("--bootstrap-peer", "HOST:PORT"),
                        ("--relay", "HOST:PORT"), ("--share", "DIR")):
        assert any(line.split()[1:2] == [flag] and shown in line.split()
                   for line in start.stdout.splitlines()), (flag, start.stdout)
    ping = runner.invoke(app, ["ping", "--help"], env={"COLUMNS": "200"})
    assert "Round trips to measure." in ping.stdout


@pytest.mark.parametrize("ttl_s", [3, 7200])
async def test_an_out_of_range_expires_names_the_option_and_value(ttl_s: int) -> None:
    """`node send --expires 3s` said "--expires must be 5 s to 60 min", not what it got."""
    from node.pairing.service import PairingService

    async def emit(_ev: Any) -> None:
        raise AssertionError("no code is made for a bad --expires")

    with pytest.raises(ConfigError) as caught:  # checked before the service is touched
        await PairingService.exchange_as_inviter(object(), ttl_s=ttl_s, emit=emit)  # type: ignore[arg-type]
    assert str(caught.value) == f"option --expires must be 5 s to 60 min, got {ttl_s} s"


@pytest.mark.parametrize("label", ["bob [/x]", "bob [laptop]"])
def test_a_progress_bar_shows_a_bracketed_label_whole(label: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress bars' description column parsed markup whatever the console said: a
    peer aliased `bob [/x]` crashed `node share` with a MarkupError, `[laptop]` vanished."""
    import io

    from rich.console import Console

    import node.cli

    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    monkeypatch.setattr(node.cli, "err", console)
    with node.cli.transfer_progress(as_json=False) as bar:
        bar.add_task(label, total=10)
    assert label in console.file.getvalue()

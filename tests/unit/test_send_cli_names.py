"""`node receive` / `node send` / `node accept` print names the other side chose: shown as
text, never read as rich markup (a name "[/]" crashed the CLI with a MarkupError
traceback; "[conceal]..." could hide or restyle what the user is asked to accept)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import node.cli as cli
from node.pairing.code import make_code

HOSTILE = "[/]"
HIDING = "[conceal]bob"


def fake_call(name: str):  # type: ignore[no-untyped-def]
    def call(home: Any, cmd: str, args: Any = None, *, on_event: Any = None) -> Any:
        if cmd == "receive_offer":
            return {"session": "s", "peer_id": "P" * 56, "fingerprint": "aaaa:bbbb",
                    "name": name, "files": [{"path": "a.txt", "size": 3}], "bytes_total": 3,
                    "default_dir": "/tmp/received/from-X"}
        if cmd == "receive_accept":
            return {"state": "done", "files": [{"path": "a.txt"}], "bytes_total": 3,
                    "dir": "/tmp/received/from-X"}
        if cmd == "send":
            assert on_event is not None
            on_event({"type": "matched", "fingerprint": "aaaa:bbbb", "name": name})
            return {"files": [{}], "bytes_total": 3, "peer_id": "P" * 56}
        if cmd == "accept":
            return {"peer_id": "P" * 56, "name": name, "fingerprint": "aaaa:bbbb",
                    "verification": "x y z"}
        raise AssertionError(cmd)

    return call


@pytest.mark.parametrize("name", [HOSTILE, HIDING])
def test_peer_chosen_names_are_printed_as_text(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Any, name: str) -> None:
    monkeypatch.setattr(cli, "_call", fake_call(name))
    runner = CliRunner()
    code = str(make_code(7))
    src = tmp_path / "a.txt"
    src.write_text("abc")
    for args in (["receive", code, "--yes"], ["send", str(src)], ["accept", code]):
        res = runner.invoke(cli.app, [*args, "--home", str(tmp_path)])
        assert res.exit_code == 0, (args, res.output, res.exception)
        assert repr(name) in res.output, (args, res.output)


def test_a_strangers_name_in_node_peers_is_text(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Any) -> None:
    row = {"short_id": "ABCDEFG", "alias": "", "name": "[conceal]mallory", "trusted": False,
           "hosts": ["127.0.0.1"], "transports": [], "ports": {}, "online": True,
           "last_seen": 0, "source": "lan"}
    monkeypatch.setattr(cli, "_call", lambda *_a, **_k: [row])
    # the private field: the width setter would leave a fixed width behind when undone
    monkeypatch.setattr(cli.out, "_width", 200)
    res = CliRunner().invoke(cli.app, ["peers", "--home", str(tmp_path)])
    assert res.exit_code == 0 and "[conceal]mallory" in res.output, res.output

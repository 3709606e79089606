"""Pairing with real node processes: `node invite` on one, `node accept CODE` on the
other, then `node ping` works both ways; a wrong code (typed via `node trust CODE`)
fails on both sides and trusts nobody."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id

from node.pairing.code import make_code, parse_code

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pairing")
    with Testnet(root) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["a", "b"])
        yield net


def start_invite(net: Testnet, name: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [*net.node_cmd, "invite", "--json", *args, "--home", str(net.node(name).home)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        proc.wait(10)
        raise AssertionError(f"invite printed no code: {proc.stderr.read() if proc.stderr else ''}")
    event = json.loads(first)["event"]
    assert event["type"] == "code"
    return proc, event["code"]


def finish(proc: subprocess.Popen[str]) -> tuple[int, Any, str]:
    out, err = proc.communicate(timeout=60)
    try:
        payload = json.loads(out) if out.strip() else None
    except ValueError:
        payload = out
    return proc.returncode, payload, err


def trusted(net: Testnet, name: str) -> list[dict[str, Any]]:
    return net.cli(name, "trusted")


def test_wrong_code_fails_on_both_sides_and_trusts_nobody(net: Testnet) -> None:
    proc, code = start_invite(net, "a", "--name", "b")
    try:
        c = parse_code(code)
        wrong = make_code(c.nameplate)
        while wrong.words == c.words:
            wrong = make_code(c.nameplate)
        res = net.cli("b", "trust", str(wrong), json=False, check=False)
        assert res.returncode != 0
        assert "wrong code or someone tried to guess it" in res.stderr
        assert "Traceback" not in res.stderr
        rc, _, err = finish(proc)
        assert rc != 0 and "wrong code or someone tried to guess it" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert trusted(net, "a") == [] and trusted(net, "b") == []
    # the used code is refused clearly
    res = net.cli("b", "accept", code, json=False, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_invite_accept_then_ping_both_ways(net: Testnet) -> None:
    proc, code = start_invite(net, "a", "--name", "b", "--expires", "2m")
    try:
        accepted = net.cli("b", "accept", code, "--name", "a")
        rc, invited, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    assert normalize_peer_id(invited["peer_id"]) == normalize_peer_id(net.peer_id("b"))
    assert normalize_peer_id(accepted["peer_id"]) == normalize_peer_id(net.peer_id("a"))
    assert invited["verification"] == accepted["verification"]
    for me, other in (("a", "b"), ("b", "a")):
        rows = trusted(net, me)
        assert [(normalize_peer_id(r["peer_id"]), r["alias"], r["added_via"]) for r in rows] \
            == [(normalize_peer_id(net.peer_id(other)), other, "invite")]
        ping = net.cli(me, "ping", other, "--count", "2")
        assert len(ping["rtt_ms"]) == 2
        peers = {normalize_peer_id(r["peer_id"]): r for r in net.cli(me, "peers")}
        assert peers[normalize_peer_id(net.peer_id(other))]["added_via"] == "invite"

"""`node events` and `node log` against a real node with long histories: they say when
output was cut and how to page; peers carry one label in every line; stopping the node
while `node events --follow` is attached ends the follower cleanly, with no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet

from node.errors import NodeNotRunning
from node.gossip.log import EventLog
from node.identity import Identity, load_identity
from node.notifications import FileReceived
from node.trust import TrustStore

pytestmark = pytest.mark.slow

NOTES = 1050
CHANGES = 1010
BOB = Identity.generate("bob", seed=b"B" * 32).peer_id


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("paging")
    with Testnet(root) as net:
        h = net.add_node("solo", bootstrap=False, start=False)
        store = TrustStore.in_home(h.home)
        store.trust(BOB, "bob")
        store.close()
        me = load_identity(h.home)
        log = EventLog(h.home / "events.db")
        for i in range(NOTES):
            if i % 2:  # a row as gossip stored it before notifications were typed
                log.notify("transfer_failed", {"event": "ee", "origin": str(BOB),
                                               "path": f"f{i}.txt", "reason": "sync queue full"})
            else:
                log.emit(FileReceived(str(BOB), f"f{i}.txt", i, "ab" * 32))
        for i in range(CHANGES):
            log.append_local(me, kind="created", folder="docs", path=f"p{i}.txt", size=i,
                             hash=bytes(32))
        log.close()
        net.start("solo")
        yield net


def _lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.strip()]


def test_events_say_what_was_cut_and_how_to_page(net: Testnet) -> None:
    recent = net.cli("solo", "events", json=False)
    assert len(_lines(recent)) == 100
    assert f"the newest 100 of {NOTES:,} shown; see the older ones with --since 0" \
        in recent.stderr, recent.stderr
    first = net.cli("solo", "events", "--since", "0", json=False)
    assert len(_lines(first)) == 1000
    assert f"... 1,000 of {NOTES:,} shown; page with --since 1000" in first.stderr
    rest = net.cli("solo", "events", "--since", "1000", json=False)
    assert len(_lines(rest)) == NOTES - 1000 and rest.stderr.strip() == ""
    page = net.cli("solo", "events", "--since", "0", "--limit", "10", "--json", json=False)
    rows = [json.loads(line) for line in _lines(page)]
    assert [r["id"] for r in rows] == list(range(1, 11))
    marker = json.loads(page.stderr.strip().splitlines()[-1])
    assert marker["more"] is True and marker["next_since"] == 10
    assert marker["total"] == NOTES


def test_one_label_per_peer_and_no_holes(net: Testnet) -> None:
    lines = _lines(net.cli("solo", "events", "--since", "0", "--limit", "20", json=False))
    assert len(lines) == 20
    for line in lines:
        assert " bob" in line and BOB.short not in line, line
        assert "None" not in line, line
    assert any("sync queue full" in line for line in lines)


def test_log_says_what_was_cut(net: Testnet) -> None:
    res = net.cli("solo", "log", "--json", json=False)
    assert len(json.loads(res.stdout)) == 1000  # --json: still a plain list of rows
    marker = json.loads(res.stderr.strip().splitlines()[-1])
    assert marker["more"] is True and (marker["shown"], marker["total"]) == (1000, CHANGES)
    assert marker["message"] == (f"... 1,000 of {CHANGES:,} events shown (the newest); "
                                 f"show them all with --limit {CHANGES}")
    rows = net.cli("solo", "log", "--limit", "5")
    assert [r["path"] for r in rows] == [f"p{i}.txt" for i in range(CHANGES - 5, CHANGES)]
    text = net.cli("solo", "log", "--limit", "5", json=False)
    assert f"... 5 of {CHANGES:,} events shown (the newest)" in " ".join(text.stderr.split())
    full = net.cli("solo", "log", "--limit", str(CHANGES), "--json", json=False)
    assert full.returncode == 0 and full.stderr.strip() == ""
    assert len(json.loads(full.stdout)) == CHANGES


def test_stopping_the_node_ends_a_follower_cleanly(net: Testnet) -> None:
    h = net.node("solo")
    with subprocess.Popen(
            [*net.node_cmd, "events", "--follow", "--home", str(h.home)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=net.env,
            cwd=net.root) as follow:
        assert follow.stdout is not None
        assert follow.stdout.readline().strip()  # attached: the backlog arrives
        net.cli("solo", "stop", json=False)
        try:
            _out, err = follow.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            follow.kill()
            raise
        assert follow.returncode == NodeNotRunning.exit_code, err
        assert "the node stopped, so nothing more will come" in err, err
        assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while h.process is not None and h.process.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in (h.node_log, h.log_path):
        text = path.read_text()
        assert "stopped" in text or path == h.log_path
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]

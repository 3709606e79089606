"""`node folder ...` against a real node process: a folder added offline is there when
the node starts; add/pause/resume/remove through the running node take effect in it
and in folders.json at once; refusals are one line; the JSON is the same shape online
and offline."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet

pytestmark = pytest.mark.slow

ROW_KEYS = {"id", "path", "peers", "mode", "label", "paused", "rescan_interval_s",
            "versions_keep_days", "versions_keep_count", "peer_labels", "status"}
STATUS_KEYS = {"id", "state", "local_files", "local_bytes", "global_files", "global_bytes",
               "need_files", "need_bytes", "conflicts", "locally_changed", "locally_changed_names",
               "last_error",
               "last_scan_unix", "completion_pct", "source"}


def _saved(net: Testnet, name: str) -> dict[str, dict]:
    path = net.node(name).home / "folders.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return {f["id"]: f for f in json.loads(path.read_text())["folders"]}


def _shape(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["path"], r["peers"], r["mode"], r["label"], r["paused"])
            for r in rows]


def test_folder_commands_on_a_running_node_and_offline(tmp_path: Path) -> None:
    with Testnet(tmp_path / "net") as net:
        net.add_node("A", bootstrap=False, start=False)
        net.add_node("B", bootstrap=False, start=False)
        b_id = net.peer_id("B")
        net.cli("A", "trust", b_id, "--name", "bob", json=False)
        photos, music, docs = (tmp_path / n for n in ("photos", "music", "docs"))
        for d in (photos, music, docs):
            d.mkdir()
        (music / "song.txt").write_text("la la\n")

        # offline: saved for the next start
        res = net.cli("A", "folder", "add", str(photos), "--id", "photos", "--peer", "bob",
                      json=False)
        assert "applies when the node starts" in res.stderr
        assert set(_saved(net, "A")) == {"photos"}
        net.start("A")

        # the running node loaded it
        rows = net.cli("A", "folder", "list")
        assert [(r["id"], r["path"], r["peers"]) for r in rows] == [
            ("photos", str(photos.resolve()), [b_id])]
        assert set(rows[0]) == ROW_KEYS and set(rows[0]["status"]) == STATUS_KEYS
        assert rows[0]["peer_labels"] == ["bob"]

        # online: takes effect in the node and on disk at once
        row = net.cli("A", "folder", "add", str(music), "--id", "music", "--peer", b_id[:8],
                      "--mode", "receive-only", "--label", "Music")
        assert row["mode"] == "receive-only" and row["peers"] == [b_id]
        assert "music" in _saved(net, "A")
        row = net.cli("A", "folder", "pause", "music")
        assert row["paused"] is True and row["status"]["state"] == "paused"
        assert _saved(net, "A")["music"]["paused"] is True
        assert [r["status"]["state"] for r in net.cli("A", "folder", "list")
                if r["id"] == "music"] == ["paused"]
        assert net.cli("A", "folder", "resume", "music")["paused"] is False
        status = net.cli("A", "folder", "status", "music")
        assert set(status) == ROW_KEYS and status["status"]["state"] != "paused"
        human = net.cli("A", "folder", "status", "music", json=False)
        assert "state" in human.stdout and "receive-only" in human.stdout

        # rescan: done by the engine, or said plainly when this node has none
        res = net.cli("A", "folder", "rescan", "music", json=False, check=False)
        if status["status"]["source"] == "engine":
            assert res.returncode == 0, res.stderr
        else:
            assert res.returncode == 2 and "runs no folder engine" in res.stderr

        # refusals from the running node: one line, nothing changed
        before = _saved(net, "A")
        for args, words in [
            (["--mode", "both"], "use one of: send-receive, send-only, receive-only"),
            (["--peer", net.peer_id("A")], "this node itself"),
        ]:
            res = net.cli("A", "folder", "add", str(docs), "--id", "docs", *args,
                          json=False, check=False)
            assert res.returncode != 0 and words in res.stderr, (args, res.stderr)
            assert "Traceback" not in res.stderr + res.stdout
        res = net.cli("A", "folder", "add", str(net.node("A").home / "received"), "--id", "r",
                      json=False, check=False)
        assert res.returncode == 2 and "received dir" in res.stderr
        res = net.cli("A", "folder", "remove", "nope", json=False, check=False)
        assert res.returncode == 2 and "(folders: music, photos)" in res.stderr
        assert _saved(net, "A") == before

        res = net.cli("A", "folder", "remove", "music", json=False)
        assert "its files stay" in res.stdout
        assert (music / "song.txt").read_text() == "la la\n"
        assert set(_saved(net, "A")) == {"photos"}
        online_rows = net.cli("A", "folder", "list")

        # stopped again: the same folders, the same JSON shape
        net.stop("A")
        rows = net.cli("A", "folder", "list")
        assert _shape(rows) == _shape(online_rows)
        assert set(rows[0]) == ROW_KEYS and set(rows[0]["status"]) == STATUS_KEYS
        res = net.cli("A", "folder", "status", "photos", json=False, check=False)
        assert res.returncode == 5 and "needs a running node" in res.stderr

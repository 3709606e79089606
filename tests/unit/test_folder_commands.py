"""The `folder_*` control commands over a real FolderStore in a temp home and a fake
folder engine (FolderHost): argument checks, what is saved, what the engine is told."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from node.control import ControlServer
from node.errors import ConfigError, LocalIOError, P2PError, PeerNotTrusted, UnknownPeer
from node.folders.commands import (
    FOLDER_COMMANDS,
    STATUS_SOURCE_CONFIG,
    STATUS_SOURCE_ENGINE,
    FolderCommands,
    FolderContext,
    FolderEngineMissing,
    _engine_of,
    register,
)
from node.folders.config import FolderConfig, FolderStore
from node.folders.status import FolderState, FolderStatus
from node.identity import Identity, PeerId
from node.trust import resolve_peer

ROW_KEYS = {"id", "path", "peers", "mode", "label", "paused", "rescan_interval_s",
            "versions_keep_days", "versions_keep_count", "peer_labels", "status"}
STATUS_KEYS = {"id", "state", "local_files", "local_bytes", "global_files", "global_bytes",
               "need_files", "need_bytes", "conflicts", "locally_changed", "locally_changed_names",
               "last_error",
               "last_scan_unix", "completion_pct", "source"}


class FakeHost:
    """A FolderHost that records what it was asked and reports fixed counts."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def config_changed(self) -> None:
        self.calls.append(("config_changed", ""))

    def status(self, cfg: FolderConfig) -> FolderStatus:
        return FolderStatus(id=cfg.id, state=FolderState.PAUSED if cfg.paused
                            else FolderState.SYNCING, local_files=3, local_bytes=300,
                            global_files=4, global_bytes=400, need_files=1, need_bytes=100,
                            conflicts=2)

    async def rescan(self, folder_id: str) -> None:
        self.calls.append(("rescan", folder_id))

    async def override(self, folder_id: str) -> int:
        self.calls.append(("override", folder_id))
        return 7

    async def revert(self, folder_id: str) -> int:
        self.calls.append(("revert", folder_id))
        return 5


class Node:
    def __init__(self, tmp: Path, engine: FakeHost | None) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.share = tmp / "share"  # a one-way --share folder
        self.received = self.home / "received"
        self.me = Identity.generate("me").peer_id
        self.bob = Identity.generate("bob").peer_id
        self.eve = Identity.generate("eve").peer_id  # known, not trusted
        aliases = {self.bob: "bob", self.eve: "eve", self.me: "me"}
        self.trusted = {self.bob}
        self.store = FolderStore.load(self.home)
        self.engine = engine
        ctx = FolderContext(
            home=self.home, received=self.received, self_id=self.me,
            resolve=lambda t: resolve_peer(t, [(p, [a]) for p, a in aliases.items()]),
            is_trusted=lambda p: p in self.trusted,
            label_for=lambda p: aliases.get(p, p.short), share_roots=(self.share,))
        self.cmds = FolderCommands(ctx, lambda: self.store, lambda: self.engine)
        self.server = ControlServer(tmp / "unused.sock")
        self.cmds.register(self.server.register)

    async def call(self, cmd: str, **args: Any) -> Any:
        async def emit(event: dict[str, Any]) -> None:
            return None

        return await self.server.dispatch(cmd, args, emit)

    def saved(self) -> dict[str, Any]:
        return dict(json.loads((self.home / "folders.json").read_text()))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, FakeHost())


@pytest.fixture
def bare(tmp_path: Path) -> Node:
    return Node(tmp_path, None)


def _dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return d


async def test_every_command_is_registered(node: Node) -> None:
    assert set(FOLDER_COMMANDS) <= set(node.server.commands())


async def test_add_saves_a_private_file_resolves_the_path_and_tells_the_engine(
        node: Node, tmp_path: Path) -> None:
    real = _dir(tmp_path, "Photos")
    link = tmp_path / "photos-link"
    link.symlink_to(real)
    row = await node.call("folder_add", path=str(link), id="photos", peers=["bob"],
                          mode="send-only", label=" Family ")
    assert row["path"] == str(real.resolve())  # absolute and symlink-free
    assert row["peers"] == [str(node.bob)] and row["peer_labels"] == ["bob"]
    assert row["mode"] == "send-only" and row["label"] == "Family" and row["live"] is True
    assert node.engine is not None and node.engine.calls == [("config_changed", "")]
    assert stat.S_IMODE(os.stat(node.home / "folders.json").st_mode) == 0o600
    assert [f["id"] for f in node.saved()["folders"]] == ["photos"]
    assert row["status"]["source"] == STATUS_SOURCE_ENGINE
    assert row["status"]["conflicts"] == 2 and row["status"]["completion_pct"] == 75.0
    # the marker that tells this folder from an unmounted disk (node/folders/disk.py)
    assert "folder id photos" in (real / ".p2pfs-folder").read_text()


@pytest.mark.parametrize("args, error, words", [
    ({"id": "bad id!"}, ConfigError, "not valid"),
    ({"id": ""}, ConfigError, "not valid"),
    ({"mode": "sendonly"}, ConfigError, "send-receive, send-only, receive-only"),
    ({"path": "relative/dir"}, ConfigError, "not an absolute path"),
    ({"path": "/nonexistent/p2pfs-test-dir"}, ConfigError, "does not exist"),
    ({"peers": ["eve"]}, PeerNotTrusted, "node trust"),
    ({"peers": ["mallory"]}, UnknownPeer, "trusted peers only"),
    ({"peers": ["me"]}, UnknownPeer, "this node itself"),
    ({"peers": "bob"}, ConfigError, "list"),
    ({"label": "a\nb"}, ConfigError, "control characters"),
    ({"label": "x" * 129}, ConfigError, "at most 128"),
])
async def test_add_refuses_bad_input_and_changes_nothing(
        node: Node, tmp_path: Path, args: dict[str, Any], error: type[P2PError],
        words: str) -> None:
    full = {"path": str(_dir(tmp_path, "docs")), "id": "docs", "peers": ["bob"], **args}
    with pytest.raises(error, match=None) as caught:
        await node.call("folder_add", **full)
    assert words in str(caught.value)
    assert not (node.home / "folders.json").exists()
    assert not (tmp_path / "docs" / ".p2pfs-folder").exists()
    assert node.engine is not None and node.engine.calls == []


async def test_add_refuses_a_file_the_home_and_the_received_dir(node: Node,
                                                                tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        await node.call("folder_add", path=str(f), id="f")
    with pytest.raises(ConfigError, match="contains this node's home"):
        await node.call("folder_add", path=str(tmp_path), id="up")
    with pytest.raises(ConfigError, match="inside this node's home"):
        await node.call("folder_add", path=str(_dir(node.home, "sub")), id="in")
    with pytest.raises(ConfigError, match="received dir"):
        await node.call("folder_add", path=str(_dir(node.received, "bob")), id="recv")
    with pytest.raises(ConfigError, match="overlaps the --share folder"):
        await node.call("folder_add", path=str(_dir(node.share, "sub")), id="sub")
    assert len(node.store) == 0


async def test_add_refuses_an_overlap_and_a_taken_id(node: Node, tmp_path: Path) -> None:
    outer = _dir(tmp_path, "outer")
    await node.call("folder_add", path=str(outer), id="outer")
    with pytest.raises(ConfigError, match="overlaps folder outer"):
        await node.call("folder_add", path=str(_dir(outer, "inner")), id="inner")
    with pytest.raises(ConfigError, match="exists already"):
        await node.call("folder_add", path=str(_dir(tmp_path, "other")), id="outer")
    assert [f["id"] for f in node.saved()["folders"]] == ["outer"]


async def test_pause_resume_remove_persist_and_tell_the_engine(node: Node,
                                                               tmp_path: Path) -> None:
    d = _dir(tmp_path, "music")
    (d / "song.txt").write_text("la")
    await node.call("folder_add", path=str(d), id="music", peers=["bob"])
    row = await node.call("folder_pause", id="music")
    assert row["paused"] is True and row["status"]["state"] == "paused"
    assert node.saved()["folders"][0]["paused"] is True
    row = await node.call("folder_resume", id="music")
    assert row["paused"] is False and node.saved()["folders"][0]["paused"] is False
    row = await node.call("folder_remove", id="music")
    assert row["removed"] is True and row["files_kept"] is True
    assert node.saved()["folders"] == []
    assert (d / "song.txt").read_text() == "la"  # the files stay
    assert node.engine is not None and [c for c, _ in node.engine.calls] == [
        "config_changed"] * 4


async def test_unknown_id_names_the_known_ones(node: Node, tmp_path: Path) -> None:
    await node.call("folder_add", path=str(_dir(tmp_path, "a")), id="alpha")
    for cmd in ("folder_remove", "folder_pause", "folder_resume", "folder_status",
                "folder_rescan", "folder_override", "folder_revert"):
        with pytest.raises(ConfigError, match=r"no folder with id 'beta' \(folders: alpha\)"):
            await node.call(cmd, id="beta")


async def test_rescan_override_revert_reach_the_engine_and_check_the_mode(
        node: Node, tmp_path: Path) -> None:
    await node.call("folder_add", path=str(_dir(tmp_path, "w")), id="web", mode="send-only")
    await node.call("folder_add", path=str(_dir(tmp_path, "b")), id="bak", mode="receive-only")
    await node.call("folder_rescan", id="web")
    assert (await node.call("folder_override", id="web"))["overridden"] == 7
    assert (await node.call("folder_revert", id="bak"))["reverted"] == 5
    with pytest.raises(ConfigError, match="override is for send-only folders"):
        await node.call("folder_override", id="bak")
    with pytest.raises(ConfigError, match="revert is for receive-only folders"):
        await node.call("folder_revert", id="web")
    await node.call("folder_pause", id="web")
    with pytest.raises(ConfigError, match="paused"):
        await node.call("folder_rescan", id="web")
    assert node.engine is not None
    assert [c for c in node.engine.calls if c[0] != "config_changed"] == [
        ("rescan", "web"), ("override", "web"), ("revert", "bak")]


async def test_without_an_engine_status_says_it_comes_from_the_config(
        bare: Node, tmp_path: Path) -> None:
    row = await bare.call("folder_add", path=str(_dir(tmp_path, "d")), id="d")
    assert row["live"] is False
    await bare.call("folder_pause", id="d")
    await bare.call("folder_add", path=str(_dir(tmp_path, "e")), id="e")
    rows = await bare.call("folder_list")
    assert [(r["id"], r["status"]["state"], r["status"]["source"]) for r in rows] == [
        ("d", "paused", STATUS_SOURCE_CONFIG), ("e", "idle", STATUS_SOURCE_CONFIG)]
    await bare.call("folder_add", path=str(_dir(tmp_path, "w")), id="w", mode="send-only")
    await bare.call("folder_add", path=str(_dir(tmp_path, "r")), id="r", mode="receive-only")
    for cmd, fid in (("folder_rescan", "e"), ("folder_override", "w"), ("folder_revert", "r")):
        with pytest.raises(FolderEngineMissing, match="runs no folder engine"):
            await bare.call(cmd, id=fid)


async def test_the_json_shape_is_stable(node: Node, tmp_path: Path) -> None:
    await node.call("folder_add", path=str(_dir(tmp_path, "s")), id="s", peers=["bob"])
    for row in (await node.call("folder_list"))[0], await node.call("folder_status", id="s"):
        assert set(row) == ROW_KEYS
        assert set(row["status"]) == STATUS_KEYS
        json.dumps(row)  # plain JSON, nothing else


async def test_a_broken_folders_file_is_a_clear_config_error(node: Node) -> None:
    (node.home / "folders.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid folders file"):
        await node.call("folder_list")


async def test_a_failed_save_changes_nothing(node: Node, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: FolderStore) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FolderStore, "save", refuse)
    with pytest.raises(LocalIOError, match="No space left"):
        await node.call("folder_add", path=str(_dir(tmp_path, "z")), id="z")
    assert len(node.store) == 0
    assert node.engine is not None and node.engine.calls == []


def test_the_share_folders_dict_is_not_taken_for_an_engine() -> None:
    class Daemon:
        folders: Any = {"docs": Path("/tmp")}  # before the engine: the --share folders

    assert _engine_of(Daemon()) is None
    d = Daemon()
    d.folders = FakeHost()
    assert _engine_of(d) is d.folders


def test_peer_ids_in_rows_parse_back(node: Node) -> None:
    assert PeerId.parse(str(node.bob)) == node.bob


async def test_a_hand_edit_of_the_file_is_read_and_passed_on_to_the_engine(
        node: Node, tmp_path: Path) -> None:
    d = _dir(tmp_path, "h")
    await node.call("folder_add", path=str(d), id="h")
    doc = node.saved()
    doc["folders"][0]["label"] = "by hand"
    path = node.home / "folders.json"
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(1, 1))  # an mtime unlike the one the store saved
    assert node.engine is not None
    node.engine.calls.clear()
    rows = await node.call("folder_list")
    assert rows[0]["label"] == "by hand"
    assert node.engine.calls == [("config_changed", "")]  # its changed() no longer fires
    await node.call("folder_list")
    assert node.engine.calls == [("config_changed", "")]  # nothing new: not told again


async def test_register_uses_the_daemons_store_and_engine(tmp_path: Path) -> None:
    class Trust:
        def is_trusted(self, peer: PeerId) -> bool:
            return False

    class Settings:
        received_path = tmp_path / "home" / "received"
        shared_dirs: list[str] = []

    class Daemon:
        home = tmp_path / "home"
        settings = Settings()
        identity = Identity.generate("me")
        trust = Trust()
        control = ControlServer(tmp_path / "unused.sock")
        folders: Any = {}

        def resolve(self, text: str) -> PeerId:
            raise UnknownPeer(text)

        def label_for(self, peer: PeerId) -> str:
            return peer.short

    Daemon.home.mkdir()
    daemon = Daemon()
    register(daemon)

    async def emit(event: dict[str, Any]) -> None:
        return None

    row = await daemon.control.dispatch("folder_add", {"path": str(_dir(tmp_path, "x")),
                                                       "id": "x"}, emit)
    assert row["live"] is False and row["status"]["source"] == STATUS_SOURCE_CONFIG
    daemon.folder_store = FolderStore.load(daemon.home)  # type: ignore[attr-defined]
    daemon.folders = FakeHost()
    rows = await daemon.control.dispatch("folder_list", {}, emit)
    assert [r["status"]["source"] for r in rows] == [STATUS_SOURCE_ENGINE]
    await daemon.control.dispatch("folder_pause", {"id": "x"}, emit)
    assert daemon.folder_store.require("x").paused is True  # type: ignore[attr-defined]
    assert ("config_changed", "") in daemon.folders.calls

"""Small daemon-side checks of the folders it is given (no node is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

import node.daemon
from node.errors import ConfigError, LocalIOError
from node.fileindex import FileIndex


def test_received_folder_refuses_one_it_cannot_write(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when the daemon is started without the CLI (daemon_main, the testnet harness);
    as root no mode bit refuses, so the access check is faked for that one folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = node.daemon.os.access
    monkeypatch.setattr(node.daemon.os, "access",
                        lambda p, mode: Path(p) != ro and real(p, mode))
    with pytest.raises(ConfigError, match="not writable.*--received-dir"):
        node.daemon.received_folder(ro)
    assert node.daemon.received_folder(tmp_path / "fresh") == tmp_path / "fresh"


def test_an_index_that_cannot_be_opened_names_its_path_once(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    path = afile / "index.db"  # under a file: cannot exist
    with pytest.raises(LocalIOError) as info:
        FileIndex(path)
    assert str(info.value).count(str(path)) == 1, str(info.value)
    assert str(info.value).startswith(f"cannot open file index {path}: ")

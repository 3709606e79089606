"""Every configured path is absolute and symlink-resolved once, when settings are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Settings, absolute_paths, load_settings


def test_relative_home_and_paths_become_absolute(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    (real / "b").mkdir(parents=True)
    (tmp_path / "cwd").symlink_to(real)
    monkeypatch.chdir(tmp_path / "cwd")
    s = load_settings(Path("b"), {"shared_dirs": ["docs"], "received_dir": "b/../inbox"}, env={})
    assert s.home == real / "b"
    assert s.shared_dirs == [str(real / "docs")]
    assert s.received_dir == str(real / "inbox") and s.received_path == real / "inbox"
    # the default received dir follows the (now absolute) home
    assert load_settings(Path("b"), env={}).received_path == real / "b" / "received"


def test_absolute_paths_is_idempotent(tmp_path: Path) -> None:
    s = absolute_paths(Settings(home=tmp_path, shared_dirs=[str(tmp_path / "x")]))
    assert absolute_paths(s) == s

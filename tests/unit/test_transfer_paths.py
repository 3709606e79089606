"""Hostile-path rules: safe_relpath, resolve_under, labels, internal names."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from node.errors import LocalIOError, ProtocolError
from node.transfer.paths import (
    ensure_dirs,
    is_internal_name,
    resolve_under,
    safe_relpath,
    sanitize_label,
)


@pytest.mark.parametrize("text", [
    "a.txt", "dir/sub/file.bin", "ünïcödé/名前.txt", "a b/c-d_e.f", ".hidden", "x" * 255,
    "/".join(["d"] * 64),
])
def test_safe_relpath_accepts_ordinary_names(text: str) -> None:
    assert safe_relpath(text) == PurePosixPath(text)


@pytest.mark.parametrize("text", [
    "", "/etc/passwd", "../x", "a/../../x", "a/..", "./a", "a/./b", "a//b", "a/", "/",
    "a\x00b", "a\nb", "a\x7fb", "a\\b", "..\\..\\x", "C:/x", "c:x",
    "CON", "con.txt", "dir/NUL", "com1", "LPT9.log", "aux.tar.gz", "prn",
    "x" * 256, "d/" * 64 + "f", ("é" * 128),  # 256 bytes
    "trailing.", "trailing ", ".p2pfs-versions/x", ".a.0123456789abcdef.p2pfs-part",
    "dir/x.p2pfs-state",
])
def test_safe_relpath_rejects_hostile_names(text: str) -> None:
    with pytest.raises(ProtocolError):
        safe_relpath(text)


def test_safe_relpath_total_length_bound() -> None:
    ok = "/".join(["a" * 200] * 20)  # 4019 bytes
    safe_relpath(ok)
    with pytest.raises(ProtocolError):
        safe_relpath("/".join(["a" * 250] * 17))


def test_resolve_under_refuses_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(LocalIOError, match="symlink"):
        resolve_under(root, PurePosixPath("link/file"))
    os.symlink(outside / "target", root / "filelink")
    with pytest.raises(LocalIOError, match="symlink"):
        resolve_under(root, PurePosixPath("filelink"))
    (root / "plain").write_text("x")
    with pytest.raises(LocalIOError, match="in the way"):
        resolve_under(root, PurePosixPath("plain/below"))
    assert resolve_under(root, PurePosixPath("new/dir/f")) == root / "new/dir/f"
    with pytest.raises(LocalIOError, match="symlink"):
        ensure_dirs(root, PurePosixPath("link/sub"))
    assert list(outside.iterdir()) == []


def test_sanitize_label() -> None:
    assert sanitize_label("alice", "ABCDEFG") == "alice"
    assert sanitize_label("../../evil", "ABCDEFG") == "_.._evil"
    assert sanitize_label("", "ABCDEFG") == "ABCDEFG"
    assert sanitize_label("CON", "ABCDEFG") == "ABCDEFG"
    assert sanitize_label("a/b\\c", "X") == "a_b_c"
    assert sanitize_label("..", "") == "unknown-peer"
    assert len(sanitize_label("z" * 500, "X")) == 64


def test_internal_names() -> None:
    assert is_internal_name(".report.pdf.0123456789abcdef.p2pfs-part")
    assert is_internal_name(".report.pdf.0123456789abcdef.p2pfs-state")
    assert is_internal_name(".p2pfs-versions")
    assert not is_internal_name("report.pdf")

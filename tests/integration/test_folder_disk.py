"""node/folders/disk.py on a real folder: scan, archive, place, prune, conflict renames."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest

from node.folders import disk
from node.folders.ignore import IgnoreRules
from node.folders.model import FileInfo, FileKind
from node.folders.vector import Vector
from node.pathrules import PathBlocked

ME = "a" * 16


def scan(root: Path, local: dict[str, FileInfo], clock: int = 0
         ) -> tuple[dict[str, FileInfo], list[FileInfo], int]:
    changes, clock = disk.scan(root, local, IgnoreRules(root), device=ME, clock=clock)
    out = dict(local)
    out.update({c.name: c for c in changes})
    return out, changes, clock


def test_scan_records_creates_edits_touches_and_deletes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_bytes(b"one")
    (tmp_path / "empty").mkdir()
    os.symlink("d/f.txt", tmp_path / "inside")
    os.symlink("../../etc/passwd", tmp_path / "outside")
    (tmp_path / "x.swp").write_bytes(b"editor")
    local, changes, clock = scan(tmp_path, {})
    assert sorted(c.name for c in changes) == ["d", "d/f.txt", "empty", "inside"]
    f = local["d/f.txt"]
    assert f.hash == blake3.blake3(b"one").digest() and f.version.get(ME) >= 1
    assert local["inside"].kind is FileKind.SYMLINK and local["inside"].symlink_target == "d/f.txt"
    assert scan(tmp_path, local, clock)[1] == []  # nothing changed: nothing new

    os.utime(tmp_path / "d" / "f.txt", (1, 1))  # a touch: a metadata-only version
    local2, changes, clock = scan(tmp_path, local, clock)
    (touch,) = changes
    assert touch.name == "d/f.txt" and touch.version.dominates(f.version)
    assert touch.hash == f.hash and touch.mtime_ns == 1_000_000_000 and touch.mode == f.mode
    os.chmod(tmp_path / "d" / "f.txt", 0o600)  # a chmod: the same
    local2, changes, clock = scan(tmp_path, local2, clock)
    (chmod,) = changes
    assert chmod.version.dominates(touch.version) and chmod.hash == f.hash
    assert chmod.mode == 0o600
    (tmp_path / "d" / "f.txt").write_bytes(b"two")
    local3, changes, clock = scan(tmp_path, local2, clock)
    (edit,) = changes
    assert edit.version.dominates(f.version) and edit.prev_hash == f.hash
    (tmp_path / "d" / "f.txt").unlink()
    _l, changes, _c = scan(tmp_path, local3, clock)
    (gone,) = changes
    assert gone.deleted and gone.prev_hash == edit.hash and gone.version.dominates(edit.version)


def test_scan_skips_ignored_dirs_and_never_reports_them_deleted(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "o").write_bytes(b"o")
    local, _changes, clock = scan(tmp_path, {})
    assert "build/o" in local
    (tmp_path / ".p2pfsignore").write_text("build/\n")
    _l, changes, _c = scan(tmp_path, local, clock)
    assert changes == []  # ignored now: it stops syncing, it is not "deleted"


def test_archive_place_and_conflict_rename_keep_everything(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"old")
    staged = tmp_path / "staged"
    staged.write_bytes(b"new")
    info = FileInfo("a.txt", FileKind.FILE, 3, 1_700_000_000_000_000_000, 0o4777,
                    blake3.blake3(b"new").digest(), False, Vector.of([(ME, 2)]))
    held = disk.place(tmp_path, info, staged, umask=0o022)
    assert (tmp_path / "a.txt").read_bytes() == b"new"
    assert held.mode == 0o755 and held.mtime_ns == info.mtime_ns  # no setuid, no g/o write
    (version,) = list((tmp_path / ".p2pfs-versions").iterdir())
    assert version.name.startswith("a.txt~") and version.read_bytes() == b"old"
    dest = disk.rename_conflict(tmp_path, "a.txt", "a.sync-conflict-x.txt")
    assert dest.read_bytes() == b"new" and not (tmp_path / "a.txt").exists()


def test_place_refuses_to_write_through_a_symlinked_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "sub")
    staged = tmp_path / "staged"
    staged.write_bytes(b"x")
    info = FileInfo("sub/x", FileKind.FILE, 1, 1, 0o644, blake3.blake3(b"x").digest(), False,
                    Vector.of([(ME, 1)]))
    with pytest.raises(PathBlocked):
        disk.place(root, info, staged, umask=0o022)
    assert list(outside.iterdir()) == []


def test_prune_versions_by_count_and_age(tmp_path: Path) -> None:
    vdir = tmp_path / ".p2pfs-versions" / "d"
    vdir.mkdir(parents=True)
    now = time.time()
    for days_ago in (0, 1, 2, 3, 4, 5, 40):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now - days_ago * 86400))
        (vdir / f"f.txt~{stamp}-000000000").write_bytes(b"v")
    (tmp_path / ".p2pfs-versions" / ".incoming").mkdir()
    (tmp_path / ".p2pfs-versions" / ".incoming" / "x~20000101-000000-000000000").write_bytes(b"")
    assert disk.prune_versions(tmp_path, keep_days=30, keep_count=5, now=now) == 2
    left = sorted(p.name for p in vdir.iterdir())
    assert len(left) == 5  # the 5 newest; the 40-day-old one went by both rules
    assert (tmp_path / ".p2pfs-versions" / ".incoming" / "x~20000101-000000-000000000").exists()
    assert disk.prune_versions(tmp_path, keep_days=2.5, keep_count=0, now=now) == 2


def test_untouched_sees_edits_and_files_made_since_the_scan(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    local, _c, _k = scan(tmp_path, {})
    assert disk.untouched(tmp_path, "a.txt", local["a.txt"])
    assert disk.untouched(tmp_path, "new.txt", None)
    (tmp_path / "new.txt").write_bytes(b"made after the scan")
    assert not disk.untouched(tmp_path, "new.txt", None)  # recorded first, never versioned
    (tmp_path / "a.txt").write_bytes(b"edited after the scan")
    assert not disk.untouched(tmp_path, "a.txt", local["a.txt"])


def test_the_marker_is_written_once_and_never_scanned(tmp_path: Path) -> None:
    from node.folders.ignore import MARKER_FILE_NAME, IgnoreRules

    assert not disk.has_marker(tmp_path)
    disk.write_marker(tmp_path, "docs")
    disk.write_marker(tmp_path, "other")  # kept as it is
    assert disk.has_marker(tmp_path)
    assert "folder id docs" in (tmp_path / MARKER_FILE_NAME).read_text()
    assert sorted(os.listdir(tmp_path)) == [MARKER_FILE_NAME]  # no temporary left
    changes, _clock = disk.scan(tmp_path, {}, IgnoreRules(tmp_path), device="d" * 16, clock=0)
    assert changes == []
    (tmp_path / MARKER_FILE_NAME).unlink()
    (tmp_path / MARKER_FILE_NAME).mkdir()  # a directory of that name is no marker
    assert not disk.has_marker(tmp_path)

"""`.p2pfsignore`: gitignore syntax through pathspec, plus the names always ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.folders.ignore import IGNORE_FILE_NAME, IgnoreRules

PATTERNS = ["# build output", "build/", "*.log", "!keep.log", "/top.txt", "docs/**/*.pdf"]


@pytest.mark.parametrize("rel,is_dir,ignored", [
    ("build", True, True), ("build/x.o", False, True), ("src/build/y", False, True),
    ("build", False, False),  # a file called build: the pattern is for directories
    ("a.log", False, True), ("sub/b.log", False, True), ("keep.log", False, False),
    ("top.txt", False, True), ("sub/top.txt", False, False),
    ("docs/a/b/c.pdf", False, True), ("docs/c.pdf", False, True), ("other/c.pdf", False, False),
    ("# build output", False, False), ("notes.txt", False, False),
])
def test_gitignore_semantics(rel: str, is_dir: bool, ignored: bool) -> None:
    assert IgnoreRules(lines=PATTERNS)(rel, is_dir) is ignored


@pytest.mark.parametrize("rel", [IGNORE_FILE_NAME, ".notes.txt.swp", "a/b~", ".#lock", "4913",
                                 "x.tmp", ".DS_Store", "~$report.docx", ".a.p2pfs-part",
                                 ".p2pfs-versions/a~1", "sub/.p2pfs-versions/x"])
def test_always_ignored(rel: str) -> None:
    assert IgnoreRules(lines=["!*"])(rel)


def test_file_reloads_when_it_changes(tmp_path: Path) -> None:
    now = [0.0]
    rules = IgnoreRules(tmp_path, clock=lambda: now[0])
    assert not rules("a.bin")
    (tmp_path / IGNORE_FILE_NAME).write_text("*.bin\n")
    assert not rules("a.bin")  # checked at most once a second
    now[0] += 2
    assert rules("a.bin")
    (tmp_path / IGNORE_FILE_NAME).write_text("*.bin\n!a.bin\n")
    os.utime(tmp_path / IGNORE_FILE_NAME, ns=(1, 1))
    now[0] += 2
    assert not rules("a.bin") and rules("b.bin")
    (tmp_path / IGNORE_FILE_NAME).unlink()
    now[0] += 2
    assert not rules("b.bin")


def test_oversized_file_is_refused_not_half_read(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE_NAME).write_text("*.bin\n" + "#" * (300 << 10))
    assert not IgnoreRules(tmp_path)("a.bin")


def test_the_folder_marker_is_never_synced_but_only_at_the_root() -> None:
    from node.folders.ignore import MARKER_FILE_NAME

    rules = IgnoreRules(lines=[])
    assert rules(MARKER_FILE_NAME)  # neither scanned, announced, fetched nor served
    assert not rules(f"sub/{MARKER_FILE_NAME}")  # a nested folder's marker is a file

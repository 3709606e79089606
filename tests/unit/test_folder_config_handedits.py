"""folders.json edited by hand: each malformed file is refused with a one-line
FolderConfigError that names the file, and the folders already loaded stay in force
(before: a non-object entry or a huge count was an AttributeError / OverflowError
"internal error", and "paused": "false", NaN, a NUL in a path, a duplicate id, two
overlapping folders or the node's own home were taken as given)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.folders.config import FolderConfig, FolderConfigError, FolderStore


def entry(path: Path, **over: object) -> dict[str, object]:
    return {"id": "a", "path": str(path), **over}


def bad_docs(tmp: Path, home: Path) -> list[tuple[str, str]]:
    f1, f2 = tmp / "f1", tmp / "f2"
    docs: list[tuple[object, str]] = [
        ({"version": 1, "folders": ["x"]}, "must be an object"),
        ({"version": 1, "folders": [None]}, "must be an object"),
        ({"version": 1, "folders": [entry(f1, peers="abc")]}, "'peers'"),
        ({"version": 1, "folders": [entry(f1, peers=["abc"])]}, "entry 'a'"),
        ({"version": 1, "folders": [entry(f1, paused="false")]}, "'paused'"),
        ({"version": 1, "folders": [entry(f1, versions_keep_count=1e300)]},
         "versions_keep_count"),
        ({"version": 1, "folders": [entry(f1, versions_keep_count=2.5)]},
         "versions_keep_count"),
        ({"version": 1, "folders": [entry(f1, rescan_interval_s=True)]}, "rescan_interval_s"),
        ({"version": 1, "folders": [entry(f1, label=5)]}, "'label'"),
        ({"version": 1, "folders": [entry(tmp / "f\x001")]}, "'path'"),
        ({"version": 1, "folders": [entry(f1), entry(f2)]}, "listed twice"),
        ({"version": 1, "folders": [entry(f1), entry(f1 / "sub", id="b")]}, "overlaps folder"),
        ({"version": 1, "folders": [entry(home)]}, "home dir"),
        ({"version": 1, "folders": [entry(home / "x")]}, "home dir"),
        ({"version": 99, "folders": []}, "version 99"),
        ([1, 2], "must be an object"),
    ]
    out = [(json.dumps(d), says) for d, says in docs]
    out.append(('{"version": 1, "folders": [{"id": "a", "path": "/x", '
                '"rescan_interval_s": NaN}]}', "rescan_interval_s"))
    out.append(("[" * 100_000, "not a valid folders file"))
    return out


def test_malformed_files_are_refused_and_change_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = FolderStore(home)
    good = FolderConfig(id="keep", path=tmp_path / "kept")
    store.put(good)
    store.save()
    for text, says in bad_docs(tmp_path, home):
        store.file.write_text(text)
        with pytest.raises(FolderConfigError) as exc:
            store.reload()
        msg = str(exc.value)
        assert says in msg and "\n" not in msg, (text[:120], msg)
        assert list(store) == [good], text[:120]  # the loaded folders stay in force


def test_a_good_hand_edit_still_loads(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = FolderStore(home)
    store.file.write_text(json.dumps({"folders": [
        entry(tmp_path / "f1", paused=True, versions_keep_count=3.0, rescan_interval_s=60)]}))
    store.reload()
    (cfg,) = list(store)
    assert cfg.paused and cfg.versions_keep_count == 3 and cfg.rescan_interval_s == 60.0

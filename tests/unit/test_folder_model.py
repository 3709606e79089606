"""Version vectors, FileInfo, the conflict rules and the pure planner of node/folders."""

from __future__ import annotations

import pytest

from node.errors import ProtocolError
from node.folders.config import FolderMode
from node.folders.model import (
    FileInfo,
    FileKind,
    Resolution,
    conflict_name,
    is_conflict_name,
    pick_global,
    resolve,
)
from node.folders.planner import (
    Adopt,
    Fetch,
    KeepConflict,
    MakeDir,
    Remove,
    SetMeta,
    override_infos,
    plan,
)
from node.folders.vector import Ordering, Vector, VectorError, device_key
from node.identity import Identity

A, B, C = "a" * 16, "b" * 16, "c" * 16


def h(text: str) -> bytes:
    import blake3

    return blake3.blake3(text.encode()).digest()


def fi(name: str, content: str | None, version: dict[str, int], *, mtime: int = 1,
       by: str = A, prev: str | None = None, kind: FileKind = FileKind.FILE) -> FileInfo:
    deleted = content is None
    return FileInfo(name, kind, 0 if deleted or kind is not FileKind.FILE else len(content),
                    mtime * 1_000_000_000, 0o644,
                    b"" if deleted or kind is not FileKind.FILE else h(content), deleted,
                    Vector.of(version.items()), h(prev) if prev else b"", by)


# -- vectors ------------------------------------------------------------------------
def test_vector_compare() -> None:
    v1 = Vector.of([(A, 1)])
    v2 = v1.bump(A)
    v3 = v1.bump(B)
    assert v2.compare(v1) is Ordering.GREATER
    assert v1.compare(v2) is Ordering.LESSER
    assert v2.compare(v3) is Ordering.CONCURRENT
    assert v1.compare(Vector.of([(A, 1), (B, 0)])) is Ordering.EQUAL
    assert v2.merge(v3).dominates(v2) and v2.merge(v3).dominates(v3)


def test_vector_bump_never_goes_back() -> None:
    # we adopted a vector where our counter is 1, but we issued 7 before: next is 8
    assert Vector.of([(A, 1), (B, 4)]).bump(A, clock=7).get(A) == 8


@pytest.mark.parametrize("wire", [[["zz", 1]], [[A, -1]], [[A, 1], [A, 2]], "x", [[A]],
                                  [[A, True]]])
def test_vector_from_wire_refuses(wire: object) -> None:
    with pytest.raises(VectorError):
        Vector.from_wire(wire)


def test_device_key_is_short_and_stable() -> None:
    peer = Identity.generate().peer_id
    assert device_key(peer) == device_key(peer) and len(device_key(peer)) == 16


# -- FileInfo -----------------------------------------------------------------------
def test_fileinfo_wire_roundtrip() -> None:
    f = fi("dir/a.txt", "hello", {A: 3, B: 1}, prev="old")
    assert FileInfo.from_wire(f.to_wire()) == f


@pytest.mark.parametrize("index,value", [(0, "../x"), (0, "/etc/passwd"), (1, "pipe"),
                                         (2, -1), (4, 0o4755), (5, b"short"),
                                         (6, "yes"), (7, []), (9, "me")])
def test_fileinfo_from_wire_refuses(index: int, value: object) -> None:
    wire = fi("a.txt", "x", {A: 1}).to_wire()
    wire[index] = value
    with pytest.raises(ProtocolError):
        FileInfo.from_wire(wire)


def test_deletion_carries_no_content() -> None:
    wire = fi("a", None, {A: 2}).to_wire()
    wire[5] = h("x")
    with pytest.raises(ProtocolError):
        FileInfo.from_wire(wire)


# -- conflict rules ---------------------------------------------------------------------
def test_dominating_remote_replaces_ours() -> None:
    ours = fi("f", "one", {A: 1})
    theirs = fi("f", "two", {A: 1, B: 1}, by=B)
    assert resolve(ours, theirs) is Resolution.TAKE
    assert resolve(theirs, ours) is Resolution.KEEP


def test_concurrent_loser_by_older_mtime() -> None:
    old = fi("f", "old", {A: 2}, mtime=5, by=A)
    new = fi("f", "new", {A: 1, B: 1}, mtime=9, by=B)
    assert pick_global([old, new]) == new
    assert resolve(old, new) is Resolution.CONFLICT
    assert resolve(new, old) is Resolution.KEEP


def test_concurrent_tie_broken_by_device() -> None:
    a = fi("f", "x", {A: 1}, mtime=5, by=A)
    b = fi("f", "y", {B: 1}, mtime=5, by=B)
    assert pick_global([a, b]) == pick_global([b, a]) == b


def test_modify_beats_delete() -> None:
    deleted = fi("f", None, {A: 2}, mtime=9)
    edited = fi("f", "edit", {A: 1, B: 1}, mtime=1, by=B)
    assert pick_global([deleted, edited]) == edited
    assert resolve(deleted, edited) is Resolution.TAKE  # nothing to keep: no conflict


def test_concurrent_built_on_ours_is_no_conflict() -> None:
    ours = fi("f", "base", {B: 1}, mtime=9, by=B)  # e.g. a rescan after a lost index
    theirs = fi("f", "edit", {A: 2}, mtime=1, prev="base")
    assert pick_global([ours, theirs]) == theirs  # despite its older mtime
    assert resolve(ours, theirs) is Resolution.TAKE


def test_same_content_is_adopted() -> None:
    assert resolve(fi("f", "x", {A: 1}), fi("f", "x", {B: 1}, by=B)) is Resolution.ADOPT


def test_conflict_name() -> None:
    f = fi("docs/report.final.txt", "x", {A: 1}, mtime=1_700_000_000, by="0123456789abcdef")
    name = conflict_name(f)
    assert name == "docs/report.final.sync-conflict-20231114-221320-0123456.txt"
    assert is_conflict_name(name)
    assert conflict_name(fi("Makefile", "x", {A: 1}, mtime=0)).startswith(
        "Makefile.sync-conflict-19700101-000000-")
    assert conflict_name(fi(".bashrc", "x", {A: 1}, mtime=0)).startswith(".bashrc.sync-")


# -- planner ------------------------------------------------------------------------------
def test_plan_fetch_from_any_device_with_that_content() -> None:
    g = fi("f", "new", {A: 2}, by=A)
    local = {"f": fi("f", "old", {A: 1})}
    remotes = {A: {"f": g}, C: {"f": g}, B: {"f": fi("f", "old", {A: 1})}}
    p = plan(local, remotes)
    assert p.actions == (Fetch("f", g, (A, C)),)
    assert p.need_files == 1 and p.need_bytes == 3


def test_plan_conflict_renames_ours_then_fetches() -> None:
    ours = fi("f.txt", "mine", {A: 1, B: 1}, mtime=1, by=B)
    theirs = fi("f.txt", "theirs", {A: 2}, mtime=2, by=A)
    p = plan({"f.txt": ours}, {A: {"f.txt": theirs}})
    assert isinstance(p.actions[0], KeepConflict) and p.actions[0].loser == ours
    assert p.actions[1] == Fetch("f.txt", theirs, (A,))
    assert p.conflicts == ("f.txt",)


def test_plan_orders_dirs_and_removals() -> None:
    local = {"d": fi("d", "", {A: 1}, kind=FileKind.DIR),
             "d/x": fi("d/x", "x", {A: 1})}
    remote = {"d": fi("d", None, {A: 2}, kind=FileKind.DIR),
              "d/x": fi("d/x", None, {A: 2}),
              "e": fi("e", "", {A: 1}, kind=FileKind.DIR),
              "e/f": fi("e/f", "", {A: 1}, kind=FileKind.DIR)}
    p = plan(local, {A: remote})
    kinds = [type(a).__name__ + ":" + a.name for a in p.actions]
    assert kinds == ["MakeDir:e", "MakeDir:e/f", "Remove:d/x", "Remove:d"]
    assert isinstance(p.actions[-1], Remove) and p.actions[-1].kind is FileKind.DIR
    assert isinstance(p.actions[0], MakeDir)


def test_plan_ignored_names_are_left_alone() -> None:
    p = plan({}, {A: {"x.tmp": fi("x.tmp", "x", {A: 1}), "y": fi("y", "y", {A: 1})}},
             ignored=lambda n: n.endswith(".tmp"))
    assert [a.name for a in p.actions] == ["y"] and "x.tmp" not in p.global_index


def test_plan_metadata_only_change() -> None:
    ours = fi("f", "x", {A: 1})
    theirs = FileInfo(**{**{s: getattr(ours, s) for s in FileInfo.__slots__},
                         "mode": 0o600, "version": Vector.of([(A, 2)])})
    assert plan({"f": ours}, {A: {"f": theirs}}).actions == (SetMeta("f", theirs),)


def test_the_same_version_held_with_masked_metadata_needs_nothing() -> None:
    # a group-writable 0o664 file is held as 0o644 here (received modes are masked): with
    # the same version that is no change to apply, or every round would chmod it again
    theirs = FileInfo(**{**{s: getattr(fi("f", "x", {A: 2}), s) for s in FileInfo.__slots__},
                         "mode": 0o664})
    ours = FileInfo(**{**{s: getattr(theirs, s) for s in FileInfo.__slots__}, "mode": 0o644})
    assert resolve(ours, theirs) is Resolution.KEEP
    assert plan({"f": ours}, {A: {"f": theirs}}).actions == ()
    # a disk keeping whole seconds holds an older mtime: theirs is then the global
    # version (the newer mtime), and setting its mtime again would never stick
    fine = FileInfo(**{**{s: getattr(ours, s) for s in FileInfo.__slots__},
                       "mtime_ns": ours.mtime_ns + 123_456_789})
    assert plan({"f": ours}, {A: {"f": fine}}).actions == ()


def test_plan_send_only_records_but_does_not_apply() -> None:
    ours = fi("f", "mine", {B: 1}, by=B)
    theirs = fi("f", "theirs", {B: 1, A: 1})
    p = plan({"f": ours}, {A: {"f": theirs}}, mode=FolderMode.SEND_ONLY)
    assert p.actions == () and p.out_of_sync == ("f",)
    pushed = override_infos({"f": ours}, p.global_index, device=B, clock=1, now_ns=5)
    assert len(pushed) == 1 and pushed[0].hash == ours.hash
    assert pushed[0].version.dominates(theirs.version)
    # after the override our version is global again: nothing out of sync
    p2 = plan({"f": pushed[0]}, {A: {"f": theirs}}, mode=FolderMode.SEND_ONLY)
    assert p2.out_of_sync == () and p2.global_index["f"] == pushed[0]


def test_plan_receive_only_keeps_local_edits() -> None:
    ours = fi("f", "local edit", {A: 1}, by=B)
    theirs = fi("f", "global", {A: 2})
    p = plan({"f": ours}, {A: {"f": theirs}}, mode=FolderMode.RECEIVE_ONLY,
             locally_changed={"f"})
    assert p.actions == () and p.locally_changed == ("f",)
    # revert = plan without the locally-changed mark: the global version comes back
    assert plan({"f": ours}, {A: {"f": theirs}}, mode=FolderMode.RECEIVE_ONLY).actions == (
        Fetch("f", theirs, (A,)),)


def test_plan_records_deletion_of_file_we_never_had() -> None:
    gone = fi("f", None, {A: 2})
    assert plan({}, {A: {"f": gone}}).actions == (Adopt("f", gone),)

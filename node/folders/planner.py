"""The pure planner: (local index, remote indexes, mode, ignores) -> global index + actions.

Each device announces its own index (what it holds, one ``FileInfo`` per
name). For every name the planner picks the global version among ours and
every remote device's (``model.pick_global``) and says what this device must
do to hold it:

* ``Fetch``: get a file's content (from ``sources``: the devices that announce
  exactly that content); what we held goes to the versions folder first;
* ``MakeDir`` / ``MakeSymlink``: create them; ``SetMeta``: same content, new
  mtime/mode; ``Adopt``: same content and metadata, only the index changes;
* ``Remove``: the global version is a deletion: ours goes to the versions
  folder (a directory is removed only once empty);
* ``KeepConflict``: ours lost a conflict: it is renamed to its conflict name
  (and becomes a new local file there), then the winner is applied.

Modes: send-only applies nothing that changes the disk (remote versions are
only recorded; ``out_of_sync`` lists them for ``override``); receive-only
leaves names in ``locally_changed`` alone (reported; ``revert`` restores
them). ``override_infos`` is the pure half of ``node folder override``.

Actions come out in an order that is safe to apply one by one: conflict
renames, directories top-down, files and symlinks, file removals, directory
removals bottom-up. Pure: imports the model and the folder config's mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from node.folders.config import FolderMode
from node.folders.model import (
    FileInfo,
    FileKind,
    Resolution,
    conflict_name,
    pick_global,
    resolve,
)


@dataclass(frozen=True, slots=True)
class Fetch:
    name: str
    info: FileInfo
    sources: tuple[str, ...]  # device keys announcing this exact content


@dataclass(frozen=True, slots=True)
class MakeDir:
    name: str
    info: FileInfo


@dataclass(frozen=True, slots=True)
class MakeSymlink:
    name: str
    info: FileInfo


@dataclass(frozen=True, slots=True)
class SetMeta:
    name: str
    info: FileInfo


@dataclass(frozen=True, slots=True)
class Adopt:
    name: str
    info: FileInfo


@dataclass(frozen=True, slots=True)
class Remove:
    name: str
    info: FileInfo  # the deletion to record
    kind: FileKind  # what we hold now (a directory is removed only when empty)


@dataclass(frozen=True, slots=True)
class KeepConflict:
    name: str
    copy_name: str
    loser: FileInfo  # our version, kept under copy_name


Action = Fetch | MakeDir | MakeSymlink | SetMeta | Adopt | Remove | KeepConflict


@dataclass(frozen=True, slots=True)
class Plan:
    global_index: dict[str, FileInfo]
    actions: tuple[Action, ...]
    out_of_sync: tuple[str, ...] = ()  # send-only: remote versions recorded, not applied
    locally_changed: tuple[str, ...] = ()  # receive-only: local edits kept, not sent
    conflicts: tuple[str, ...] = ()  # names whose local version lost a conflict now

    @property
    def need_files(self) -> int:
        return sum(1 for a in self.actions if isinstance(a, (Fetch, MakeDir, MakeSymlink,
                                                             Remove)))

    @property
    def need_bytes(self) -> int:
        return sum(a.info.size for a in self.actions if isinstance(a, Fetch))


def _never(_name: str) -> bool:
    return False


def global_index(local: Mapping[str, FileInfo],
                 remotes: Mapping[str, Mapping[str, FileInfo]],
                 ignored: Callable[[str], bool] = _never) -> dict[str, FileInfo]:
    names = set(local)
    for index in remotes.values():
        names.update(index)
    out: dict[str, FileInfo] = {}
    for name in sorted(names):
        if ignored(name):
            continue
        candidates = [i[name] for i in (local, *remotes.values()) if name in i]
        out[name] = pick_global(candidates)
    return out


def plan(local: Mapping[str, FileInfo], remotes: Mapping[str, Mapping[str, FileInfo]], *,
         mode: FolderMode = FolderMode.SEND_RECEIVE,
         ignored: Callable[[str], bool] = _never,
         locally_changed: AbstractSet[str] = frozenset()) -> Plan:
    """See the module docstring. `remotes` maps a device key to that device's index."""
    glob = global_index(local, remotes, ignored)
    conflicts: list[KeepConflict] = []
    mkdirs: list[MakeDir] = []
    content: list[Action] = []
    rm_files: list[Remove] = []
    rm_dirs: list[Remove] = []
    out_of_sync: list[str] = []
    changed: list[str] = []
    for name, g in glob.items():
        ours = local.get(name)
        if mode is FolderMode.RECEIVE_ONLY and name in locally_changed:
            changed.append(name)
            continue
        how = resolve(ours, g)
        if how is Resolution.KEEP:
            continue
        if how is Resolution.ADOPT:
            assert ours is not None
            if mode is FolderMode.SEND_ONLY or ours.same_metadata(g) or g.deleted:
                content.append(Adopt(name, g))
            else:
                content.append(SetMeta(name, g))
            continue
        if ours is None and g.deleted:
            content.append(Adopt(name, g))  # never had it: record the deletion
            continue
        if mode is FolderMode.SEND_ONLY:
            out_of_sync.append(name)
            continue
        if how is Resolution.CONFLICT:
            assert ours is not None
            conflicts.append(KeepConflict(name, conflict_name(ours), ours))
        if g.deleted:
            assert ours is not None
            if ours.deleted:
                content.append(Adopt(name, g))
            else:
                (rm_dirs if ours.kind is FileKind.DIR else rm_files).append(
                    Remove(name, g, ours.kind))
        elif g.kind is FileKind.DIR:
            mkdirs.append(MakeDir(name, g))
        elif g.kind is FileKind.SYMLINK:
            content.append(MakeSymlink(name, g))
        else:
            sources = tuple(sorted(dev for dev, index in remotes.items()
                                   if (r := index.get(name)) is not None and r.same_content(g)))
            content.append(Fetch(name, g, sources))
    mkdirs.sort(key=lambda a: (a.name.count("/"), a.name))
    rm_dirs.sort(key=lambda a: (-a.name.count("/"), a.name))
    actions: tuple[Action, ...] = (*conflicts, *mkdirs, *content, *rm_files, *rm_dirs)
    return Plan(glob, actions, tuple(out_of_sync), tuple(changed),
                tuple(c.name for c in conflicts))


def override_infos(local: Mapping[str, FileInfo], glob: Mapping[str, FileInfo], *,
                   device: str, clock: int, now_ns: int) -> list[FileInfo]:
    """send-only override: a new version of ours, dominating every version seen, for each
    name where the global version is not ours (a name we do not have: a deletion)."""
    out: list[FileInfo] = []
    for name, g in sorted(glob.items()):
        ours = local.get(name)
        if ours is not None and (ours.version == g.version
                                 or ours.version.dominates(g.version)):
            continue
        if ours is None:
            if g.deleted:
                continue
            merged = g.version.bump(device, clock)
            out.append(replace(g, deleted=True, size=0, hash=b"", symlink_target="",
                               prev_hash=g.hash, version=merged, modified_by=device,
                               mtime_ns=now_ns))
        else:
            merged = ours.version.merge(g.version).bump(device, clock)
            out.append(replace(ours, version=merged, modified_by=device,
                               prev_hash=g.hash if not g.deleted else ours.prev_hash))
        clock = max(clock, merged.get(device))
    return out

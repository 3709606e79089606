"""Random histories on 3 devices, merged in random orders, converge and lose nothing.

A small simulation of the folder engine around the pure planner: each device has
a disk (name -> content), a local index, the last index it heard from each other
device, a versions folder and, for user deletes and overwrites, a "trash" (what
the user destroyed on purpose is not the engine's loss). Users edit, delete and
rename files on random devices while index deliveries (device i's index reaching
device j, which then plans and applies) happen in a random order; a fetch succeeds
only if a source device holds the content right then. Afterwards every device
hears every other until nothing changes, and then:

* every device's disk is the same (names and contents, conflict copies included);
* every content ever written by a user that no user replaced or deleted since (a
  leaf of the history) is on every disk, as the current file or a conflict copy;
* every other content is on some disk, in some versions folder, or in the trash of
  the user who replaced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.folders.model import FileInfo, FileKind
from node.folders.planner import (
    Adopt,
    Fetch,
    KeepConflict,
    MakeDir,
    MakeSymlink,
    Remove,
    SetMeta,
    plan,
)
from node.folders.vector import Vector

DEVICES = ("a" * 16, "b" * 16, "c" * 16)
NAMES = ("x.txt", "y.txt", "z")
QUIESCE_ROUNDS = 12


def digest(content: bytes) -> bytes:
    return blake3.blake3(content).digest()


@dataclass
class Device:
    key: str
    clock: int = 0
    disk: dict[str, bytes] = field(default_factory=dict)
    local: dict[str, FileInfo] = field(default_factory=dict)
    heard: dict[str, dict[str, FileInfo]] = field(default_factory=dict)
    versions: list[bytes] = field(default_factory=list)
    trash: list[bytes] = field(default_factory=list)

    def _new_version(self, name: str) -> Vector:
        base = self.local[name].version if name in self.local else Vector()
        v = base.bump(self.key, self.clock)
        self.clock = v.get(self.key)
        return v

    # -- user actions (what a scan would record) --------------------------------------
    def write(self, name: str, content: bytes, now: int) -> None:
        old = self.disk.get(name)
        if old is not None:
            self.trash.append(old)
        prev = self.local.get(name)
        self.disk[name] = content
        self.local[name] = FileInfo(
            name, FileKind.FILE, len(content), now, 0o644, digest(content), False,
            self._new_version(name),
            prev.hash if prev is not None and not prev.deleted else b"", self.key)

    def delete(self, name: str, now: int) -> None:
        if name not in self.disk:
            return
        self.trash.append(self.disk.pop(name))
        info = self.local[name]
        self.local[name] = replace(info, deleted=True, size=0, hash=b"", prev_hash=info.hash,
                                   version=self._new_version(name), modified_by=self.key,
                                   mtime_ns=now)

    def rename(self, old: str, new: str, now: int) -> None:
        if old not in self.disk or old == new:
            return
        content = self.disk[old]
        self.delete(old, now)
        self.trash.remove(content)  # a rename destroys nothing
        self.write(new, content, now)

    # -- the engine ------------------------------------------------------------------
    def sync(self, devices: dict[str, Device]) -> int:
        """Plan against what we heard and apply; returns the number of actions done."""
        p = plan(self.local, self.heard)
        done = 0
        for action in p.actions:
            if isinstance(action, KeepConflict):
                content = self.disk.pop(action.name)
                self.local.pop(action.name)
                existing = self.disk.get(action.copy_name)
                if existing is not None and existing != content:
                    self.versions.append(existing)
                if existing != content:
                    self.disk[action.copy_name] = content
                    self.local[action.copy_name] = FileInfo(
                        action.copy_name, FileKind.FILE, len(content), action.loser.mtime_ns,
                        0o644, digest(content), False, self._new_version(action.copy_name),
                        b"", self.key)
                done += 1
            elif isinstance(action, Fetch):
                got = None
                for src in action.sources:
                    held = devices[src].disk.get(action.name)
                    if held is not None and digest(held) == action.info.hash:
                        got = held
                        break
                if got is None:
                    continue  # retried at the next sync
                if action.name in self.disk:
                    self.versions.append(self.disk[action.name])
                self.disk[action.name] = got
                self.local[action.name] = action.info
                done += 1
            elif isinstance(action, Remove):
                if action.name in self.disk:
                    self.versions.append(self.disk.pop(action.name))
                self.local[action.name] = action.info
                done += 1
            elif isinstance(action, (Adopt, SetMeta)):
                self.local[action.name] = action.info
                done += 1
            else:
                assert not isinstance(action, (MakeDir, MakeSymlink))
        return done


def deliver(devices: dict[str, Device], src: str, dst: str) -> int:
    if src == dst:
        return 0
    devices[dst].heard[src] = dict(devices[src].local)
    return devices[dst].sync(devices)


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.sampled_from(NAMES),
              st.binary(min_size=0, max_size=3)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from(NAMES), st.just(b"")),
    st.tuples(st.just("rename"), st.integers(0, 2), st.sampled_from(NAMES),
              st.sampled_from(NAMES).map(str.encode)),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2).map(str),
              st.just(b"")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40), st.randoms(use_true_random=False))
def test_random_histories_converge_and_lose_nothing(ops: list, rnd) -> None:
    devices = {k: Device(k) for k in DEVICES}
    written: list[bytes] = []
    now = 1_000_000_000_000
    for kind, who, arg, extra in ops:
        now += 1_000_000_000
        dev = devices[DEVICES[who]]
        if kind == "write":
            # unique content per write, so "no version lost" is checked per write
            content = extra + b"#" + str(len(written)).encode()
            written.append(content)
            dev.write(arg, content, now)
        elif kind == "delete":
            dev.delete(arg, now)
        elif kind == "rename":
            dev.rename(arg, extra.decode(), now)
        else:
            deliver(devices, DEVICES[int(arg)], dev.key)
    # quiesce: everyone hears everyone, in a random order each round, until nothing moves
    pairs = [(s, d) for s in DEVICES for d in DEVICES if s != d]
    for _ in range(QUIESCE_ROUNDS):
        rnd.shuffle(pairs)
        moved = sum(deliver(devices, s, d) for s, d in pairs)
        if not moved:
            break
    else:
        raise AssertionError("no quiescence after "
                             f"{QUIESCE_ROUNDS} rounds: {[d.disk for d in devices.values()]}")
    disks = [d.disk for d in devices.values()]
    assert disks[0] == disks[1] == disks[2]
    everywhere = [c for d in devices.values() for c in (*d.disk.values(), *d.versions,
                                                        *d.trash)]
    lost = [c for c in written if c not in everywhere]
    assert not lost, f"lost {lost}"
    superseded = {c for d in devices.values() for c in d.trash}
    on_disk = set(disks[0].values())
    missing = [c for c in written if c not in superseded and c not in on_disk]
    assert not missing, f"leaf versions only in a versions folder: {missing}"


def test_two_devices_edit_offline_both_versions_survive() -> None:
    devices = {k: Device(k) for k in DEVICES}
    a, b, c = (devices[k] for k in DEVICES)
    a.write("f.txt", b"v1", 1_000_000_000)
    for dst in DEVICES[1:]:
        deliver(devices, a.key, dst)
    assert b.disk == c.disk == {"f.txt": b"v1"}
    b.write("f.txt", b"b-edit", 2_000_000_000)  # b is "offline"
    a.write("f.txt", b"a-edit", 3_000_000_000)
    for _ in range(4):
        for s in DEVICES:
            for d in DEVICES:
                deliver(devices, s, d)
    assert a.disk == b.disk == c.disk
    assert a.disk["f.txt"] == b"a-edit"  # newer mtime wins
    copies = [n for n in a.disk if ".sync-conflict-" in n]
    assert len(copies) == 1 and a.disk[copies[0]] == b"b-edit"
    assert copies[0].startswith("f.sync-conflict-19700101-000002-bbbbbbb") and copies[0].endswith(
        ".txt")

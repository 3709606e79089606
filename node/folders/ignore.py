"""Ignore patterns of a shared folder: ``.p2pfsignore`` in its root, gitignore syntax.

Patterns go through the ``pathspec`` package's gitignore implementation
(``!`` negation, ``**``, ``/`` anchoring, ``#`` comments, a trailing ``/`` for
directories only), so they mean what they mean in a ``.gitignore``. Always
ignored, whatever the file says: the ignore file itself (each device keeps its
own), the node's internal names (partial transfers, resume state, the versions
folder, indexes) and editors' temporary files (``*.swp``, ``*.swx``, ``*~``,
``.#*``, ``4913``, ``*.tmp``, ``.DS_Store``, ``Thumbs.db``, ``~$*``).

The same ``IgnoreRules`` answers for the watcher, the scanner and incoming
changes (a remote version of an ignored name is never applied). The file is
read again when its mtime or size changes, checked at most every
``RELOAD_CHECK_S``.

Imports pathspec, node.pathrules and node.statefiles only.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path, PurePosixPath

import pathspec

from node.pathrules import is_internal_name
from node.statefiles import is_state_name

log = logging.getLogger(__name__)

IGNORE_FILE_NAME = ".p2pfsignore"
# in a folder's root: "this is the folder" (node/folders/disk.py); never synced
MARKER_FILE_NAME = ".p2pfs-folder"
MAX_IGNORE_FILE_BYTES = 256 << 10
RELOAD_CHECK_S = 1.0
MEMO_ENTRIES_MAX = 200_000  # answers remembered until the rules change (then forgotten)
DEFAULT_PATTERNS = (
    "*.swp", "*.swx", "*~", ".#*", "4913", "*.tmp", ".DS_Store", "Thumbs.db", "~$*",
    "*.p2pfs-part", "*.p2pfs-state", "*.p2pfs-index*", ".p2pfs-versions/",
)


def _spec(lines: list[str]) -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines)


_DEFAULTS = _spec(list(DEFAULT_PATTERNS))


class IgnoreRules:
    """See the module docstring. ``rules(rel, is_dir=False)`` -> True when ignored."""

    def __init__(self, root: Path | None = None, *, lines: list[str] | None = None,
                 clock: object = time.monotonic) -> None:
        self.root = root
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._user = _spec(lines or [])
        self.patterns: tuple[str, ...] = tuple(lines or ())
        # (rel, is_dir) -> answer: the scanner, every sync round's plan and every file a
        # peer fetches ask about the same names again and again
        self._memo: dict[tuple[str, bool], bool] = {}
        if root is not None and lines is None:
            self.reload()

    @property
    def file(self) -> Path | None:
        return self.root / IGNORE_FILE_NAME if self.root is not None else None

    def reload(self) -> bool:
        """Read .p2pfsignore again if it changed; True when the rules changed."""
        self._checked_at = self._now()
        path = self.file
        if path is None:
            return False
        try:
            st = os.lstat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        lines: list[str] = []
        if stamp is not None:
            try:
                if st.st_size > MAX_IGNORE_FILE_BYTES:
                    raise OSError(f"larger than {MAX_IGNORE_FILE_BYTES} bytes")
                with open(path, "rb") as f:
                    lines = f.read(MAX_IGNORE_FILE_BYTES).decode("utf-8", "replace").splitlines()
            except OSError as exc:
                log.warning("ignoring %s: %s", path, exc)
        try:
            spec = _spec(lines)
        except (ValueError, TypeError) as exc:  # pathspec's GitWildMatchPatternError
            log.warning("ignoring %s: a pattern is not valid (%s)", path, exc)
            spec, lines = _spec([]), []
        changed = tuple(lines) != self.patterns
        self._user, self.patterns = spec, tuple(lines)
        self._memo = {}
        return changed

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator,no-any-return]

    def _maybe_reload(self) -> None:
        if self.root is not None and self._now() - self._checked_at >= RELOAD_CHECK_S:
            self.reload()

    def __call__(self, rel: str, is_dir: bool = False) -> bool:
        self._maybe_reload()
        key = (rel, is_dir)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._decide(rel, is_dir)
            if len(self._memo) >= MEMO_ENTRIES_MAX:
                self._memo = {}
            self._memo[key] = hit
        return hit

    def _decide(self, rel: str, is_dir: bool) -> bool:
        parts = PurePosixPath(rel).parts
        if not parts:
            return True
        if (rel in (IGNORE_FILE_NAME, MARKER_FILE_NAME)
                or any(is_internal_name(p) for p in parts) or is_state_name(parts[-1])):
            return True
        probe = rel + "/" if is_dir else rel
        if _DEFAULTS.match_file(probe):
            return True
        return bool(self._user.match_file(probe))

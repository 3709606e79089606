"""Hostile-input rules for file names that come from a peer: the one path-validation
module of gossip events, transfers, the watcher and shared folders.

Every relative path in a manifest, a change event or a folder's file info goes
through ``safe_relpath`` (``check_rel_path`` when only the check matters) before
it is used, and every place we write under a received dir or a shared folder
goes through ``resolve_under``, which refuses to walk through a symlink. Also
names the receiver's internal files (partial files, resume state, versions
folder) so the watcher and anyone listing received files can ignore them. A
name a peer could not receive is never announced either (the watcher warns once).

Pure apart from ``lstat`` calls in ``resolve_under``. Imports node.errors only;
it must not import transfers, gossip, folders, the channel, transports or the daemon.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path, PurePosixPath

from node.errors import LocalIOError, ProtocolError

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_PATH_PARTS = 64
MAX_LABEL_BYTES = 64

# receiver-internal names (documented in the README, "File transfers")
PARTIAL_SUFFIX = ".p2pfs-part"
STATE_SUFFIX = ".p2pfs-state"
VERSIONS_DIR_NAME = ".p2pfs-versions"
INTERNAL_NAME_RE = re.compile(r"^\..*\.p2pfs-(part|state)(\.tmp)?$")

_WINDOWS_DEVICE_RE = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)$",
                                re.IGNORECASE)
_LABEL_BAD_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class PathBlocked(LocalIOError):
    """Something on the receiver's disk blocks one file (symlink, folder in the way)."""


def is_internal_name(name: str) -> bool:
    """True for a partial file, resume-state file or the versions folder: never a received file."""
    return (
        name == VERSIONS_DIR_NAME
        or name.endswith((PARTIAL_SUFFIX, STATE_SUFFIX))
        or bool(INTERNAL_NAME_RE.match(name))
    )


def check_name_part(part: str) -> None:
    """Validate one path component; ProtocolError naming the rule it breaks."""
    if part in ("", ".", ".."):
        raise ProtocolError(f"path component {part!r} is not allowed")
    try:
        raw = part.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("path component is not valid UTF-8") from None
    if len(raw) > MAX_NAME_BYTES:
        raise ProtocolError(f"path component longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL_RE.search(part):
        raise ProtocolError("path contains a control character")
    if "\\" in part:
        raise ProtocolError("path contains a backslash")
    if "/" in part:
        raise ProtocolError("path component contains a slash")
    if part.endswith((" ", ".")):
        raise ProtocolError(f"path component {part[:40]!r} ends with a space or dot")
    stem = part.split(".", 1)[0].rstrip(" ")
    if _WINDOWS_DEVICE_RE.match(stem):
        raise ProtocolError(f"path component {part[:40]!r} is a reserved device name")
    if is_internal_name(part):
        raise ProtocolError(f"path component {part[:40]!r} collides with p2pfs internal files")


def safe_relpath(text: str) -> PurePosixPath:
    """Parse a peer-supplied relative posix path, or raise ProtocolError.

    Rejects absolute paths, ``..``/``.``/empty components (so ``a//b`` too),
    NUL and other control characters, backslashes, Windows device names,
    trailing dots/spaces, p2pfs-internal names, components over 255 bytes,
    paths over 4096 bytes and more than 64 components.
    """
    if not isinstance(text, str):
        raise ProtocolError("path must be a string")
    return _safe_relpath(text)


@functools.lru_cache(maxsize=8192)
def _safe_relpath(text: str) -> PurePosixPath:
    """safe_relpath of a str, memoized (a batch checks each path on both sides several
    times); only valid paths are remembered, a refused one raises every time."""
    if not text:
        raise ProtocolError("empty path")
    try:
        total = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError("path is not valid UTF-8") from None
    if total > MAX_PATH_BYTES:
        raise ProtocolError(f"path longer than {MAX_PATH_BYTES} bytes")
    if text.startswith("/"):
        raise ProtocolError("absolute path not allowed")
    if len(text) >= 2 and text[1] == ":":
        raise ProtocolError("drive-letter path not allowed")
    parts = text.split("/")
    if len(parts) > MAX_PATH_PARTS:
        raise ProtocolError(f"path has more than {MAX_PATH_PARTS} components")
    for part in parts:
        check_name_part(part)
    return PurePosixPath(*parts)


def check_rel_path(path: object, what: str = "path", max_bytes: int = MAX_PATH_BYTES) -> str:
    """`path` when it passes ``safe_relpath`` and is at most `max_bytes`, else
    ProtocolError (prefixed with `what`)."""
    if not isinstance(path, str):
        raise ProtocolError(f"{what}: must be text")
    try:
        safe_relpath(path)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    if len(path.encode("utf-8")) > max_bytes:
        raise ProtocolError(f"{what}: longer than {max_bytes} bytes")
    return path


def sanitize_label(name: str, fallback: str) -> str:
    """Folder name for a sender: its name with unsafe characters replaced, else `fallback`."""
    for candidate in (name, fallback, "unknown-peer"):
        label = _LABEL_BAD_CHARS_RE.sub("_", candidate or "").lstrip(".")
        label = label.encode("ascii", "ignore")[:MAX_LABEL_BYTES].decode("ascii").rstrip(". ")
        if not label or label.strip("_") == "":
            continue
        try:
            check_name_part(label)
        except ProtocolError:
            continue
        return label
    return "unknown-peer"


def resolve_under(root: Path, rel: PurePosixPath) -> Path:
    """`root / rel`, refusing (LocalIOError) to pass through an existing symlink below root.

    Components that do not exist yet are fine (the caller creates them with
    ``ensure_dirs``). An existing non-directory in a parent position is refused
    too, so nothing outside `root` is ever reached.
    """
    if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts):
        raise ProtocolError("path escapes its folder")
    current = root
    parts = rel.parts
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            # nothing below a missing component can exist
            return root.joinpath(*parts)
        except OSError as exc:
            raise LocalIOError(f"cannot inspect {current}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise PathBlocked(f"refusing to write through the symlink {current}")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise PathBlocked(f"{current} is in the way: it is not a folder")
    return current


def ensure_dirs(root: Path, rel_dir: PurePosixPath) -> Path:
    """Create `root/rel_dir` one component at a time, never following a symlink."""
    current = root
    for part in rel_dir.parts:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                raise PathBlocked(f"refusing to write through the symlink {current}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise PathBlocked(f"{current} is in the way: it is not a folder") from None
        except OSError as exc:
            raise local_io_error(exc, f"cannot create folder {current}") from None
    return current


def local_io_error(exc: OSError, what: str) -> LocalIOError:
    """Map an OSError to a LocalIOError with a message a person understands."""
    import errno

    reasons = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EIO: "I/O error",
        errno.ENAMETOOLONG: "name too long for this file system",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or exc.__class__.__name__)
    return LocalIOError(f"{what}: {reason}")

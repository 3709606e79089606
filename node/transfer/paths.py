"""The transfer layer's name for node.pathrules (one path-validation module for gossip,
transfers and folders); kept so the transfer modules' imports stay as they are."""

from __future__ import annotations

from node.pathrules import (  # noqa: F401
    INTERNAL_NAME_RE,
    MAX_LABEL_BYTES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_PARTS,
    PARTIAL_SUFFIX,
    STATE_SUFFIX,
    VERSIONS_DIR_NAME,
    PathBlocked,
    check_name_part,
    ensure_dirs,
    is_internal_name,
    local_io_error,
    resolve_under,
    safe_relpath,
    sanitize_label,
)

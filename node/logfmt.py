"""Log formatting that a file name cannot forge: every message is escaped once, here.

A file name may hold a newline, a carriage return, terminal escape sequences
or (not valid UTF-8) lone surrogates. Written as is, ``skipping a\\nINFO ...``
would become a second, forged log line, and a surrogate would make the file
handler fail. ``SafeFormatter`` escapes such characters in the message part of
every record (``\\n``, ``\\x1b``, ``\\udcff``), whatever logger wrote it; a
traceback appended after the message keeps its lines.

Imports nothing of the project.
"""

from __future__ import annotations

import copy
import logging
import re

# C0 and C1 controls, DEL, Unicode line/paragraph separators, lone surrogates
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_for_log(text: str) -> str:
    """`text` with control characters and lone surrogates written as escapes: one line."""
    return _UNSAFE_RE.sub(_escape_char, text)


class SafeFormatter(logging.Formatter):
    """A Formatter whose message part is always one printable line (see module docstring)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        safe = copy.copy(record)
        safe.message = escape_for_log(record.message)
        return super().formatMessage(safe)

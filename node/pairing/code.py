"""Pairing codes: ``<nameplate>-<odd word>-<even word>``, e.g. ``7-crossover-eyetooth``.

The nameplate (a small number the mailbox allocates) says where to meet; the
words carry the secret: two words from the 256-word PGP lists are 16 bits, so
one wrong guess at the PAKE wins with probability 1/65,536 and costs the
attacker the whole attempt (the mailbox forgets the code after one failure).
The whole code, nameplate included, is the SPAKE2 password. Pure: no I/O;
randomness is a parameter. Imports wordlist and errors only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from node.errors import P2PError
from node.pairing.wordlist import EVEN_WORDS, ODD_WORDS

CODE_WORDS = 2
MIN_CODE_WORDS = 2
MAX_CODE_WORDS = 3
MAX_NAMEPLATE = 999_999
MAX_CODE_LEN = 80
_ODD_INDEX = {w: i for i, w in enumerate(ODD_WORDS)}
_EVEN_INDEX = {w: i for i, w in enumerate(EVEN_WORDS)}
_DURATION_RE = re.compile(r"^(\d{1,6})(s|m|h)?$")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, None: 1}

Entropy = Callable[[int], bytes]


class BadCode(P2PError):
    """What was typed is not a pairing code (the message says what is wrong with it)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Code:
    nameplate: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return "-".join([str(self.nameplate), *self.words])

    @property
    def password(self) -> bytes:
        return str(self).encode("ascii")


def choose_words(count: int = CODE_WORDS, entropy: Entropy = os.urandom) -> tuple[str, ...]:
    """`count` words, odd list first and alternating, one random byte each."""
    if not MIN_CODE_WORDS <= count <= MAX_CODE_WORDS:
        raise ValueError(f"a code has {MIN_CODE_WORDS}-{MAX_CODE_WORDS} words")
    raw = entropy(count)
    return tuple((ODD_WORDS if i % 2 == 0 else EVEN_WORDS)[b] for i, b in enumerate(raw))


def make_code(nameplate: int, count: int = CODE_WORDS, entropy: Entropy = os.urandom) -> Code:
    if not 0 < nameplate <= MAX_NAMEPLATE:
        raise ValueError("nameplate out of range")
    return Code(nameplate, choose_words(count, entropy))


def looks_like_code(text: str) -> bool:
    """A cheap test that tells a code from a peer id or alias (`node trust CODE`)."""
    head, sep, rest = text.strip().partition("-")
    return bool(sep) and head.isascii() and head.isdigit() and bool(rest) and rest[0].isalpha()


def parse_code(text: str) -> Code:
    """Parse what a person typed: case and surrounding spaces do not matter, spaces between
    parts may stand for dashes; anything else is a BadCode naming the fault."""
    if not isinstance(text, str) or len(text) > MAX_CODE_LEN:
        raise BadCode(f"a pairing code has at most {MAX_CODE_LEN} characters")
    parts = [p for p in re.split(r"[-\s]+", text.strip().lower()) if p]
    if len(parts) < 1 + MIN_CODE_WORDS:
        raise BadCode(f"{text.strip()!r} is not a pairing code: expected NUMBER-WORD-WORD, "
                      "e.g. 7-crossover-eyetooth")
    head, words = parts[0], parts[1:]
    if not (head.isascii() and head.isdigit()) or not 0 < int(head) <= MAX_NAMEPLATE:
        raise BadCode(f"a pairing code starts with a number (1-{MAX_NAMEPLATE}), "
                      f"not {head!r}")
    if len(words) > MAX_CODE_WORDS:
        raise BadCode(f"a pairing code has {MIN_CODE_WORDS} or {MAX_CODE_WORDS} words "
                      f"after the number, not {len(words)}")
    for i, word in enumerate(words):
        table, other = (_ODD_INDEX, _EVEN_INDEX) if i % 2 == 0 else (_EVEN_INDEX, _ODD_INDEX)
        if word not in table:
            hint = " (words out of order?)" if word in other else ""
            raise BadCode(f"{word!r} is not a code word{hint}; check the spelling")
    return Code(int(head), tuple(words))


def parse_duration_s(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``1h`` -> seconds; BadCode-free: raises ValueError."""
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 10m or 1h")
    return int(m.group(1)) * _DURATION_UNIT_S[m.group(2)]

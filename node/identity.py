"""Node identity: the Ed25519 key pair, PeerId text form, fingerprints, key file.

A PeerId is the 32-byte Ed25519 public key. Its text form is unpadded RFC 4648
base32 of ``pubkey || checksum`` where checksum is 3 bytes of
blake2b(personalised) over the key: 35 bytes -> exactly 56 characters, shown
in 8 groups of 7 (``ABCDEFG-HIJKLMN-...``) like a Syncthing device id. A
mistyped character changes the checksum, so the id is rejected instead of
silently naming someone else.

The key file holds the 32-byte seed and is created with mode 0600 and O_EXCL.
This module imports nothing of the project except errors and statefiles.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.exceptions
import nacl.hash
import nacl.signing
import nacl.utils
from nacl.encoding import RawEncoder

from node.errors import IdentityError
from node.statefiles import private_dir

PUBKEY_LEN_BYTES = 32
CHECKSUM_LEN_BYTES = 3
PEER_ID_TEXT_LEN = 56
GROUP_LEN = 7
PEER_ID_GROUPED_LEN = PEER_ID_TEXT_LEN + PEER_ID_TEXT_LEN // GROUP_LEN - 1  # 63 with dashes
DHT_ID_LEN_BYTES = 20
KEY_FILE_NAME = "identity.key"
KEY_FILE_VERSION = 1
MAX_NAME_LEN = 64

_CHECKSUM_PERSON = b"p2pfs-peerid"
_B32_CHARS = re.compile(r"^[A-Z2-7]*$")


def _checksum(pubkey: bytes) -> bytes:
    return nacl.hash.blake2b(
        pubkey, digest_size=CHECKSUM_LEN_BYTES, person=_CHECKSUM_PERSON, encoder=RawEncoder
    )


def _typed_length(text: str) -> str:
    """How long the id the user typed is, counted the way they typed it."""
    typed = text.strip()
    letters = len(normalize_id_text(typed))
    if "-" in typed:
        return f"this one has {len(typed)} with its dashes ({letters} without)"
    return f"this one has {letters}"


def is_full_length_id(text: str) -> bool:
    """True when `text` has a full peer id's length and alphabet (checksum not checked)."""
    compact = normalize_id_text(text)
    return len(compact) == PEER_ID_TEXT_LEN and bool(_B32_CHARS.match(compact))


def normalize_id_text(text: str) -> str:
    """Upper-case, drop group separators and spaces; does not validate."""
    return re.sub(r"[\s\-]", "", text).upper()


@dataclass(frozen=True, order=True)
class PeerId:
    """A peer's public identity: its Ed25519 public key."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != PUBKEY_LEN_BYTES:
            raise IdentityError("a peer id is a 32-byte Ed25519 public key")

    # -- text form -------------------------------------------------------
    def __str__(self) -> str:
        raw = base64.b32encode(self.key + _checksum(self.key)).decode("ascii")
        return "-".join(raw[i : i + GROUP_LEN] for i in range(0, len(raw), GROUP_LEN))

    @property
    def compact(self) -> str:
        """The 56-character id without separators."""
        return normalize_id_text(str(self))

    @property
    def short(self) -> str:
        """First group: what logs and file names show."""
        return str(self)[:GROUP_LEN]

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse a full peer id; raises IdentityError naming what is wrong."""
        compact = normalize_id_text(text)
        if len(compact) != PEER_ID_TEXT_LEN:
            raise IdentityError(f"a peer id has {PEER_ID_TEXT_LEN} characters (A-Z, 2-7), "
                                f"{PEER_ID_GROUPED_LEN} in the grouped form with dashes; "
                                f"{_typed_length(text)}")
        if not _B32_CHARS.match(compact):
            raise IdentityError("a peer id uses only the letters A-Z and digits 2-7")
        raw = base64.b32decode(compact)
        key, check = raw[:PUBKEY_LEN_BYTES], raw[PUBKEY_LEN_BYTES:]
        if _checksum(key) != check:
            raise IdentityError(f"{text.strip()!r} looks like a full peer id but its checksum "
                                "does not match: a character is mistyped")
        return cls(key)

    @staticmethod
    def looks_like_prefix(text: str) -> bool:
        compact = normalize_id_text(text)
        return 0 < len(compact) <= PEER_ID_TEXT_LEN and bool(_B32_CHARS.match(compact))

    # -- derived values --------------------------------------------------
    @property
    def dht_id(self) -> bytes:
        """Kademlia node id: blake2b(pubkey, 20 bytes). Proves nothing by itself."""
        return dht_id_for(self.key)

    @property
    def fingerprint(self) -> str:
        digest = nacl.hash.blake2b(self.key, digest_size=8, encoder=RawEncoder)
        return ":".join(digest[i : i + 2].hex() for i in range(0, 8, 2))

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when `signature` is this peer's Ed25519 signature of `message`."""
        try:
            nacl.signing.VerifyKey(self.key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


def dht_id_for(pubkey: bytes) -> bytes:
    return nacl.hash.blake2b(pubkey, digest_size=DHT_ID_LEN_BYTES, encoder=RawEncoder)


class Identity:
    """This node's key pair. The seed never leaves this object except to the key file."""

    def __init__(self, signing_key: nacl.signing.SigningKey, name: str = "") -> None:
        self._signing_key = signing_key
        self.name = name
        self.peer_id = PeerId(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls, name: str = "", seed: bytes | None = None) -> Identity:
        seed = seed if seed is not None else nacl.utils.random(32)
        return cls(nacl.signing.SigningKey(seed), validate_name(name))

    @property
    def public_key(self) -> bytes:
        return self.peer_id.key

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return self._signing_key

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:  # never show the seed
        return f"Identity({self.peer_id.short}, name={self.name!r})"

    # -- key file ---------------------------------------------------------
    def save(self, home: Path, *, force: bool = False) -> Path:
        private_dir(home)
        path = home / KEY_FILE_NAME
        if path.exists() and not force:
            raise IdentityError(
                f"an identity already exists in {path} ({load_identity(home).peer_id}); "
                "use --force to replace it (the old peer id is lost)"
            )
        blob = msgpack.packb(
            {"v": KEY_FILE_VERSION, "seed": bytes(self._signing_key), "name": self.name}
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        os.chmod(path, 0o600)
        return path


def validate_name(name: str) -> str:
    name = name.strip()
    if len(name) > MAX_NAME_LEN:
        raise IdentityError(f"a node name has at most {MAX_NAME_LEN} characters")
    if any(ord(c) < 32 or c in "/\\" for c in name):
        raise IdentityError("a node name may not contain control characters or slashes")
    return name


def load_identity(home: Path) -> Identity:
    path = home / KEY_FILE_NAME
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no identity in {home}; create one with `node init`") from None
    if st.st_mode & 0o077:
        raise IdentityError(
            f"{path} is readable by other users (mode {st.st_mode & 0o777:o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        data = msgpack.unpackb(path.read_bytes(), raw=False)
        seed, name = data["seed"], data.get("name", "")
        if data.get("v") != KEY_FILE_VERSION or not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("bad fields")
        if not isinstance(name, str):
            raise ValueError("bad name")
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise IdentityError(f"{path} is not a valid p2pfs key file ({exc})") from None
    return Identity(nacl.signing.SigningKey(seed), name)

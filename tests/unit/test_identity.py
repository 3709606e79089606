from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import IdentityError
from node.identity import PEER_ID_TEXT_LEN, Identity, PeerId, load_identity


def test_peer_id_text_round_trip_and_grouping() -> None:
    ident = Identity.generate("alice")
    text = str(ident.peer_id)
    assert len(text.replace("-", "")) == PEER_ID_TEXT_LEN
    assert all(len(g) == 7 for g in text.split("-"))
    assert PeerId.parse(text) == ident.peer_id
    assert PeerId.parse(text.lower().replace("-", " ")) == ident.peer_id


@given(st.binary(min_size=32, max_size=32), st.integers(0, 55),
       st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"))
def test_single_typo_is_rejected(key: bytes, pos: int, ch: str) -> None:
    compact = PeerId(key).compact
    if compact[pos] == ch:
        return
    typo = compact[:pos] + ch + compact[pos + 1 :]
    with pytest.raises(IdentityError):
        # a typo either breaks the checksum or (in the 2-bit tail) the padding bits
        if PeerId.parse(typo) != PeerId(key):
            raise IdentityError("different key")


@pytest.mark.parametrize("bad", ["", "ABC", "1" * 56, "A" * 55, "Z" * 57])
def test_parse_rejects_malformed(bad: str) -> None:
    with pytest.raises(IdentityError):
        PeerId.parse(bad)


def test_key_file_is_0600_and_not_overwritten(tmp_path) -> None:
    ident = Identity.generate("bob")
    path = ident.save(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_identity(tmp_path).peer_id == ident.peer_id
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate("other").save(tmp_path)
    new = Identity.generate("other")
    new.save(tmp_path, force=True)
    assert load_identity(tmp_path).peer_id == new.peer_id


def test_load_refuses_world_readable_and_garbage(tmp_path) -> None:
    path = Identity.generate().save(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="readable by other users"):
        load_identity(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"\x93garbage")
    with pytest.raises(IdentityError, match="not a valid"):
        load_identity(tmp_path)
    with pytest.raises(IdentityError, match="node init"):
        load_identity(tmp_path / "nope")


def test_sign_verify_and_repr_hides_seed() -> None:
    ident = Identity.generate("carol", seed=b"\x01" * 32)
    sig = ident.sign(b"hello")
    assert ident.peer_id.verify(b"hello", sig)
    assert not ident.peer_id.verify(b"hellO", sig)
    assert not ident.peer_id.verify(b"hello", b"\x00" * 64)
    assert "01010101" not in repr(ident)
    assert len(ident.peer_id.dht_id) == 20


def test_name_validation() -> None:
    with pytest.raises(IdentityError):
        Identity.generate("a/b")
    with pytest.raises(IdentityError):
        Identity.generate("x" * 65)

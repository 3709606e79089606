"""Validation of contact records as DHT values: the one gate every stored or fetched value passes.

A DHT value is only ever the msgpack encoding of a signed ``ContactRecord``,
stored under the DHT id of the key that signed it. ``record_for_key`` decodes a
value (bounded), checks the Ed25519 signature, the expiry and that
``record.peer_id.dht_id == key``, and raises ``ProtocolError`` otherwise; so a
record stored under someone else's id, a tampered record or any other value
(a list, text, an int) is refused at the edge.

Pure: no sockets, no asyncio. Imports only node.contact, node.identity, node.errors.
"""

from __future__ import annotations

import time

from node.contact import MAX_CLOCK_SKEW_S, MAX_RECORD_BYTES, ContactRecord
from node.errors import ProtocolError
from node.identity import DHT_ID_LEN_BYTES

# a DHT value is one encoded contact record
MAX_VALUE_BYTES = MAX_RECORD_BYTES
DHT_KEY_LEN_BYTES = DHT_ID_LEN_BYTES


def check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != DHT_KEY_LEN_BYTES:
        raise ProtocolError(f"a DHT key is {DHT_KEY_LEN_BYTES} bytes")
    return key


def record_for_key(key: bytes, value: object, *, now: float | None = None,
                   allow_expired: bool = False) -> ContactRecord:
    """Decode and verify `value` as the contact record published under `key`.

    Raises ProtocolError unless the value is bytes of at most MAX_VALUE_BYTES that
    decode to a record signed by the key whose DHT id is `key`, current at `now`
    (expiry is not checked with `allow_expired`, the signature always is).
    """
    check_key(key)
    if not isinstance(value, bytes):
        raise ProtocolError(f"a DHT value must be bytes, not {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise ProtocolError(f"a DHT value has at most {MAX_VALUE_BYTES} bytes")
    record = ContactRecord.decode(value)
    if record.peer_id.dht_id != key:
        raise ProtocolError("contact record stored under a key that is not its signer's DHT id")
    if allow_expired:
        check_signature(record, now=now)
    else:
        record.verify(now)
    return record


def check_signature(record: ContactRecord, *, now: float | None = None) -> ContactRecord:
    """Signature and clock checks only (expired records stay useful as addresses)."""
    now_i = int(time.time() if now is None else now)
    if not record.peer_id.verify(record.signed_bytes(), record.signature):
        raise ProtocolError(f"contact record for {record.peer_id.short} has a bad signature")
    if record.timestamp > now_i + MAX_CLOCK_SKEW_S:
        raise ProtocolError("contact record is dated in the future")
    return record

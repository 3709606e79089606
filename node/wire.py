"""Wire format: bounded msgpack codecs, typed messages and length-prefixed framing.

Pure: no sockets, no asyncio. Imports nothing of the project except errors.

* ``packb``/``unpackb``: msgpack with hard limits on every container and string,
  so a hostile peer cannot make us allocate more than the frame it sent.
* ``Message``: every wire message is a small frozen dataclass registered under a
  short type name. ``encode()`` gives ``msgpack([type, v, field1, field2, ...])``
  (a list, so the encoding is canonical and fit to sign); ``decode_message``
  checks the type name, version, arity and each field's type and bounds, and
  raises ``ProtocolError`` for anything else.
* ``FrameDecoder``: turns a byte stream into ``u32 big-endian length || payload``
  frames, refusing frames over ``MAX_FRAME_BYTES`` before buffering them.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union, dataclass_transform

import msgpack

from node.errors import ProtocolError

WIRE_VERSION = 1
# one frame carries at most one transfer chunk (<= 4 MiB) plus headers
MAX_FRAME_BYTES = 8 * 1024 * 1024
FRAME_HEADER = struct.Struct(">I")
MAX_STR_BYTES = 4096
MAX_CONTAINER_ITEMS = 65536


def packb(obj: Any) -> bytes:
    """Canonical msgpack: bin type for bytes, str for text; callers sign lists, not dicts."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Decode untrusted msgpack with every size bounded; ProtocolError on any fault."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("expected bytes")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=min(max_bytes, 1 << 20),
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError(f"malformed msgpack: {exc.__class__.__name__}") from None
    except RecursionError:
        raise ProtocolError("malformed msgpack: nesting too deep") from None


# ---------------------------------------------------------------------------
# typed messages


def bound(
    *, max_len: int | None = None, min_val: int | None = None, max_val: int | None = None
) -> dict[str, int | None]:
    """Field metadata: ``field(metadata=bound(max_len=64))``."""
    return {"max_len": max_len, "min_val": min_val, "max_val": max_val}


class Message:
    """Base of every wire message; subclasses are frozen dataclasses registered with @message."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def fields(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def encode(self) -> bytes:
        return packb([self.TYPE, self.VERSION, *self.fields()])

    def validate(self) -> None:
        """Extra cross-field checks; raise ProtocolError. Called after type checks."""


M = TypeVar("M", bound=Message)
_REGISTRY: dict[str, type[Message]] = {}
_SPECS: dict[type[Message], list[tuple[str, tuple[type, ...], bool, dict[str, Any]]]] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def message(type_name: str, version: int = 1) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a frozen dataclass and register it under `type_name`."""

    def wrap(cls: type[M]) -> type[M]:
        if type_name in _REGISTRY:
            raise RuntimeError(f"message type {type_name!r} registered twice")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.TYPE = type_name
        cls.VERSION = version
        _REGISTRY[type_name] = cls
        _SPECS[cls] = _spec_for(cls)
        return cls

    return wrap


def _spec_for(cls: type[Message]) -> list[tuple[str, tuple[type, ...], bool, dict[str, Any]]]:
    hints = typing.get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        optional = False
        origin = typing.get_origin(hint)
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            allowed = tuple(typing.get_origin(a) or a for a in args)
        else:
            allowed = (origin or hint,)
        if float in allowed:
            allowed = (*allowed, int)
        spec.append((f.name, allowed, optional, dict(f.metadata)))
    return spec


def _check_field(cls_name: str, name: str, value: Any, allowed: tuple[type, ...],
                 optional: bool, meta: dict[str, Any]) -> Any:
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"{cls_name}.{name}: missing")
    # bool is an int in Python; keep them apart on the wire
    if isinstance(value, bool) and bool not in allowed:
        raise ProtocolError(f"{cls_name}.{name}: wrong type bool")
    if tuple in allowed and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, allowed):
        raise ProtocolError(f"{cls_name}.{name}: wrong type {type(value).__name__}")
    max_len = meta.get("max_len")
    if isinstance(value, str):
        limit = max_len if max_len is not None else MAX_STR_BYTES
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise ProtocolError(f"{cls_name}.{name}: longer than {limit} bytes")
    elif isinstance(value, (bytes, list, tuple, dict)):
        if max_len is not None and len(value) > max_len:
            raise ProtocolError(f"{cls_name}.{name}: longer than {max_len}")
    elif isinstance(value, int) and not isinstance(value, bool):
        lo, hi = meta.get("min_val"), meta.get("max_val")
        if lo is None:
            lo = 0  # sizes, counts, sequence numbers: negative is never valid unless allowed
        if value < lo or (hi is not None and value > hi):
            raise ProtocolError(f"{cls_name}.{name}: {value} out of range")
    return value


def build(cls: type[M], values: list[Any] | tuple[Any, ...]) -> M:
    """Construct `cls` from decoded field values, checking arity, types and bounds."""
    spec = _SPECS[cls]
    if len(values) != len(spec):
        raise ProtocolError(f"{cls.TYPE}: expected {len(spec)} fields, got {len(values)}")
    checked = {
        name: _check_field(cls.TYPE, name, v, allowed, optional, meta)
        for (name, allowed, optional, meta), v in zip(spec, values, strict=True)
    }
    try:
        msg = cls(**checked)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{cls.TYPE}: {exc}") from None
    msg.validate()
    return msg


def decode_message(data: bytes, *, expect: tuple[type[M], ...] | None = None,
                   max_bytes: int = MAX_FRAME_BYTES) -> M:
    """Decode one registered message; with `expect`, anything else is a ProtocolError."""
    obj = unpackb(data, max_bytes=max_bytes)
    if not isinstance(obj, list) or len(obj) < 2:
        raise ProtocolError("a message is a list [type, version, fields...]")
    type_name, version = obj[0], obj[1]
    if not isinstance(type_name, str) or type_name not in _REGISTRY:
        raise ProtocolError(f"unknown message type {str(type_name)[:32]!r}")
    cls = _REGISTRY[type_name]
    if expect is not None and cls not in expect:
        names = ", ".join(c.TYPE for c in expect)
        raise ProtocolError(f"unexpected message {type_name!r} (expected {names})")
    if version != cls.VERSION:
        raise ProtocolError(f"{type_name}: unsupported version {version!r}")
    return build(cls, obj[2:])  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# framing


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder of length-prefixed frames. Pure; raises ProtocolError."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"peer announced a {length}-byte frame (limit {self._max})")
            end = FRAME_HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[FRAME_HEADER.size : end]))
            del self._buf[:end]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

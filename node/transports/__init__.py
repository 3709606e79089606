"""Transport registry: maps a transport name to its module, imported lazily.

Each ``node/transports/<name>.py`` exposes ``name``, ``async listen(host, port,
handler) -> Listener`` and ``async connect(host, port, *, timeout=...) -> Pipe``
(see ``base.py``). Importing this package imports no transport, and "quic" maps
to ``quic_lazy.py``, so a node that never uses QUIC never loads a QUIC library,
even while it listens on QUIC. Must not import channel, trust or
anything above the transports.
"""

from __future__ import annotations

import importlib
from typing import cast

from node.errors import ConfigError
from node.transports.base import Transport

TRANSPORT_NAMES: tuple[str, ...] = ("tcp", "udp", "quic")
# the module behind each name: quic_lazy imports qh3 only once QUIC is used
_MODULES = {"tcp": "tcp", "udp": "udp", "quic": "quic_lazy"}


def get_transport(name: str) -> Transport:
    """The transport module called `name`; ConfigError if unknown or not available."""
    if name not in TRANSPORT_NAMES:
        raise ConfigError(
            f"unknown transport {str(name)[:32]!r}; choose one of {', '.join(TRANSPORT_NAMES)}"
        )
    module_name = f"{__name__}.{_MODULES[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"transport {name!r} is not available in this build") from None
        raise ConfigError(f"transport {name!r} cannot be loaded: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"transport {name!r} cannot be loaded: {exc}") from None
    for attr in ("listen", "connect"):
        if not callable(getattr(module, attr, None)):
            raise ConfigError(f"transport {name!r} is incomplete (no {attr}())")
    return cast(Transport, module)


def available_transports() -> tuple[str, ...]:
    """Names whose module imports and exposes listen/connect."""
    names = []
    for name in TRANSPORT_NAMES:
        try:
            get_transport(name)
        except ConfigError:
            continue
        names.append(name)
    return tuple(names)

"""Drop a flooding address's connection attempts in the kernel: a listening socket's filter.

Linux runs a socket's classic BPF filter (SO_ATTACH_FILTER, the program ``tcpdump``
compiles) on every packet that reaches it, and for a listening TCP socket that includes
each SYN and the handshake's last ACK (``tcp_v4_rcv``/``tcp_v6_rcv`` call ``tcp_filter``
before the listener sees the packet). A program that answers 0 for a source address
drops that address's SYNs: its ``connect()`` sees no answer and retries on its own
backoff, and the server process does no accept, no close and no loop turn for it. This
is what bootstrap/server.py uses for an address that keeps flooding after its 429s and
its refusals at accept (bootstrap.limits.Blocklist): the one cost a refused flood still
put on the server's one core.

The programs are built here from a list of source keys (an IPv4 address, an IPv6 /64:
bootstrap.limits.source_key) and attached with ``setsockopt``; attaching again replaces
the program atomically. Unprivileged (a process may filter its own sockets). Accepted
sockets inherit the program the listener had at that moment, and it lets through every
packet of an address that was not blocked then. Nothing here is available off Linux:
``supported()`` says so and the server then keeps refusing at accept.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import socket
import struct
import sys
from collections.abc import Sequence

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_ST = 0x02  # BPF_ST: A into scratch word k
_LD_MEM = 0x00 | 0x00 | 0x60  # BPF_LD | BPF_W | BPF_MEM: scratch word k into A
_INSN_BYTES = 8
# offsets from the network header (SKF_NET_OFF): a TCP socket's filter sees the packet
# from its TCP header on, the addresses are reached through the network header
_SKF_NET_OFF = -0x100000
_IPV4_SRC_OFF = 12
_IPV6_SRC_OFF = 8
_DROP = 0
_ACCEPT = 0xFFFFFFFF  # the whole packet
# the kernel's limit on a classic program (BPF_MAXINSNS)
MAX_INSTRUCTIONS = 4096


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _load(offset: int) -> bytes:
    return _insn(_LD_W_ABS, 0, 0, _SKF_NET_OFF + offset)


# an IPv6 source's two words are loaded from the packet once into scratch memory and
# compared from there: each packet load through SKF_NET_OFF is a helper call the kernel
# charges to the socket's option memory (~160 bytes a /64 that way, so 64 blocked /64s
# overflowed a default net.core.optmem_max of 20,480 on kernels before 6.9)
_IPV6_PRELUDE = (_load(_IPV6_SRC_OFF), _insn(_ST, 0, 0, 0),
                 _load(_IPV6_SRC_OFF + 4), _insn(_ST, 0, 0, 1))


def sources_of(family: int, sources: Sequence[str]) -> tuple[str, ...]:
    """The sources a socket of ``family`` can see: IPv6 /64s (they hold a ":") for
    AF_INET6, IPv4 addresses for any other."""
    v6 = family == socket.AF_INET6
    return tuple(s for s in sources if (":" in s) == v6)


@functools.lru_cache(maxsize=4096)
def _fragment(family: int, source: str) -> bytes:
    """The instructions that drop ``source``'s packets (after the family's prelude), a
    source of that family; ValueError for one that is not a source."""
    if family == socket.AF_INET:
        # equal: fall through to "drop"; else skip it
        return (_insn(_JEQ_K, 0, 1, int(ipaddress.IPv4Address(source)))
                + _insn(_RET_K, 0, 0, _DROP))
    net = ipaddress.IPv6Network(source, strict=False)
    if net.prefixlen != 64:
        raise ValueError(f"{source}: an IPv6 source is a /64")
    prefix = net.network_address.packed
    high, low = (int.from_bytes(prefix[i:i + 4], "big") for i in (0, 4))
    return (_insn(_LD_MEM, 0, 0, 0) + _insn(_JEQ_K, 0, 3, high)
            + _insn(_LD_MEM, 0, 0, 1) + _insn(_JEQ_K, 0, 1, low)
            + _insn(_RET_K, 0, 0, _DROP))


def drop_program(family: int, sources: Sequence[str]) -> bytes:
    """A classic BPF program (struct sock_filter[]) for a listening socket of ``family``
    that drops packets from each of ``sources`` (IPv4 addresses for AF_INET, IPv6 /64
    networks for AF_INET6; those of the other family are left out) and accepts every
    other packet.

    Raises ValueError for a family without filters, a source that is not an address or
    network, or a program longer than the kernel takes."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"no source filter for address family {family}")
    body = b"".join(_fragment(family, source) for source in sources_of(family, sources))
    prelude = b""
    if body:
        prelude = _load(_IPV4_SRC_OFF) if family == socket.AF_INET else b"".join(_IPV6_PRELUDE)
    program = prelude + body + _insn(_RET_K, 0, 0, _ACCEPT)
    count = len(program) // _INSN_BYTES
    if count > MAX_INSTRUCTIONS:
        raise ValueError(f"{len(sources)} sources make a {count}-instruction filter "
                         f"(the kernel takes {MAX_INSTRUCTIONS})")
    return program


def supported() -> bool:
    return sys.platform.startswith("linux")


def attach(sock: socket.socket, program: bytes) -> None:
    """Install ``program`` on ``sock`` (replacing its previous one); OSError if refused.
    ENOMEM is retried once after removing the old program: a replacement is charged
    old + new against net.core.optmem_max until the old one is freed (a blocked address
    meanwhile reaches accept() and is refused there, as before its block)."""
    code = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: native
    # alignment pads the pointer; the kernel copies the program before this returns
    fprog = struct.pack("HP", len(program) // _INSN_BYTES, ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        detach(sock)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # it had none
            raise


def block(sock: socket.socket, sources: Sequence[str]) -> None:
    """Drop ``sources`` (those of the socket's family) at ``sock``; none: no filter."""
    program = drop_program(sock.family, sources)
    if len(program) > _INSN_BYTES:
        attach(sock, program)
    else:
        detach(sock)

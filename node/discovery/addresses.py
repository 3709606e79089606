"""This host's interface addresses, and which of them a contact record advertises.

A node listening on a wildcard (``0.0.0.0`` or ``::``) must never write the
wildcard into its record: a peer dialing ``0.0.0.0`` reaches its *own* node.
Instead the record carries the interface addresses, loopback ones only when
nothing else exists.

IPv4 interfaces (with netmask, for directed broadcast) come from
``socket.if_nameindex`` plus the SIOCGIFADDR/SIOCGIFNETMASK ioctls, IPv6 ones
from /proc/net/if_inet6 (Linux). No third-party package is needed.

Pure except ``interfaces()``; imports nothing of the project.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

ANY_V4 = "0.0.0.0"  # the IPv4 wildcard: listen on every interface, never advertise
WILDCARDS = (ANY_V4, "::", "")
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
IF_INET6_PATH = Path("/proc/net/if_inet6")
ROUTE_PATH = Path("/proc/net/route")
MAX_ADVERTISED_HOSTS = 8


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    address: str
    netmask: str = ""  # IPv4 only

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.address)

    @property
    def broadcast(self) -> str | None:
        """The directed broadcast address of an IPv4 interface (None for /31, /32, IPv6)."""
        if not self.netmask or self.ip.version != 4:
            return None
        net = ipaddress.IPv4Network(f"{self.address}/{self.netmask}", strict=False)
        if net.prefixlen >= 31:
            return None
        return str(net.broadcast_address)


def _ipv4_ioctl(sock: socket.socket, name: str, request: int) -> str | None:
    try:
        packed = fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
    except OSError:  # no IPv4 address on this interface
        return None
    return socket.inet_ntoa(packed[20:24])


def interfaces() -> list[Interface]:
    """Every configured address of every interface that is present (IPv4, then IPv6)."""
    out: list[Interface] = []
    try:
        names = [name for _idx, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            addr = _ipv4_ioctl(sock, name, SIOCGIFADDR)
            if addr is not None:
                mask = _ipv4_ioctl(sock, name, SIOCGIFNETMASK) or ""
                out.append(Interface(name, addr, mask))
    try:
        lines = IF_INET6_PATH.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and len(parts[0]) == 32:
            addr = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
            out.append(Interface(parts[5], addr))
    return out


def default_route_interfaces(text: str | None = None) -> set[str]:
    """Names of the interfaces that carry an IPv4 default route (/proc/net/route)."""
    if text is None:
        try:
            text = ROUTE_PATH.read_text()
        except OSError:
            return set()
    out = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[1] == "00000000" and parts[7] == "00000000":
            out.add(parts[0])
    return out


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def _rank(iface: Interface, default_ifaces: set[str]) -> tuple[int, int, int]:
    ip = iface.ip
    # global/private before link-local; IPv4 before IPv6 (most LANs); the interface of
    # the default route before others (a container bridge is rarely what peers reach)
    if ip.is_loopback:
        scope = 3
    elif ip.is_link_local:
        scope = 2
    else:
        scope = 0
    return (scope, 0 if ip.version == 4 else 1, 0 if iface.name in default_ifaces else 1)


def advertised_hosts(listen_host: str, advertise_host: str, ifaces: list[Interface],
                     default_ifaces: set[str] | None = None) -> list[str]:
    """The hosts a record advertises: the explicit ``advertise_host``; else the listen
    host when it is a real address; else (wildcard) the interface addresses of the
    wildcard's family (``::`` covers both), loopback only when nothing else exists,
    IPv6 link-local never (useless without a scope id). Dialers try hosts[0] first,
    so the default route's interface leads (``default_ifaces``, from /proc/net/route
    when not given)."""
    if advertise_host and not is_wildcard(advertise_host):
        return [advertise_host]
    if not is_wildcard(listen_host):
        return [listen_host]
    routed = default_route_interfaces() if default_ifaces is None else default_ifaces
    v4_only = listen_host == ANY_V4
    usable = [i for i in ifaces if not (v4_only and i.ip.version != 4)
              and not (i.ip.version == 6 and i.ip.is_link_local)]
    others = [i for i in usable if not i.ip.is_loopback]
    if others:
        chosen = sorted(others, key=lambda i: _rank(i, routed))
    else:
        chosen = [i for i in usable if i.ip.is_loopback]
    hosts: list[str] = []
    for iface in chosen:
        if iface.address not in hosts:
            hosts.append(iface.address)
    return hosts[:MAX_ADVERTISED_HOSTS] or ["127.0.0.1"]

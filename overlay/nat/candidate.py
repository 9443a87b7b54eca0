"""Transport addresses and path candidates, with the compact binary form discovery messages carry.

An address is the plain ``(host, port)`` tuple asyncio's datagram API uses; IPv6 hosts are kept in
canonical compressed text so that the same endpoint always compares equal (the traversal state
machine keys its tables on these tuples).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from overlay.hostport import parse_hostport

Addr = tuple[str, int]

# Candidate kinds, in the order a probe round visits them. Predicted ports go first: against a
# sequential symmetric NAT both sides must spend their next NAT ports on each other's predicted
# ports before any other new destination, or the predicted windows no longer line up.
PREDICTED = "predicted"
SRFLX = "srflx"  # server-reflexive: the address STUN saw
MAGIC = "magic"  # a fixed, configured (forwarded) public port
LAN = "lan"  # a local interface address of the peer
PEER = "peer"  # peer-reflexive: learned from an authenticated ping or pong
KINDS = (PREDICTED, SRFLX, MAGIC, LAN, PEER)
_KIND_CODE = {k: i + 1 for i, k in enumerate(KINDS)}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}

# Private ranges: a path over one of them is preferred in a near-tie (``traversal``). Not CGNAT's
# 100.64.0.0/10 (RFC 6598): that is the carrier's network (or another VPN's), not this site.
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10")
)


class AddressError(ValueError):
    """An address or candidate could not be parsed or is not a valid unicast transport address."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A remote transport address worth probing, and where it came from."""

    addr: Addr
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _KIND_CODE:
            raise AddressError(f"unknown candidate kind {self.kind!r}")


def normalize(addr: Addr) -> Addr:
    """Canonical ``(host, port)``: validated, IPv6 compressed, IPv4-mapped IPv6 folded to IPv4."""
    try:
        host, port = addr[0], int(addr[1])
        ip = ipaddress.ip_address(host)
    except (TypeError, ValueError, IndexError) as e:
        raise AddressError(f"bad address {addr!r}") from e
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 < port < 65536:
        raise AddressError(f"bad port in {addr!r}")
    return (str(ip), port)


def is_lan(addr: Addr) -> bool:
    """True for RFC 1918, link-local and ULA addresses: a path that may stay on site. CGNAT
    addresses (100.64.0.0/10) are not: they are the carrier's (or another VPN's) network."""
    ip = ipaddress.ip_address(addr[0])
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


def is_ipv6(addr: Addr) -> bool:
    return ":" in addr[0]


def format_addr(addr: Addr) -> str:
    """``host:port``, or ``[host]:port`` for IPv6 (how addresses are shown and sent as text)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> Addr:
    """The inverse of ``format_addr`` (a bare ``v6addr:port`` is accepted too), normalized."""
    try:
        return normalize(parse_hostport(text))
    except ValueError as e:
        raise AddressError(f"bad address {text!r}") from e


def is_global_ipv6(host: str) -> bool:
    """An IPv6 address worth offering as a path to peers elsewhere: not link-local, ULA (fc00::/7:
    never routed between sites), deprecated site-local, loopback, multicast, unspecified or
    IPv4-mapped. Documentation space (2001:db8::/32) counts as global (the lab uses it)."""
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified
                or ip in _ULA or ip.ipv4_mapped is not None or ip.is_site_local)


_ULA = ipaddress.ip_network("fc00::/7")


def pack_addr(addr: Addr) -> bytes:
    """family (4 or 6) | port (2, big endian) | address (4 or 16)."""
    host, port = addr
    if ":" in host:
        return struct.pack("!BH", 6, port) + socket.inet_pton(socket.AF_INET6, host)
    return struct.pack("!BH", 4, port) + socket.inet_pton(socket.AF_INET, host)


def unpack_addr(data: bytes, offset: int) -> tuple[Addr, int]:
    """Parse one packed address at ``offset``; returns it and the offset just past it."""
    if offset + 3 > len(data):
        raise AddressError("truncated address")
    family, port = struct.unpack_from("!BH", data, offset)
    offset += 3
    if family == 4:
        n, af = 4, socket.AF_INET
    elif family == 6:
        n, af = 16, socket.AF_INET6
    else:
        raise AddressError(f"bad address family {family}")
    if offset + n > len(data):
        raise AddressError("truncated address")
    if port == 0:
        raise AddressError("port 0")
    host = socket.inet_ntop(af, bytes(data[offset : offset + n]))
    return normalize((host, port)), offset + n


def pack_candidate(c: Candidate) -> bytes:
    return bytes((_KIND_CODE[c.kind],)) + pack_addr(c.addr)


def unpack_candidate(data: bytes, offset: int) -> tuple[Candidate, int]:
    if offset >= len(data):
        raise AddressError("truncated candidate")
    kind = _CODE_KIND.get(data[offset])
    if kind is None:
        raise AddressError(f"bad candidate kind {data[offset]}")
    addr, offset = unpack_addr(data, offset + 1)
    return Candidate(addr, kind), offset

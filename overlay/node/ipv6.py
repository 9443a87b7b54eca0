"""The node's IPv6 side: its global addresses (path candidates) and its IPv6 UDP socket.

IPv6 only ever carries the outer (encrypted) packets: peers still talk inner IPv4 between
virtual IPs. A node offers its global IPv6 addresses as candidates so that two nodes with IPv6
go direct even when both IPv4 NATs are hard (home routers do not NAT IPv6; their stateful
firewall lets a flow in once the inside sent to it, which ordinary punching does).

Which addresses: global unicast only (``candidate.is_global_ipv6``), never link-local, ULA or
deprecated / tentative ones, temporary (privacy) addresses first since the kernel sends from them,
at most ``MAX_ADDRESSES``. ULA is left out on purpose: a ULA is not routed between sites, and two
nodes of one site already meet over their IPv4 LAN addresses, so a ULA probe would only spend the
probe budget. A host without IPv6 (or without a global address) offers none and logs nothing.
"""

from __future__ import annotations

import logging
import socket

from overlay.io.udp import bind_udp
from overlay.nat.candidate import is_global_ipv6

log = logging.getLogger("overlay.dataplane")

MAX_ADDRESSES = 3
"""IPv6 interface addresses offered at most (the server takes 16 candidates per node in all)."""
IF_INET6 = "/proc/net/if_inet6"
_TEMPORARY, _DADFAILED, _DEPRECATED, _TENTATIVE = 0x01, 0x08, 0x20, 0x40


def parse_if_inet6(text: str, exclude_ifaces: tuple[str, ...] = ()) -> list[str]:
    """Global IPv6 addresses from ``/proc/net/if_inet6`` text (address, ifindex, prefix length,
    scope, flags, interface name per line, hex), temporary ones first, in canonical text."""
    temporary, stable = [], []
    for line in text.splitlines():
        f = line.split()
        if len(f) != 6 or len(f[0]) != 32 or f[5] == "lo" or f[5] in exclude_ifaces:
            continue
        try:
            flags = int(f[4], 16)
            packed = bytes.fromhex(f[0])
        except ValueError:
            continue
        if flags & (_DADFAILED | _DEPRECATED | _TENTATIVE):
            continue
        host = socket.inet_ntop(socket.AF_INET6, packed)
        if not is_global_ipv6(host):
            continue
        (temporary if flags & _TEMPORARY else stable).append(host)
    out: list[str] = []
    for host in temporary + stable:
        if host not in out:
            out.append(host)
    return out


def global_addresses(exclude_ifaces: tuple[str, ...] = ()) -> list[str]:
    """This host's global IPv6 addresses (none where IPv6 is off or the file is missing)."""
    try:
        with open(IF_INET6) as f:
            text = f.read()
    except OSError:
        return []
    return parse_if_inet6(text, exclude_ifaces)[:MAX_ADDRESSES]


def open_udp6(port: int) -> socket.socket | None:
    """An IPv6-only UDP socket on ``port`` (the IPv4 socket's number) or, if that is taken, any
    port; None where the host has no IPv6 (quietly: an ordinary host, not an error)."""
    for p in dict.fromkeys((port, 0)):
        try:
            return bind_udp("::", p)
        except OSError as e:
            log.debug("no IPv6 UDP socket on port %d: %s", p, e)
    return None

"""Which member may reach which destination through this gateway node: its approved routes.

The server hands each member the routes its network's owner approved; on the gateway, each
approved route maps to the virtual IPs of the members of the networks where it is approved.
``permits`` is asked per packet (the userspace gateway, and a TUN/TAP gateway's kernel interface
before it lets the kernel forward a packet), so it works on packed addresses and integers.
"""

from __future__ import annotations

import ipaddress
import socket


class ApprovedRoutes:
    __slots__ = ("routes", "_nets")

    def __init__(self) -> None:
        self.routes: list[tuple[ipaddress.IPv4Network, frozenset[str]]] = []
        self._nets: list[tuple[int, int, frozenset[bytes]]] = []    # (network, mask, member IPs packed)

    def set(self, routes: list[tuple[str, set[str]]]) -> None:
        """(approved route, member virtual IPs it serves) pairs."""
        self.routes = [(ipaddress.IPv4Network(r), frozenset(ips)) for r, ips in routes]
        self._nets = [(int(n.network_address), int(n.netmask), frozenset(socket.inet_aton(i) for i in ips))
                      for n, ips in self.routes]

    def __bool__(self) -> bool:
        return bool(self._nets)

    def prefixes(self) -> list[str]:
        return [str(n) for n, _ in self.routes]

    def permits(self, src: bytes, dst: bytes) -> bool:
        """May the member ``src`` reach ``dst`` (both packed) through us?"""
        d = int.from_bytes(dst, "big")
        for net, mask, members in self._nets:
            if d & mask == net and src in members:
                return True
        return False

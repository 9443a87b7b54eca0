"""Where this node can be reached: the candidates it publishes for its peers to probe.

``interface_addresses`` reads the host's IPv4 interfaces; ``gather`` (sans-I/O) orders what the
data plane knows into the candidate list: the server-reflexive address first, the router's port
mapping, IPv6 addresses, LAN addresses, the "magic" fixed port and predicted ports, never an
address that leads into our own tunnel, at most 16.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable

from overlay.nat.classify import NatReport

PREDICTED_PORTS = 8
MAX_CANDIDATES = 16
"""The server takes 16 candidates per node."""


def interface_addresses(exclude_ifaces: tuple[str, ...] = (),
                        exclude_net: ipaddress.IPv4Network | None = None) -> list[str]:
    """IPv4 addresses of this host's interfaces that are up (loopback excluded), except those of
    ``exclude_ifaces`` and inside ``exclude_net``: the overlay's own interface and pool must never
    be offered as a path (that would be a tunnel inside the tunnel)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name == "lo" or name in exclude_ifaces:
                continue
            try:
                res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            addr = socket.inet_ntoa(res[20:24])
            if exclude_net is not None and ipaddress.IPv4Address(addr) in exclude_net:
                continue
            out.append(addr)
    return out


def gather(port: int, lan: list[str], *, srflx: tuple[str, int] | None, nat: NatReport | None,
           mapped: tuple[str, int] | None, magic_port: bool, ipv6: list[dict],
           inside: Callable[[str], bool], parse: Callable[[str], tuple]) -> list[dict]:
    """The candidates, best first. ``port``: our UDP port; ``lan``: our interface addresses;
    ``mapped``: the router's usable mapping of our port; ``magic_port``: the port was fixed by
    configuration (worth offering on the public address); ``ipv6``: our IPv6 candidates;
    ``inside(host)``: the address leads into our own tunnel; ``parse``: candidate text to address."""
    cands = [{"addr": f"{a}:{port}", "kind": "lan"} for a in lan[:6]]
    if srflx:
        cands.insert(0, {"addr": f"{srflx[0]}:{srflx[1]}", "kind": "srflx"})
        if mapped is not None:
            # the router forwards this port to us (PCP, NAT-PMP or UPnP): reachable from anywhere
            cands.insert(1, {"addr": f"{mapped[0]}:{mapped[1]}", "kind": "magic"})
        if port and magic_port and srflx[1] != port:
            # the "magic" port: a router forwarding this UDP port to us makes it reachable
            cands.append({"addr": f"{srflx[0]}:{port}", "kind": "magic"})
        if nat is not None and nat.predictable:
            for p in nat.gap_ports() + nat.predicted_ports(PREDICTED_PORTS):
                cands.append({"addr": f"{srflx[0]}:{p}", "kind": "predicted"})
    at = (1 + (mapped is not None)) if srflx else 0
    cands[at:at] = ipv6
    seen, unique = set(), []
    for c in cands:
        if c["addr"] not in seen and not inside(parse(c["addr"])[0]):
            seen.add(c["addr"])     # (never an address that leads into our own tunnel)
            unique.append(c)
    return unique[:MAX_CANDIDATES]

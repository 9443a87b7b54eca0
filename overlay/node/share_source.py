"""Which loopback address a share's connection to the local service comes from: one per peer.

A userspace node carries a peer's connection to a shared port over its own socket to
127.0.0.1:PORT. Bound to 127.0.0.1 every peer would look the same to the service; so the socket
is bound first to a loopback address that stands for the peer's virtual IP, and ``overlay whois``
maps it back. Sans-I/O: two pure functions of the server's address pool.

The rule keeps the virtual IP's last three bytes: 100.B.C.D becomes 127.B.C.D (with the default
pool 100.64.0.0/10, B is 64..127). A pool that starts on a X.0.0.0 boundary (a custom pool such as
10.0.0.0/16) would give 127.0.0.1 for its first host, so there the upper half of 127.0.0.0/8 is
used instead: 10.B.C.D becomes 127.(128+B).C.D.

- Bijective over the pool's hosts (network and broadcast addresses excluded): within an aligned
  pool of /8 or narrower the last three bytes tell the address apart.
- Never 127.0.0.0, 127.0.0.1 or 127.255.255.255: a pool not on a X.0.0.0 boundary has a network
  address whose last three bytes are at least the pool's size (4 or more), so its hosts map above
  127.0.0.4; one on that boundary and /9 or narrower maps to 127.128.0.1 .. 127.255.255.254.
- Pools wider than /9 (and narrower than 4 addresses) have no per-peer mapping: their
  connections come from 127.0.0.1, as do those of addresses outside the pool (a host behind a
  gateway member, a static WireGuard peer).
"""

from __future__ import annotations

import ipaddress

LOOPBACK = 0x7F000000
LOW = 0xFFFFFF
UPPER_HALF = 0x800000


def mappable(pool: ipaddress.IPv4Network | None) -> bool:
    """Whether ``pool`` has a per-peer loopback mapping (/9 to /30)."""
    return pool is not None and 9 <= pool.prefixlen <= 30


def _shift(pool: ipaddress.IPv4Network) -> int:
    return UPPER_HALF if int(pool.network_address) & LOW == 0 else 0


def _host(pool: ipaddress.IPv4Network, ip: int) -> bool:
    return int(pool.network_address) < ip < int(pool.broadcast_address)


def loopback_for(vip: str, pool: ipaddress.IPv4Network | None) -> str | None:
    """The loopback address a share's connection from the peer ``vip`` comes from; None: none
    (then 127.0.0.1)."""
    if not mappable(pool):
        return None
    try:
        ip = int(ipaddress.IPv4Address(vip))
    except ValueError:
        return None
    if not _host(pool, ip):
        return None
    return str(ipaddress.IPv4Address(LOOPBACK | ((ip & LOW) + _shift(pool))))


def vip_for(loopback: str, pool: ipaddress.IPv4Network | None) -> str | None:
    """The virtual IP a loopback address from ``loopback_for`` stands for; None: no peer's."""
    if not mappable(pool):
        return None
    try:
        lb = int(ipaddress.IPv4Address(loopback))
    except ValueError:
        return None
    if lb & ~LOW & 0xFFFFFFFF != LOOPBACK:
        return None
    low = (lb & LOW) - _shift(pool)
    if low < 0:
        return None
    ip = (int(pool.network_address) & ~LOW & 0xFFFFFFFF) | low
    return str(ipaddress.IPv4Address(ip)) if _host(pool, ip) else None

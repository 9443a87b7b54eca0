"""Which outer addresses lead into this node's own tunnel: none of them may ever carry a path.

A node with a TUN/TAP device routes into it the pool, the device's own prefix and every prefix it
installed for a peer (members' approved gateway routes, static peers' allowed IPs). An outer
(encrypted) datagram sent to an address there enters the tunnel itself: it comes out of the
device, is encrypted and sent to the same address again, larger, and so on, millions of packets a
second. A path "confirmed" that way is easy to get: the discovery ping and pong also travel through
the tunnel (a gateway's LAN address inside its approved route; a hostile member offering its own
virtual IP). Three layers keep outer packets out of the device:

1. Known prefixes (``inside``, sans-I/O): the pool, the device's prefix and the routes the node
   sends into the device. Candidates there are refused where they arrive (``nat.traversal``
   asks ``blocked``), never advertised (``DataPlane.local_candidates``); discovery messages from
   such a source are dropped and WireGuard roaming to one is undone (``DataPlane``).
2. The kernel's own route (``blocked``, TUN/TAP mode): for any other address, the source address
   the kernel picks toward it (``connect()`` of a UDP socket: ``DataPlane._local_toward``); when
   that is the device's address, the route leaves through the device (an administrator's route,
   a default route through the overlay). Why ``connect()`` and not a netlink ``route get``
   (pyroute2) or a bound socket: it runs the kernel's full route lookup (policy rules included)
   in about 10 us on the loop's thread, where pyroute2 takes ~0.3 ms on the netlink worker
   thread, and the addresses come from peers (each CallMeMaybe brings up to 64); the source
   names the device because a route through it takes its source from the device's address.
   ``SO_BINDTODEVICE`` on the outer socket would pin it to one uplink, wrong for a multi-homed host
   (LAN and WAN, IPv6 on another link, another VPN): refusing the addresses routed into our device
   keeps every other interface usable. Verdicts are cached per host for ``CACHE_TTL`` seconds and
   forgotten when the prefixes change.
3. Evidence (``own_outer_destination``, ``caught``): an IPv4 UDP packet from our outer port that
   comes out of our device is one of our own outer datagrams in the tunnel (only our socket sends
   from that port): the interface drops it (so no loop ever amplifies) and its destination host is
   refused for ``CAUGHT_FOR`` seconds; paths to it fall back. Two byte compares per UDP packet read
   from the device. This also covers what layers 1-2 cannot see (a route through the device with a
   foreign ``src``). IPv6 outer packets cannot loop: inner traffic is IPv4, the device drops the rest.

When the prefixes change or an address is caught, ``on_change`` runs: the data plane then drops
the candidates and paths that became blocked (``PeerPath.drop_blocked``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

Addr = tuple[str, int]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

CACHE_TTL = 30.0
CACHE_MAX = 1024
CAUGHT_FOR = 600.0
CAUGHT_MAX = 256


class TunnelGuard:
    """Answers "would an outer datagram to this address enter our own tunnel?" (see the module doc).

    ``clock``: the time in seconds (the loop's); ``source_toward(addr)``: the local address the
    kernel sends from toward ``addr``, or None (called only once a device address is set)."""

    def __init__(self, clock: Callable[[], float], source_toward: Callable[[Addr], str | None] | None = None):
        self._clock = clock
        self._source_toward = source_toward
        self.on_change: Callable[[], None] = lambda: None
        self._pool: tuple[Net, ...] = ()
        self._device: tuple[Net, ...] = ()
        self._routes: tuple[Net, ...] = ()
        self._nets: tuple[Net, ...] = ()
        self._device_addrs: frozenset[str] = frozenset()
        self._cache: dict[str, tuple[bool, float]] = {}
        self._caught: dict[str, float] = {}
        self.stats = {"refused": 0, "caught": 0, "kernel_route": 0}

    # ------------------------------------------------------------------ configuration
    def set_pool(self, pool: Net | None) -> None:
        self._set(pool=(pool,) if pool is not None else ())

    def set_device(self, addresses: Iterable[str], prefixes: Iterable[Net]) -> None:
        """The overlay device's addresses and prefixes (TUN/TAP mode); turns on layer 2."""
        addrs = frozenset(addresses)
        changed = addrs != self._device_addrs
        self._device_addrs = addrs
        self._set(device=tuple(prefixes), force=changed)

    def set_routes(self, prefixes: Iterable[Net]) -> None:
        """The prefixes the node routes into its device for peers (outside the pool)."""
        self._set(routes=tuple(prefixes))

    def _set(self, pool=None, device=None, routes=None, force: bool = False) -> None:
        old = self._nets
        if pool is not None:
            self._pool = pool
        if device is not None:
            self._device = device
        if routes is not None:
            self._routes = routes
        self._nets = tuple(dict.fromkeys(self._pool + self._device + self._routes))
        if self._nets != old or force:
            self._cache.clear()
            self.on_change()

    @property
    def nets(self) -> tuple[Net, ...]:
        return self._nets

    # ------------------------------------------------------------------ questions
    def inside(self, host: str) -> bool:
        """``host`` lies in the pool, the device's prefix or a route into the device (layer 1)."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in n for n in self._nets if n.version == ip.version)

    def blocked(self, addr: Addr) -> bool:
        """An outer datagram to ``addr`` would enter our tunnel (layers 1-3); counted."""
        host = addr[0]
        if self.inside(host) or self._caught_now(host) or self._routed_into_device(addr):
            self.stats["refused"] += 1
            return True
        return False

    def _caught_now(self, host: str) -> bool:
        until = self._caught.get(host)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._caught[host]
        return False

    def _routed_into_device(self, addr: Addr) -> bool:
        if not self._device_addrs or self._source_toward is None:
            return False
        now = self._clock()
        hit = self._cache.get(addr[0])
        if hit is not None and hit[1] > now:
            return hit[0]
        into = self._source_toward(addr) in self._device_addrs
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[addr[0]] = (into, now + CACHE_TTL)
        if into:
            self.stats["kernel_route"] += 1
        return into

    # ------------------------------------------------------------------ evidence
    def caught(self, host: str) -> bool:
        """One of our outer datagrams to ``host`` came out of our device (layer 3): refuse that
        host for ``CAUGHT_FOR`` seconds. True if it was not refused already (then ``on_change``)."""
        if self._caught_now(host):
            return False
        if len(self._caught) >= CAUGHT_MAX:
            del self._caught[next(iter(self._caught))]
        self._caught[host] = self._clock() + CAUGHT_FOR
        self.stats["caught"] += 1
        self.on_change()
        return True

    def summary(self) -> dict:
        return {**self.stats, "prefixes": [str(n) for n in self._nets], "caught_hosts": sorted(self._caught)}


def own_outer_destination(packet: bytes, port: int) -> Addr | None:
    """The destination of ``packet`` if it is an IPv4 UDP datagram (first fragment) from our outer
    ``port``: one of our own outer datagrams, read back from the overlay device."""
    if len(packet) < 28 or packet[9] != 17 or packet[6] & 0x1F or packet[7]:
        return None
    ihl = (packet[0] & 15) << 2
    if len(packet) < ihl + 4 or packet[ihl] != port >> 8 or packet[ihl + 1] != port & 255:
        return None
    return (f"{packet[16]}.{packet[17]}.{packet[18]}.{packet[19]}", (packet[ihl + 2] << 8) | packet[ihl + 3])

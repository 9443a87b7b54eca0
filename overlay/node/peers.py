"""The data plane's peer table: who the peers are, which addresses each speaks for, where a packet
goes (cryptokey routing), and the cap on group traffic (broadcast, multicast, non-IP frames).

Members come from the control plane (``update``) and carry a ``PeerPath`` (discovery); static
WireGuard peers come from the configuration (``add_static``) and have none. Outbound, an inner
packet goes to the peer owning its destination (``by_vip``), else to the longest matching route
(members' approved gateway routes, static peers' allowed IPs; an online peer first); inbound, a
peer may only send from the addresses it owns (``PeerEntry.allows``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import NamedTuple

from overlay.control.messages import CAP_NO_INNER_CHECKSUM
from overlay.iface.ethernet import L2_PREFIX
from overlay.nat.candidate import format_addr
from overlay.nat.disco import DiscoCodec
from overlay.nat.traversal import PeerPath, TraversalConfig
from overlay.node.state import Peer
from overlay.tokenbucket import TokenBucket
from overlay.wire.device import Device

GROUP_RATE = 200.0
"""Broadcast, multicast and non-IP Ethernet frames a node may send, and accept from each peer, per
second (ZeroTier caps the same traffic with its multicastLimit): mDNS, SSDP and game discovery
need a few a second; more is a flood that would reach every member of every network."""
GROUP_BURST = 400.0


class RelayAddr(NamedTuple):
    """The endpoint "through the relay, to this peer" (opaque to the WireGuard device)."""
    key: bytes


def fmt_endpoint(addr) -> str:
    return "relay" if isinstance(addr, RelayAddr) else format_addr(addr)


class PeerEntry:
    """A peer: an overlay member (``path`` drives discovery) or a static WireGuard peer (no path)."""

    __slots__ = ("key", "name", "vip", "path", "endpoint", "online", "_allowed", "_single", "iface", "group_rx")

    def __init__(self, key: bytes, name: str, vip: str, path: PeerPath | None,
                 allowed: list[ipaddress.IPv4Network] | None = None):
        self.key, self.name, self.vip, self.path = key, name, vip, path
        self.endpoint: object = RelayAddr(key)
        self.online = False
        self.allowed = allowed or [ipaddress.IPv4Network(f"{vip}/32")]
        self.iface: str | None = None       # "tun" / "tap" for a member with a kernel interface
        self.group_rx = TokenBucket(GROUP_RATE, GROUP_BURST)   # broadcast / multicast / frames accepted from it

    @property
    def allowed(self) -> list[ipaddress.IPv4Network]:
        """The prefixes this peer speaks for (its virtual IP first, for a member)."""
        return self._allowed

    @allowed.setter
    def allowed(self, nets: list[ipaddress.IPv4Network]) -> None:
        self._allowed = nets
        # the usual case, one address: ``allows`` compares bytes (checked on every packet in)
        self._single = nets[0].network_address.packed if len(nets) == 1 and nets[0].prefixlen == 32 else None

    def allows(self, src: bytes) -> bool:
        """Cryptokey routing: may this peer send packets from ``src``?"""
        if self._single is not None:
            return src == self._single
        a = ipaddress.IPv4Address(src)
        return any(a in n for n in self._allowed)


class PeerTable:
    """Peers by key and by virtual IP, the routes to prefixes, the pool, the group send cap.

    ``device``: the WireGuard device (peers are added to and removed from it here);
    ``blocked(addr)``: the tunnel guard's verdict handed to each member's ``PeerPath``;
    ``stats``: the data plane's counters (``no_route``, ``group_capped``)."""

    def __init__(self, device: Device, disco: DiscoCodec, config: TraversalConfig,
                 blocked: Callable[[tuple], bool], stats: dict[str, int]):
        self.device, self.disco, self.config, self.blocked, self.stats = device, disco, config, blocked, stats
        self.peers: dict[bytes, PeerEntry] = {}
        self.by_vip: dict[bytes, PeerEntry] = {}
        self.routes: list[tuple[ipaddress.IPv4Network, PeerEntry]] = []   # static peers' prefixes
        self.pool: ipaddress.IPv4Network | None = None
        self.pool_broadcast = b"\xff\xff\xff\xff"
        self.group_tx = TokenBucket(GROUP_RATE, GROUP_BURST)
        # virtual IPs (packed) of members that accept inner TCP/UDP packets without computed
        # checksums (CAP_NO_INNER_CHECKSUM); one set object for good, updated in place: the
        # userspace stacks hold it (Stack.checksum_free)
        self.checksum_free: set[bytes] = set()

    def set_pool(self, pool: str | None) -> None:
        self.pool = ipaddress.IPv4Network(pool) if pool else None
        self.pool_broadcast = self.pool.broadcast_address.packed if self.pool else b"\xff\xff\xff\xff"

    def update(self, wanted: dict[bytes, Peer]) -> list[PeerEntry]:
        """``wanted``: key -> ``Peer``: everyone sharing a network with us.
        Returns the members that left (already out of the table and the device)."""
        gone = []
        for key in list(self.peers):
            if key not in wanted and self.peers[key].path is not None:
                entry = self.peers.pop(key)
                gone.append(entry)
                self.by_vip.pop(socket.inet_aton(entry.vip), None)
                self.device.remove_peer(key)
        for key, p in wanted.items():
            entry = self.peers.get(key)
            if entry is not None and entry.path is None:
                continue  # configured as a static WireGuard peer: that configuration wins
            if entry is None:
                entry = PeerEntry(key, p.name, p.ip, PeerPath(self.disco, key, self.config, self.blocked))
                self.peers[key] = entry
                self.device.add_peer(key, endpoint=entry.endpoint)
            entry.name = p.name
            entry.iface = p.iface
            if entry.vip != p.ip:
                self.by_vip.pop(socket.inet_aton(entry.vip), None)
                entry.vip = p.ip
            # cryptokey routing: the peer speaks for its virtual IP and its approved gateway routes
            entry.allowed = [ipaddress.IPv4Network(f"{entry.vip}/32")] + [
                ipaddress.IPv4Network(r) for r in p.routes]
            self.by_vip[socket.inet_aton(entry.vip)] = entry
            entry.online = p.online
            self.device.set_plaintext(key, not p.encrypted)
        self._set_member_routes()
        self._set_checksum_free(wanted)
        return gone

    def _set_checksum_free(self, wanted: dict[bytes, Peer]) -> None:
        """Members whose hello said they take checksum-free packets; never a static peer's address."""
        free = set()
        for key, p in wanted.items():
            entry = self.peers.get(key)
            if entry is not None and entry.path is not None and CAP_NO_INNER_CHECKSUM in p.caps:
                vip = socket.inet_aton(entry.vip)
                if self.by_vip.get(vip) is entry:
                    free.add(vip)
        if free != self.checksum_free:
            self.checksum_free.clear()
            self.checksum_free.update(free)

    def add_static(self, key: bytes, *, name: str, endpoint: tuple[str, int] | None,
                   allowed_ips: list[str], persistent_keepalive: float | None = None) -> None:
        """A plain WireGuard peer from the configuration (e.g. a stock wireguard-go): fixed endpoint,
        allowed IPs routed to it, WireGuard's own roaming, no discovery."""
        nets = [ipaddress.IPv4Network(a, strict=False) for a in allowed_ips]
        if not nets:
            raise ValueError(f"static peer {name}: allowed_ips is empty")
        entry = PeerEntry(key, name, str(nets[0].network_address), None, nets)
        entry.online = True
        entry.endpoint = endpoint
        self.peers[key] = entry
        self.device.add_peer(key, endpoint=endpoint, persistent_keepalive=persistent_keepalive)
        for n in nets:
            if n.prefixlen == 32:
                self.by_vip[n.network_address.packed] = entry
                self.checksum_free.discard(n.network_address.packed)
            else:
                self.routes.append((n, entry))
        self.routes.sort(key=lambda r: -r[0].prefixlen)  # longest prefix first

    def _set_member_routes(self) -> None:
        """Gateway routes of members next to the static peers' prefixes: the longest prefix first;
        for one prefix offered by two members, the one whose name sorts first (``route`` skips
        offline ones)."""
        routes = [(n, e) for n, e in self.routes if e.path is None]
        for e in self.peers.values():
            if e.path is not None:
                routes.extend((n, e) for n in e.allowed[1:])
        routes.sort(key=lambda r: (-r[0].prefixlen, r[1].path is not None, r[1].name))
        self.routes = routes

    def route(self, dst: bytes) -> PeerEntry | None:
        entry = self.by_vip.get(dst)
        if entry is None and self.routes:
            a = ipaddress.IPv4Address(dst)
            first = None
            for net, e in self.routes:
                if a in net:
                    if e.online:
                        return e
                    first = first or e
            return first
        return entry

    def is_group(self, dst: bytes) -> bool:
        """Multicast (224.0.0.0/4), limited broadcast or the pool's broadcast address."""
        return 224 <= dst[0] <= 239 or dst == b"\xff\xff\xff\xff" or dst == self.pool_broadcast

    def send_packets(self, packets: list[bytes], now: float) -> None:
        """Outbound inner IPv4 packets to the WireGuard device, each to the peer owning its
        destination or the route to it. Broadcast and multicast go to every online member with a
        kernel interface (rate capped)."""
        send = self.device.send
        by_vip = self.by_vip
        for pkt in packets:
            dst = pkt[16:20]
            entry = by_vip.get(dst)
            if entry is None:
                if self.is_group(dst):
                    self.send_group(pkt, now, False)
                    continue
                entry = self.route(dst)
                if entry is None:
                    self.stats["no_route"] += 1
                    continue
            send(entry.key, pkt, now)

    def send_frames(self, frames: list[tuple[bytes | None, bytes]], now: float) -> None:
        """Ethernet frames from our TAP device: (key, frame) to one TAP member, (None, frame) to all."""
        for key, frame in frames:
            if key is None:
                self.send_group(L2_PREFIX + frame, now, True)
            else:
                entry = self.peers.get(key)
                if entry is not None and entry.online and entry.iface == "tap":
                    self.device.send(key, L2_PREFIX + frame, now)

    def send_group(self, pkt: bytes, now: float, tap_only: bool) -> None:
        """A broadcast / multicast packet (or a TAP frame) to every online member with a kernel
        interface (every TAP member for ``tap_only``), within the node's group cap."""
        if not self.group_tx.take(now):
            self.stats["group_capped"] += 1
            return
        for entry in self.peers.values():
            if entry.online and entry.path is not None and (
                    entry.iface == "tap" or (entry.iface == "tun" and not tap_only)):
                self.device.send(entry.key, pkt, now)

    def path_of(self, key: bytes) -> tuple[str | None, float | None]:
        """How packets to the peer travel ("relay", "direct ADDR", ...) and the path's RTT in ms."""
        entry = self.peers.get(key)
        if entry is None:
            return None, None
        if entry.endpoint is None:
            return None, None
        if isinstance(entry.endpoint, RelayAddr):
            return "relay", None
        if entry.path is None:
            return f"direct {fmt_endpoint(entry.endpoint)} (static)", None
        rtt = entry.path.rtt if entry.path.current_path == entry.endpoint else None
        return f"direct {fmt_endpoint(entry.endpoint)}", (rtt * 1000 if rtt is not None else None)

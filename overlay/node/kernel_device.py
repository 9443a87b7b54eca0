"""The node's kernel device edge (``--tun`` / ``--tap``): one more source and sink of inner packets.

Beside the userspace stack this is the other local endpoint of the data plane: batches read from
the device go to ``DataPlane.send_packets`` (IPv4) or ``send_frames`` (TAP frames that are not
IPv4); what peers send comes back through ``deliver`` / ``deliver_frames`` and is written to the
device. A TAP device adds the Ethernet edge (``overlay.iface.ethernet``). The kernel receives
only unicast addressed to this node and broadcast / multicast; with ``--only-shared`` the inbound
filter (``overlay.node.inbound_filter``) narrows that to shared ports and replies, and a TAP edge
then takes no IPv6 from peers. A node that is
a gateway (``--advertise-routes``) also lets through packets from members to its approved routes
(for those members only) and has the kernel forward them to its LAN (``overlay.iface.router``).

The pool and every prefix routed into the device lead into the tunnel: the data plane's tunnel
guard (``overlay.node.tunnel_guard``) learns them here, and one of our own outer datagrams read
back from the device is dropped and reported (it would loop).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from overlay.iface import ethernet, offload
from overlay.iface.ethernet import FLOOD, REPLY, SEND_IP, UNICAST, TapEdge, fmt_mac, node_mac
from overlay.iface.netconfig import LIMITED_BROADCAST
from overlay.iface.router import KernelRouter
from overlay.iface.tuntap import DeviceError, TunTap, device_exists, open_device
from overlay.node.dataplane import INNER_MTU, DataPlane
from overlay.node.approved_routes import ApprovedRoutes
from overlay.node import tunnel_guard
from overlay.node.inbound_filter import InboundFilter

log = logging.getLogger("overlay.iface")

DEFAULT_NAME = "ovl0"
_UDP = b"\x11"     # IPv4 protocol byte (a one-byte slice compares without allocating)


class KernelInterface:
    def __init__(self, kind: str, name: str, dataplane: DataPlane, public_key: bytes, *,
                 only_shared: InboundFilter | None = None, broadcast_route: bool = True,
                 advertised: list[str] = ()):
        if kind not in ("tun", "tap"):
            raise ValueError(f"unknown interface kind {kind!r}")
        self.kind, self.name = kind, name
        self.dp = dataplane
        self.filter = only_shared
        self.broadcast_route = broadcast_route
        self.mac = node_mac(public_key) if kind == "tap" else None
        self.edge = TapEdge(self.mac, refuse_ipv6=only_shared is not None) if kind == "tap" else None
        self.dev: TunTap | None = None
        self.net = None            # NetConfig, once the node has an address
        self.created = False       # this process created the device (it goes when we close it)
        self.address: str | None = None
        self._ip: bytes | None = None   # our address, packed
        self._network: ipaddress.IPv4Network | None = None
        self.stats = {"not_ipv4": 0, "not_for_us": 0, "filtered": 0, "routed": 0, "own_outer": 0}
        # as a gateway: our own advertised prefixes (never routed into the device: they are our
        # LAN), the approved routes and who may use them, and the kernel's forwarding for them
        self.advertised = [ipaddress.IPv4Network(r) for r in advertised]
        self.gateway = ApprovedRoutes()
        self.router: KernelRouter | None = None
        self._forwarding = False
        # Offloads with the kernel (overlay.iface.offload); every read and write then carries a
        # virtio_net_hdr. "gro" (default): TCP runs coalesced into super-packets on write, plain
        # packets on read. "tso" also takes the kernel's 64 KB super-packets on read: fewer passes
        # through its TCP stack, but the per-segment checksums in Python cost more than that saves
        # here (benchmarks/bench_tun.py). OVERLAY_TUN_OFFLOAD=gro|tso|off, for such measurements.
        mode = os.environ.get("OVERLAY_TUN_OFFLOAD", "gro")
        self.offload = mode if mode in ("gro", "tso") else None
        self.vnet = False
        self.offload_stats = offload.OffloadStats()

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        existed = device_exists(self.name)
        fd, self.vnet = open_device(self.name, self.kind, self.offload is not None,
                                    offload.TSO_FLAGS if self.offload == "tso" else 0)
        self.created = not existed
        self.dev = TunTap(fd, self.name, self.kind, self._from_tap if self.edge else self._from_tun,
                          read_size=(65536 if self.offload == "tso" else INNER_MTU + 64) + offload.VNET_HDR_LEN)
        self.dev.start()
        self.dp.own_ifaces = (self.name,)
        if self.edge:
            self.dp.frame_sink = self.deliver_frames
        log.info("%s device %s %s%s", self.kind.upper(), self.name, "created" if self.created else "attached",
                 f", MAC {fmt_mac(self.mac)}" if self.mac else "")

    def configure(self, address: str, network: ipaddress.IPv4Network) -> None:
        """Give the device our address in ``network`` (the pool), the MTU, and bring it up."""
        from overlay.iface.netconfig import NetConfig   # pyroute2 only when a device is used
        if self.net is None:
            self.net = NetConfig(self.name, self.kind, broadcast_route=self.broadcast_route)
        self.net.apply(address, network.prefixlen, INNER_MTU, fmt_mac(self.mac) if self.mac else None)
        self._network = network
        self.dp.guard.set_device([address], [network])
        self._sync_routes()
        if address != self.address:
            log.info("%s holds %s/%d, MTU %d", self.name, address, network.prefixlen, self.net.mtu)
        self.address = address
        self._ip = socket.inet_aton(address)
        if self.edge:
            self.edge.set_address(address, network)
        self._apply_router()

    def set_gateway_routes(self, routes: list[tuple[str, set[str]]]) -> None:
        """As a gateway: (approved route, member virtual IPs) pairs; the kernel forwards them."""
        self.gateway.set(routes)
        self._apply_router()

    def _apply_router(self) -> None:
        if self.net is None or self._network is None or (self.router is None and not self.gateway):
            return
        if self.router is None:
            self.router = KernelRouter(self.name, self.net.lan_ifnames)
        self._forwarding = self.router.apply(str(self._network), self.gateway.prefixes())

    def router_stats(self) -> dict:
        r = self.router
        return {"forwarding": self._forwarding, "routed": self.stats["routed"],
                "error": r.error if r is not None else None}

    def close(self) -> None:
        if self.router is not None:
            self.router.undo()
            self.router = None
        if self.net is not None:
            self.net.undo()
            self.net = None
        if self.dev is not None:
            self.dev.close()
            self.dev = None

    def set_peers(self) -> None:
        """The data plane's peers changed: refresh the TAP edge's MAC and ARP tables and the kernel
        routes toward prefixes that peers carry."""
        if self.edge:
            self.edge.set_peers((e.key, socket.inet_aton(e.vip), e.iface == "tap")
                                for e in self.dp.peers.values() if e.path is not None)
        self._sync_routes()

    def _sync_routes(self) -> None:
        """Route through the device every prefix the data plane routes to a peer outside the pool:
        static WireGuard peers' allowed IPs and members' approved gateway routes (a TAP edge answers
        ARP for them, as a router would)."""
        if self.net is None or self._network is None:
            return
        want = [n for n, _ in self.dp.routes if not n.subnet_of(self._network)
                and not any(n.overlaps(o) for o in self.advertised)]   # our own LAN stays ours
        if self.edge:
            self.edge.routes = want
        names = {str(n) for n in want}
        for dst in [d for d in self.net.added_routes if d not in names and d != LIMITED_BROADCAST]:
            self.net.remove_route(dst)
        for dst in names:
            self.net.add_route(dst)
        # what now leads into the device (a prefix the host already routes elsewhere, e.g. the LAN
        # it sits on, was not added and stays a usable path; the kernel-route check sees the rest)
        self.dp.guard.set_routes([ipaddress.IPv4Network(d) for d in self.net.added_routes if d != LIMITED_BROADCAST])

    @property
    def checksum_free(self) -> bool:
        """Peers may send us TCP/UDP without computed checksums (CAP_NO_INNER_CHECKSUM): a TUN
        device with virtio_net_hdr gets TCP segments to our address that came without a checksum
        as CHECKSUM_PARTIAL (``offload.coalesce``), which the kernel does not verify; a zero UDP
        checksum means none.
        Not without the header (the kernel verifies every checksum), nor on TAP (not done there)."""
        return self.vnet and self.edge is None

    def info(self) -> dict:
        return {"kind": self.kind, "name": self.name,
                "mtu": self.net.mtu if self.net is not None else None,
                "mac": fmt_mac(self.mac) if self.mac else None}

    # ------------------------------------------------------------------ device -> tunnel
    def _from_tun(self, packets: list[bytes]) -> None:
        if self.vnet:
            bufs, packets = packets, []
            split, stats = offload.split, self.offload_stats
            for b in bufs:
                split(b, packets, stats)
        out = []
        filt = self.filter
        now = self.dp.now() if filt else 0.0
        for p in packets:
            if p[0] >> 4 != 4:
                self.stats["not_ipv4"] += 1   # IPv6 router solicitations and the like: inner traffic is IPv4
                continue
            if p[9:10] == _UDP and self._own_outer(p):
                continue
            if filt:
                filt.outbound(p, now)
            out.append(p)
        self.dp.send_packets(out)

    def _from_tap(self, frames: list[bytes]) -> None:
        edge = self.edge
        ips, l2, replies = [], [], []
        filt = self.filter
        now = self.dp.now() if filt else 0.0
        if self.vnet:
            frames = self._unwrap_vnet(frames, ips)
        for f in frames:
            action, payload, key = edge.from_device(f)
            if action == SEND_IP:
                if filt:
                    filt.outbound(payload, now)
                ips.append(payload)
            elif action == REPLY:
                replies.append(payload)
            elif action == FLOOD:
                l2.append((None, payload))
            elif action == UNICAST:
                l2.append((key, payload))
        if replies:
            self._write_frames(replies)
        if ips and any(p[9:10] == _UDP and tunnel_guard.own_outer_destination(p, self.dp.port) for p in ips):
            ips = [p for p in ips if not (p[9:10] == _UDP and self._own_outer(p))]
        if ips:
            self.dp.send_packets(ips)
        if l2:
            self.dp.send_frames(l2)

    def _own_outer(self, p: bytes) -> bool:
        """``p`` (IPv4 UDP, from the device) is one of our own outer datagrams: never into the tunnel."""
        dst = tunnel_guard.own_outer_destination(p, self.dp.port)
        if dst is None:
            return False
        self.stats["own_outer"] += 1
        self.dp.outer_in_tunnel(dst)
        return True

    def _unwrap_vnet(self, bufs: list[bytes], ips: list[bytes]) -> list[bytes]:
        """TAP reads with a virtio_net_hdr: IPv4 super-packets and partial checksums go through
        ``offload.split_packet`` straight to ``ips``; the frames left are returned bare."""
        frames = []
        l2 = ethernet.ETH_HEADER
        for b in bufs:
            if len(b) < offload.VNET_HDR_LEN + l2:
                continue
            flags, gso, _, size, cstart, coff = offload.VNET_HDR.unpack_from(b)
            if not (flags & offload.F_NEEDS_CSUM or gso):
                frames.append(b[offload.VNET_HDR_LEN:])
            elif b[22:24] == ethernet.ETH_IPV4:
                offload.split_packet(flags, gso, size, cstart - l2, coff, memoryview(b)[offload.VNET_HDR_LEN + l2:],
                                     ips, self.offload_stats)
            elif not gso:
                out: list[bytes] = []   # IPv6 and others: complete the checksum, keep the frame
                offload.split_packet(flags, gso, size, cstart, coff, memoryview(b)[offload.VNET_HDR_LEN:], out)
                frames.extend(out)
            else:
                self.offload_stats.dropped += 1
        if self.filter:
            now = self.dp.now()
            for p in ips:
                self.filter.outbound(p, now)
        return frames

    def _write_frames(self, frames: list[bytes]) -> None:
        if self.vnet:
            self.dev.write_framed([(offload.HDR_VALID, f) for f in frames])
        else:
            self.dev.write(frames)

    # ------------------------------------------------------------------ tunnel -> device
    def deliver(self, packets: list[bytes]) -> None:
        """IPv4 packets from peers (cryptokey routing already checked their sources)."""
        dev = self.dev
        if dev is None:
            return
        me = self._ip
        filt = self.filter
        now = self.dp.now() if filt else 0.0
        ok = []
        answers = None
        gw = self.gateway if self._forwarding else None
        for p in packets:
            dst = p[16:20]
            if dst != me and not (dst[0] >= 224 or dst == self.dp.pool_broadcast):
                if gw is not None and gw.permits(p[12:16], dst):
                    self.stats["routed"] += 1   # a member's packet to our LAN: the kernel forwards it
                    ok.append(p)
                    continue
                self.stats["not_for_us"] += 1   # never route a peer's packet on to another host
                continue
            if filt and not filt.admit(p, now):
                self.stats["filtered"] += 1
                if dst == me and (answer := filt.refusal(p, now)) is not None:
                    (answers := answers or []).append(answer)   # a reset / port unreachable: fail fast
                continue
            ok.append(p)
        if answers:
            self.dp.send_packets(answers)
        if self.edge:
            header = self.edge.header_for
            if self.vnet:
                dev.write_framed([(w[0], header(w[1]), *w[1:]) for w in offload.coalesce(
                    ok, self.offload_stats, ethernet.ETH_HEADER)])
            else:
                dev.write_framed([(header(p), p) for p in ok])
        elif self.vnet:
            dev.write_framed(offload.coalesce(ok, self.offload_stats, local=me))
        else:
            dev.write(ok)

    def deliver_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Ethernet frames from TAP members (rate capped by the data plane)."""
        if self.dev is None or self.edge is None:
            return
        admit = self.edge.admit_frame
        self._write_frames([f for key, f in frames if admit(key, f)])


__all__ = ["KernelInterface", "DeviceError", "DEFAULT_NAME", "ethernet"]

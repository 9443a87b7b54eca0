"""The node's data plane: one UDP socket, WireGuard sessions, path discovery, relay, netstack.

Datagrams on the single socket are told apart by their first bytes (WireGuard types 1-4 with
three zero bytes, STUN with its magic cookie, discovery "OVD", relay "OVR") and fed to the
sans-I/O cores: ``wire.Device`` (sessions), ``nat.PeerPath`` per peer (probing, choosing,
keeping alive a direct path), ``nat.StunTransaction`` (server-reflexive address), and the relay
framing. Inner packets go to the userspace stack (``netstack``) and come back from it.

The path manager is the authority on where a peer lives: every peer starts on the relay
(``RelayAddr``) so traffic flows at once; a confirmed discovery pong moves it to a direct address;
losing that path moves it back to the relay while probing continues. WireGuard's own roaming is
kept for direct addresses (a rebinding NAT shows up as an authenticated packet from a new
address and the session follows at once), but never downgrades a working direct path to the relay.

All cores are driven from the loop's reader callback and one timer; nothing here allocates a
coroutine or a queue per packet.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import ipaddress
import logging
import socket
import struct
from typing import Callable, NamedTuple

from overlay.iface.ethernet import L2_FRAME, L2_PREFIX
from overlay.io.udp import UdpSocket, bind_udp
from overlay.nat import disco as disco_mod
from overlay.nat import birthday, natpmp, portmap, seqpunch, stun
from overlay.nat.candidate import Candidate, format_addr, parse_addr
from overlay.nat.classify import SEQUENTIAL, NatProbe, NatReport
from overlay.nat.traversal import PeerPath, TraversalConfig
from overlay.node import ipv6
from overlay.node.tunnel_guard import TunnelGuard
from overlay.relay import frames
from overlay.wire.device import Device
from overlay.wire.events import EndpointChanged, HandshakeCompleted, PacketReceived, PeerUnreachable

log = logging.getLogger("overlay.dataplane")

REGISTER_INTERVAL = 10.0      # relay registration doubles as the NAT keepalive toward the server
REGISTER_TIMEOUT = 3.0        # no REGISTERED after this: UDP to the server looks blocked
REPROBE_INTERVAL = 120.0      # refresh the server-reflexive address and NAT classification
PREDICTED_PORTS = 8
INNER_MTU = 1380
"""Largest inner IP packet: 1380 + 32 (WireGuard) + 37 (relay framing) + 8 (UDP) + 20 (IPv4) = 1477,
under the 1500 of an Ethernet path; a TAP frame adds its 14-byte header and the inner type byte."""
GROUP_RATE = 200.0
"""Broadcast, multicast and non-IP Ethernet frames a node may send, and accept from each peer, per
second (ZeroTier caps the same traffic with its multicastLimit): mDNS, SSDP and game discovery
need a few a second; more is a flood that would reach every member of every network."""
GROUP_BURST = 400.0


class TokenBucket:
    __slots__ = ("tokens", "at")

    def __init__(self) -> None:
        self.tokens, self.at = GROUP_BURST, 0.0

    def take(self, now: float) -> bool:
        tokens = min(GROUP_BURST, self.tokens + (now - self.at) * GROUP_RATE)
        self.at = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class RelayAddr(NamedTuple):
    """The endpoint "through the relay, to this peer" (opaque to the WireGuard device)."""
    key: bytes


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


def _fmt(addr) -> str:
    return "relay" if isinstance(addr, RelayAddr) else format_addr(addr)


class PeerEntry:
    """A peer: an overlay member (``path`` drives discovery) or a static WireGuard peer (no path)."""

    __slots__ = ("key", "name", "vip", "path", "endpoint", "online", "allowed", "iface", "group_rx")

    def __init__(self, key: bytes, name: str, vip: str, path: PeerPath | None,
                 allowed: list[ipaddress.IPv4Network] | None = None):
        self.key, self.name, self.vip, self.path = key, name, vip, path
        self.endpoint: object = RelayAddr(key)
        self.online = False
        self.allowed = allowed or [ipaddress.IPv4Network(f"{vip}/32")]
        self.iface: str | None = None       # "tun" / "tap" for a member with a kernel interface
        self.group_rx = TokenBucket()       # broadcast / multicast / frames accepted from it

    def allows(self, src: bytes) -> bool:
        """Cryptokey routing: may this peer send packets from ``src``?"""
        if len(self.allowed) == 1 and self.allowed[0].prefixlen == 32:
            return src == self.allowed[0].network_address.packed
        a = ipaddress.IPv4Address(src)
        return any(a in n for n in self.allowed)


class DataPlane:
    def __init__(self, private_key: bytes, *, port: int = 0, keepalive: float = 25.0,
                 send_control: Callable[[dict], None] = lambda msg: None, hard_nat: bool = True,
                 birthday_config: birthday.BirthdayConfig | None = None,
                 port_mapping: tuple[str, ...] = portmap.PROTOCOLS):
        self.private_key = private_key
        self.device = Device(private_key)
        self.public_key = self.device.public_key
        self.disco = disco_mod.DiscoCodec(private_key, accept_sender=lambda k: k in self.peers)
        self.config = TraversalConfig(keepalive_interval=keepalive)
        self.port = port
        self.magic_port = port != 0   # a fixed port was asked for: worth advertising as forwarded
        self.send_control = send_control
        self.peers: dict[bytes, PeerEntry] = {}
        self.by_vip: dict[bytes, PeerEntry] = {}
        self.routes: list[tuple[ipaddress.IPv4Network, PeerEntry]] = []   # static peers' prefixes
        self.udp: UdpSocket | None = None
        self.server_udp: tuple[str, int] | None = None
        self.server_is_loopback = False
        self.udp_token: bytes | None = None
        self._relay_nonce = frames.NO_NONCE     # from the server's CHALLENGE: binds REGISTER to our address
        self._challenged_at = float("-inf")
        self.udp_ok = False           # the server acknowledged our registration
        self.srflx: tuple[str, int] | None = None
        self._registered_at = float("-inf")
        self._register_sent = float("-inf")
        self._probe: NatProbe | None = None
        self._probe_servers: list[tuple[str, int]] = []
        self._next_probe: float | None = None
        self.nat: NatReport | None = None
        self.server_rtt: float | None = None
        self._probe_waiters: list[asyncio.Future] = []
        self._out: list[tuple[bytes, object]] = []
        self._dirty_paths: set[PeerEntry] = set()
        # earliest discovery timer over all peers; only discovery input or timers move it, so it is
        # recomputed then, not on every data packet
        self._paths_at: float | None = None
        self._paths_stale = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.inner_sink: Callable[[list[bytes]], None] = lambda packets: None
        # Ethernet frames from TAP members, (key, frame): only a TAP node sets this
        self.frame_sink: Callable[[list[tuple[bytes, bytes]]], None] | None = None
        self.pool: ipaddress.IPv4Network | None = None
        self.pool_broadcast = b"\xff\xff\xff\xff"
        self.own_ifaces: tuple[str, ...] = ()
        self._group_tx = TokenBucket()
        self._frames: list[tuple[bytes, bytes]] = []
        self.on_endpoints: Callable[[], None] = lambda: None  # our candidates changed: re-introduce
        self._inner: list[bytes] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        # birthday punching (``nat.birthday``): per-peer planners, the peer NAT classes from the
        # server's introductions, when to check whether an attempt is wanted, the extra sockets of
        # the one hard-side attempt at a time, and the winning sockets (remote address -> socket)
        self.hard_nat = hard_nat
        # mapping of our port on the router (PCP, NAT-PMP, UPnP IGD; not on loopback); UPnP's
        # blocking calls run on one worker thread (``_igd_pool``), miniupnpc in a capped child process
        self.port_mapping = port_mapping
        self._portmap: portmap.PortMapper | None = None
        self._igd = None
        self._igd_pool = None
        self.birthday_config = birthday_config or birthday.BirthdayConfig()
        self._bday: dict[bytes, birthday.BirthdayPunch] = {}
        self._bday_nat: dict[bytes, dict] = {}
        self._bday_check: dict[bytes, float] = {}
        self._bday_owner: bytes | None = None
        self._bday_socks: list[UdpSocket] = []
        self._via: dict[tuple, UdpSocket] = {}
        self._winner: dict[bytes, tuple[tuple, UdpSocket]] = {}
        # IPv6 (``overlay.node.ipv6``): a second socket beside the IPv4 one, and STUN in the
        # other address family than ``server_udp``'s
        self.v6 = ipv6.Ipv6Side()
        # sequential <-> sequential punching (``nat.seqpunch``): per-peer planners, when to start,
        # the one attempt at a time that owns the fresh socket, and its STUN measurement
        self.seq_config = seqpunch.SeqConfig()
        self._seq: dict[bytes, seqpunch.SeqPunch] = {}
        self._seq_check: dict[bytes, float] = {}
        self._seq_owner: bytes | None = None
        self._seq_sock: UdpSocket | None = None
        self._seq_stun: stun.StunTransaction | None = None
        self._seq_pub: dict | None = None     # our base as published (withdrawn when the attempt ends)
        self._seq_easy: set[bytes] = set()    # peers whose window we spray from our socket (role EASY)
        self.stats = {"not_ours": 0, "spoofed": 0, "no_route": 0, "disco_bad": 0, "relay_tcp_tx": 0,
                      "group_capped": 0, "inside_tunnel": 0}
        # addresses whose outer datagrams would enter our own tunnel (``tunnel_guard``): never a path
        self.guard = TunnelGuard(lambda: self.loop.time() if self.loop else 0.0,
                                 lambda addr: self._local_toward(addr)[0])
        self.guard.on_change = self._guard_changed

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = bind_udp("0.0.0.0", self.port)
        self.port = sock.getsockname()[1]
        self.udp = UdpSocket(sock, self._on_datagram, on_batch=self._flush, loop=self.loop)
        log.info("data plane on UDP port %d", self.port)
        self.v6.open(self.port, self._on_datagram, self._flush, self.loop)

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        self._close_bday_socks()
        self._seq_close()
        self._portmap_close()
        for key in list(self._winner):
            self._drop_winner(key)
        if self.udp:
            self.udp.close()
        self.v6.close()

    def now(self) -> float:
        return self.loop.time()

    # ------------------------------------------------------------------ configuration from the control plane
    def set_server(self, host: str, udp_port: int, token: bytes, stun_ports: list[int] | None = None,
                   stun_alt_ip: str | None = None, udp_addrs: list[str] | None = None) -> None:
        """``host``: the address the control connection reached (relay and NAT probe go there);
        ``udp_addrs``: the server's UDP endpoints it announced (one of the other address family is
        used for STUN: the node's public address in that family)."""
        try:
            infos = socket.getaddrinfo(host, udp_port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except socket.gaierror as e:
            log.warning("cannot resolve server %s for UDP: %s", host, e)
            return
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        ip = v4[0] if v4 else infos[0][4][0]
        self.server_udp = (ip, udp_port)
        self.server_is_loopback = ipaddress.ip_address(ip).is_loopback
        self.v6.set_server(host, ip, udp_port, udp_addrs or [], self.server_is_loopback, self.own_ifaces)
        self.udp_token = token
        self._relay_nonce = frames.NO_NONCE
        self._register_sent = float("-inf")
        if (self._portmap is None and self.port_mapping and not self.server_is_loopback
                and (gw := natpmp.default_gateway())):
            self._portmap = portmap.PortMapper(gw, self._local_toward((gw, natpmp.PORT))[0], self.port,
                                               self.now(), protocols=self.port_mapping)
        servers = [(ip, p) for p in (stun_ports or [udp_port])]
        if stun_alt_ip and (":" in stun_alt_ip) == (":" in ip):
            servers.append((stun_alt_ip, udp_port))
        self._probe_servers = servers[:8]
        self.start_probe()

    def start_probe(self) -> asyncio.Future:
        """(Re)learn our public address and NAT behaviour from the server's STUN ports."""
        if out := self.v6.start_stun(self.now()):
            self._out.extend(out)
            self._schedule_flush()
        fut = self.loop.create_future()
        if not self._probe_servers:
            fut.set_result(None)
            return fut
        self._probe_waiters.append(fut)
        if self._probe is None or self._probe.done:
            self._probe = NatProbe(self._local_toward_server(), self._probe_servers, self.now(),
                                   rto=0.3, rc=4, rm=4)
            self._next_probe = None
            self._on_timer()
        return fut

    def _local_toward_server(self) -> tuple[str, int]:
        return self._local_toward(self.server_udp)

    def _local_toward(self, dst: tuple[str, int]) -> tuple[str, int]:
        """Our local address on the route to ``dst`` and the port of the socket of its family."""
        v6 = ":" in dst[0]
        port = self.v6.port if v6 and self.v6.port else self.port
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(dst)
                return s.getsockname()[0], port
            except OSError:
                return ("::" if v6 else "0.0.0.0"), port

    def _probe_finished(self) -> None:
        probe, self._probe = self._probe, None
        report = probe.report()
        self.nat = report
        self.server_rtt = probe.rtt
        self._next_probe = self.now() + REPROBE_INTERVAL
        for fut in self._probe_waiters:
            if not fut.done():
                fut.set_result(report)
        self._probe_waiters.clear()
        if not report.udp:
            log.warning("no STUN answer from the server: UDP looks blocked")
            return
        if report.public != self.srflx:
            self.srflx = report.public
            log.info("server sees this node at %s (NAT mapping %s%s)", format_addr(report.public),
                     report.mapping, f", {report.allocation.lower()} ports" if report.allocation else "")
            self._publish_endpoints()
            self.on_endpoints()

    def local_candidates(self) -> list[dict]:
        addrs = ["127.0.0.1"] if self.server_is_loopback else interface_addresses(self.own_ifaces, self.pool)
        cands = [{"addr": f"{a}:{self.port}", "kind": "lan"} for a in addrs[:6]]
        if self.srflx:
            cands.insert(0, {"addr": f"{self.srflx[0]}:{self.srflx[1]}", "kind": "srflx"})
            if (m := self.port_mapped()) is not None:
                # the router forwards this port to us (PCP, NAT-PMP or UPnP): reachable from anywhere
                cands.insert(1, {"addr": f"{m[0]}:{m[1]}", "kind": "magic"})
            if self.port and self.magic_port and self.srflx[1] != self.port:
                # the "magic" port: a router forwarding this UDP port to us makes it reachable
                cands.append({"addr": f"{self.srflx[0]}:{self.port}", "kind": "magic"})
            if self.nat is not None and self.nat.predictable:
                for p in self.nat.gap_ports() + self.nat.predicted_ports(PREDICTED_PORTS):
                    cands.append({"addr": f"{self.srflx[0]}:{p}", "kind": "predicted"})
        if not self.server_is_loopback:
            at = (1 + (self.port_mapped() is not None)) if self.srflx else 0
            cands[at:at] = self.v6.candidates(self.own_ifaces)
        seen, unique = set(), []
        for c in cands:
            if c["addr"] not in seen and not self.guard.inside(parse_addr(c["addr"])[0]):
                seen.add(c["addr"])     # (never an address that leads into our own tunnel)
                unique.append(c)
        return unique[:16]

    def ipv6_summary(self) -> dict:
        return self.v6.summary(self.server_udp, self.srflx, self.own_ifaces)

    def nat_summary(self) -> dict:
        n = self.nat
        if n is None:
            return {}
        return {"udp": n.udp, "public": format_addr(n.public) if n.public else None,
                "behind_nat": n.behind_nat, "mapping": n.mapping,
                "varies_by_destination": n.varies_by_destination, "allocation": n.allocation,
                "sequential": n.allocation == SEQUENTIAL if n.allocation else None,
                "port_delta": n.delta if n.allocation == SEQUENTIAL else None,
                "port_preserved": n.port_preserved,
                "server_rtt_ms": self.server_rtt * 1000 if self.server_rtt is not None else None}

    def update_peers(self, peers: dict[str, dict]) -> None:
        """``peers``: key (base64) -> {name, ip, online}: everyone sharing a network with us."""
        wanted = {}
        for text, p in peers.items():
            wanted[base64.b64decode(text)] = p
        for key in list(self.peers):
            if key not in wanted and self.peers[key].path is not None:
                entry = self.peers.pop(key)
                self._bday_forget(key)
                self._seq_forget(key)
                self.by_vip.pop(socket.inet_aton(entry.vip), None)
                self.device.remove_peer(key)
                self._dirty_paths.discard(entry)
        for key, p in wanted.items():
            entry = self.peers.get(key)
            if entry is not None and entry.path is None:
                continue  # configured as a static WireGuard peer: that configuration wins
            if entry is None:
                entry = PeerEntry(key, p["name"], p["ip"], PeerPath(self.disco, key, self.config, self.guard.blocked))
                self.peers[key] = entry
                self.device.add_peer(key, endpoint=entry.endpoint)
            entry.name = p["name"]
            entry.iface = p.get("iface")
            if entry.vip != p["ip"]:
                self.by_vip.pop(socket.inet_aton(entry.vip), None)
                entry.vip = p["ip"]
            # cryptokey routing: the peer speaks for its virtual IP and its approved gateway routes
            entry.allowed = [ipaddress.IPv4Network(f"{entry.vip}/32")] + [
                ipaddress.IPv4Network(r) for r in p.get("routes", ())]
            self.by_vip[socket.inet_aton(entry.vip)] = entry
            entry.online = p["online"]
            self.device.set_plaintext(key, p.get("encrypted", True) is False)
        self._set_member_routes()
        self._paths_stale = True
        self._schedule_flush()

    def add_static_peer(self, key: bytes, *, name: str, endpoint: tuple[str, int] | None,
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
            else:
                self.routes.append((n, entry))
        self.routes.sort(key=lambda r: -r[0].prefixlen)  # longest prefix first
        if self.loop is not None:
            self._schedule_flush()

    def _set_member_routes(self) -> None:
        """Gateway routes of members next to the static peers' prefixes: the longest prefix first;
        for one prefix offered by two members, the one whose name sorts first (``_route`` skips
        offline ones)."""
        routes = [(n, e) for n, e in self.routes if e.path is None]
        for e in self.peers.values():
            if e.path is not None:
                routes.extend((n, e) for n in e.allowed[1:])
        routes.sort(key=lambda r: (-r[0].prefixlen, r[1].path is not None, r[1].name))
        self.routes = routes

    def _route(self, dst: bytes) -> PeerEntry | None:
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

    def route_peer(self, ip: str) -> PeerEntry | None:
        """The member or static peer packets to ``ip`` (outside the pool) go to."""
        try:
            return self._route(socket.inet_aton(ip))
        except OSError:
            return None

    def punch(self, ev: dict) -> None:
        """The server introduced us to a peer: probe its candidates now."""
        try:
            key = base64.b64decode(ev["peer"])
        except (KeyError, ValueError):
            return
        entry = self.peers.get(key)
        if entry is None or entry.path is None:
            return
        cands = []
        v6 = self.v6.usable(self.server_udp, self.own_ifaces)
        for c in ev.get("candidates", []):
            try:
                cand = Candidate(parse_addr(c["addr"]), c["kind"])
            except (ValueError, TypeError, KeyError):
                continue
            if v6 or ":" not in cand.addr[0]:   # without IPv6 of our own its probes would be wasted
                cands.append(cand)
        entry.path.set_remote_candidates(cands)
        entry.path.start_punch(self.now())
        if isinstance(ev.get("nat"), dict):
            self._bday_nat[key] = ev["nat"]
            if self.hard_nat and self._bday_role(key) is not None and entry.path.current_path is None:
                self._bday_check.setdefault(key, self.now() + self.birthday_config.delay)
            self._seq_on_punch(key, entry, ev["nat"])
        self._dirty_paths.add(entry)
        self._schedule_flush()

    def relay_from_tcp(self, ev: dict) -> None:
        """A relayed WireGuard packet that reached us over the control connection."""
        try:
            src = base64.b64decode(ev["from"])
            payload = base64.b64decode(ev["data"])
        except (KeyError, ValueError):
            return
        if src in self.peers:
            self._wg_receive(payload, RelayAddr(src))
            self._flush()

    # ------------------------------------------------------------------ inner packets
    def set_pool(self, pool: str | None) -> None:
        self.pool = ipaddress.IPv4Network(pool) if pool else None
        self.pool_broadcast = self.pool.broadcast_address.packed if self.pool else b"\xff\xff\xff\xff"
        self.guard.set_pool(self.pool)

    def outer_in_tunnel(self, dst: tuple[str, int]) -> None:
        """One of our outer datagrams to ``dst`` came out of our overlay device (the interface
        dropped it): refuse that host as a path (``tunnel_guard``, layer 3)."""
        if self.guard.caught(dst[0]):
            log.warning("outer packets to %s entered this node's own tunnel: that address is no path "
                        "(it is routed into the overlay device)", format_addr(dst))

    def _guard_changed(self) -> None:
        """The addresses leading into our tunnel changed: no candidate or path may stay among them."""
        if self.loop is None:
            return
        now = self.now()
        for entry in self.peers.values():
            if entry.path is not None and entry.path.drop_blocked(now):
                self._dirty_paths.add(entry)
        self._schedule_flush()

    def is_group(self, dst: bytes) -> bool:
        """Multicast (224.0.0.0/4), limited broadcast or the pool's broadcast address."""
        return 224 <= dst[0] <= 239 or dst == b"\xff\xff\xff\xff" or dst == self.pool_broadcast

    def send_packets(self, packets: list[bytes]) -> None:
        """Outbound inner IPv4 packets (from the netstack or a TUN/TAP device), sent at once:
        callers hand over whole batches, and waiting for another loop turn would only add latency.
        Broadcast and multicast go to every online member with a kernel interface (rate capped)."""
        now = self.now()
        send = self.device.send
        for pkt in packets:
            dst = pkt[16:20]
            entry = self.by_vip.get(dst)
            if entry is None:
                if self.is_group(dst):
                    self._send_group(pkt, now, False)
                    continue
                entry = self._route(dst)
                if entry is None:
                    self.stats["no_route"] += 1
                    continue
            send(entry.key, pkt, now)
        self._flush()

    def send_frames(self, frames: list[tuple[bytes | None, bytes]]) -> None:
        """Ethernet frames from our TAP device: (key, frame) to one TAP member, (None, frame) to all."""
        now = self.now()
        for key, frame in frames:
            if key is None:
                self._send_group(L2_PREFIX + frame, now, True)
            else:
                entry = self.peers.get(key)
                if entry is not None and entry.online and entry.iface == "tap":
                    self.device.send(key, L2_PREFIX + frame, now)
        self._flush()

    def _send_group(self, pkt: bytes, now: float, tap_only: bool) -> None:
        if not self._group_tx.take(now):
            self.stats["group_capped"] += 1
            return
        for entry in self.peers.values():
            if entry.online and entry.path is not None and (
                    entry.iface == "tap" or (entry.iface == "tun" and not tap_only)):
                self.device.send(entry.key, pkt, now)

    # ------------------------------------------------------------------ input
    def _on_datagram(self, view: memoryview, addr) -> None:
        if len(view) < 4:
            self.stats["not_ours"] += 1
            return
        b0 = view[0]
        if 1 <= b0 <= 5 and view[1] == 0 and view[2] == 0 and view[3] == 0:
            self.device.receive(view, addr, self.loop.time())
        elif view[:4] == frames.MAGIC:
            self._relay_receive(bytes(view), addr)
        elif view[:4] == disco_mod.MAGIC:
            self._disco_receive(bytes(view), (addr[0], addr[1]))
        elif self._portmap is not None and addr[1] == natpmp.PORT and addr[0] == self._portmap.gateway[0]:
            if self._portmap.receive(bytes(view), (addr[0], addr[1]), self.now()):
                self._portmap_changed()
            self._schedule_flush()
        elif stun.is_stun(view):
            probe = self._probe
            if probe is not None and probe.receive(bytes(view), (addr[0], addr[1]), self.now()):
                if probe.done:
                    self._probe_finished()
            elif self.v6.receive_stun(bytes(view), (addr[0], addr[1]), self.now()) and self.v6.changed:
                self.v6.changed = False
                if self.srflx:
                    self._publish_endpoints()
                    self.on_endpoints()
        else:
            self.stats["not_ours"] += 1

    def _wg_receive(self, data, addr) -> None:
        self.device.receive(data, addr, self.now())

    def _relay_receive(self, data: bytes, addr) -> None:
        if (addr[0], addr[1]) != self.server_udp:
            self.stats["not_ours"] += 1
            return
        try:
            t, key, rest = frames.parse(data)
        except frames.FrameError:
            self.stats["not_ours"] += 1
            return
        if t == frames.DATA:
            if key in self.peers:
                self._wg_receive(rest, RelayAddr(key))
        elif t == frames.REGISTERED:
            if not self.udp_ok:
                log.info("relay registration acknowledged: UDP to the server works")
            self.udp_ok = True
            self._registered_at = self.now()
        elif t == frames.REFUSED:
            log.debug("relay refused a packet for %s: %s", base64.b64encode(key).decode(),
                      frames.REASONS.get(rest[0], "?"))
        elif t == frames.CHALLENGE and self.udp_token is not None:
            self._relay_nonce = rest
            now = self.now()
            if now - self._challenged_at >= 1.0:     # answered at once, but at most once a second
                self._challenged_at = self._register_sent = now
                self._out.append((frames.register(self.public_key, self.udp_token, rest), self.server_udp))
                self._schedule_flush()

    def _disco_receive(self, data: bytes, addr) -> None:
        try:
            sender, msg = self.disco.open(data)
        except disco_mod.DiscoError:
            self.stats["disco_bad"] += 1
            return
        entry = self.peers.get(sender)
        if entry is not None and entry.path is not None:
            if self.guard.blocked(addr):
                self.stats["inside_tunnel"] += 1    # it came through our own tunnel: no path there
                return
            entry.path.receive(msg, addr, self.now())
            self._dirty_paths.add(entry)

    # ------------------------------------------------------------------ output
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dev = self.device
        now = self.now()
        while (ev := dev.next_event()) is not None:
            if type(ev) is PacketReceived:
                entry = self.peers.get(ev.public_key)
                pkt = ev.packet
                if pkt[0] == L2_FRAME:
                    if entry is not None and self.frame_sink is not None and entry.group_rx.take(now):
                        self._frames.append((entry.key, pkt[1:]))
                    else:
                        self.stats["group_capped"] += 1
                    continue
                if entry is None or len(pkt) < 20 or not entry.allows(pkt[12:16]):
                    self.stats["spoofed"] += 1  # cryptokey routing: a peer speaks only for its own IP
                    continue
                dst = pkt[16:20]
                if dst[0] >= 224 or dst == self.pool_broadcast:
                    if not self.is_group(dst) or not entry.group_rx.take(now):
                        self.stats["group_capped"] += 1
                        continue
                self._inner.append(pkt)
            elif type(ev) is EndpointChanged:
                entry = self.peers.get(ev.public_key)
                if entry is not None:
                    if (isinstance(ev.addr, RelayAddr) and entry.path is not None
                            and entry.path.current_path is not None):
                        dev.set_endpoint(entry.key, entry.path.current_path)  # keep the direct path
                    elif not isinstance(ev.addr, RelayAddr) and self.guard.blocked(ev.addr):
                        self.stats["inside_tunnel"] += 1    # came through our own tunnel: never roam there
                        dev.set_endpoint(entry.key, entry.endpoint)
                    else:
                        entry.endpoint = ev.addr
                        if (not isinstance(ev.addr, RelayAddr) and entry.path is not None
                                and ev.addr != entry.path.current_path):
                            # authenticated data from a new source (a rebound NAT): check both
                            entry.path.peer_seen_at(ev.addr, self.now())
                            self._dirty_paths.add(entry)
            elif type(ev) is HandshakeCompleted:
                entry = self.peers.get(ev.public_key)
                if entry is not None:
                    log.info("session with %s established (%s)", entry.name, _fmt(entry.endpoint))
            elif type(ev) is PeerUnreachable:
                entry = self.peers.get(ev.public_key)
                if entry is not None:
                    log.info("%s unreachable: handshakes unanswered", entry.name)
        if self._inner:
            inner, self._inner = self._inner, []
            self.inner_sink(inner)
        if self._frames:
            frames, self._frames = self._frames, []
            self.frame_sink(frames)
        out = self._out
        out.extend(dev.datagrams_to_send())
        if self._dirty_paths:
            self._paths_stale = True
        for entry in self._dirty_paths:
            path = entry.path
            out.extend(path.datagrams_to_send(now))
            while (pev := path.next_event()) is not None:
                new = pev.path if pev.path is not None else RelayAddr(entry.key)
                log.info("path to %s: %s (%s%s)", entry.name, _fmt(new), pev.reason,
                         f", {pev.rtt * 1000:.1f} ms" if pev.rtt is not None else "")
                entry.endpoint = new
                dev.set_endpoint(entry.key, new)
                self._bday_path_changed(entry.key, pev.path)
                self._seq_path_changed(entry.key, pev.path)
                if pev.path is None and pev.reason == "lost":
                    self.loop.call_soon(self.start_probe)  # a rebinding NAT: our public address may have moved
        self._dirty_paths.clear()
        if out:
            self._send_all(out)
            out.clear()
        self._arm_timer()

    def _send_all(self, items: list[tuple[bytes, object]]) -> None:
        batch = []
        for data, addr in items:
            if isinstance(addr, RelayAddr):
                if self.udp_ok and self.server_udp:
                    batch.append((frames.data(addr.key, data), self.server_udp))
                else:
                    self.stats["relay_tcp_tx"] += 1
                    self.send_control({"t": "relay", "id": 0, "to": base64.b64encode(addr.key).decode(),
                                       "data": base64.b64encode(data).decode()})
            elif self._via and addr in self._via:
                self._via[addr].send_batch([(data, addr)])
            else:
                batch.append((data, addr))
        if batch:
            batch = self.v6.send_own(batch)     # IPv6 addresses leave through the IPv6 socket
        if batch and self.udp:
            self.udp.send_batch(batch)

    # ------------------------------------------------------------------ timers
    def _arm_timer(self) -> None:
        if self._paths_stale:
            pt = [t for e in self.peers.values() if e.path is not None and (t := e.path.get_timer()) is not None]
            self._paths_at = min(pt) if pt else None
            self._paths_stale = False
        times = [t for t in (self.device.get_timer(), self._next_register(), self._next_probe, self._paths_at,
                             self._probe.get_timer() if self._probe else None, self._bday_timer(), self._seq_timer(),
                             self._portmap.get_timer() if self._portmap else None,
                             self.v6.timer())
                 if t is not None]
        at = max(min(times), self.now()) if times else None  # the device may ask for "at once" (-inf)
        if at == self._timer_at:
            return
        if self._timer:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer) if at is not None else None

    def _next_register(self) -> float | None:
        if self.server_udp is None or self.udp_token is None:
            return None
        return self._register_sent + (REGISTER_INTERVAL if self.udp_ok else 1.0)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.now()
        t = self.device.get_timer()
        if t is not None and t <= now:
            self.device.handle_timer(now)
        nr = self._next_register()
        if nr is not None and nr <= now:
            if self.udp_ok and now - self._registered_at > REGISTER_INTERVAL + REGISTER_TIMEOUT:
                log.warning("relay registration unanswered: using the control connection for relay")
                self.udp_ok = False
            self._register_sent = now
            self._out.append((frames.register(self.public_key, self.udp_token, self._relay_nonce), self.server_udp))
        if self._next_probe is not None and self._next_probe <= now:
            self.start_probe()
        pm = self._portmap
        if pm is not None and (t := pm.get_timer()) is not None and t <= now:
            pm.handle_timer(now)
            self._portmap_changed()
        probe = self._probe
        if probe is not None:
            t = probe.get_timer()
            if t is not None and t <= now:
                probe.handle_timer(now)
            self._out.extend(probe.datagrams_to_send(now))
            if probe.done:
                self._probe_finished()
        self._out.extend(self.v6.on_timer(now))
        if self._paths_at is not None and self._paths_at <= now:
            for entry in self.peers.values():
                if entry.path is None:
                    continue
                t = entry.path.get_timer()
                if t is not None and t <= now:
                    entry.path.handle_timer(now)
                    self._dirty_paths.add(entry)
            self._paths_stale = True
        if self._bday_check or self._bday_owner is not None or any(
                b.state == birthday.ACTIVE for b in self._bday.values()):
            self._bday_tick(now)
        if self._seq_check or self._seq_owner is not None or self._seq_easy:
            self._seq_tick(now)
        self._flush()

    def _publish_endpoints(self) -> None:
        nat = {k: v for k, v in self.nat_summary().items() if k in ("mapping", "allocation", "port_delta")}
        if self.server_udp is not None and ":" in self.server_udp[0]:
            nat = {}   # classified over IPv6: says nothing about an IPv4 NAT (birthday punching)
        nat["birthday"] = self.hard_nat     # peers behind the other kind of NAT need not probe in vain
        if (seq := self._seq_published()) is not None:
            nat["seq"] = seq
        self.send_control({"t": "endpoints", "candidates": self.local_candidates(), "nat": nat})

    # ------------------------------------------------------------------ port mapping (overlay.nat.portmap)
    def _portmap_changed(self) -> None:
        pm = self._portmap
        self._out.extend(pm.datagrams_to_send(self.now()))
        for job in pm.jobs_to_run():
            self._igd_submit(job)
        if pm.changed:
            pm.changed = False
            m = pm.mapping
            log.info("port mapping: %s", f"router maps {m[1][0]}:{m[1][1]} to UDP port {self.port} "
                     f"({portmap.LABEL[m[0]]})" if m else "none (" + "; ".join(
                         f"{portmap.LABEL[p]}: {c.error or 'no answer'}" for p, c in pm.clients.items()) + ")")
            if self.srflx:
                self._publish_endpoints()
                self.on_endpoints()

    def _igd_submit(self, job: tuple):
        """Run a UPnP job on the worker thread; its result comes back on the loop."""
        from concurrent.futures import ThreadPoolExecutor
        from overlay.nat.upnp import Igd
        if self._igd_pool is None:
            self._igd, self._igd_pool = Igd(), ThreadPoolExecutor(1, thread_name_prefix="upnp")
        fut = self._igd_pool.submit(self._igd.run, job)
        loop = self.loop

        def back_on_the_loop(f) -> None:
            try:
                loop.call_soon_threadsafe(self._igd_done, job, f)
            except RuntimeError:     # the loop closed while the job ran (the daemon is gone)
                pass
        fut.add_done_callback(back_on_the_loop)
        return fut

    def _igd_done(self, job: tuple, fut) -> None:
        if self._portmap is None or fut.cancelled():
            return
        self._portmap.job_done(job, fut.result(), self.now())
        self._portmap_changed()
        self._schedule_flush()

    def _portmap_close(self) -> None:
        """Remove our mappings from the router: PCP / NAT-PMP datagrams, and UPnP's deletion on
        its thread, waited for at most 3 s (the daemon is exiting)."""
        pm, self._portmap = self._portmap, None
        if pm is None:
            return
        dgrams, jobs = pm.delete()
        if dgrams and self.udp is not None:
            self.udp.send_batch(dgrams)
        if self._igd_pool is not None:
            futs = [self._igd_pool.submit(self._igd.run, j) for j in jobs]
            for f in futs:
                try:
                    error = f.result(timeout=3.0).get("error")
                except Exception as e:   # timeout: the router keeps the mapping until its lease ends
                    error = str(e) or type(e).__name__
                if error:
                    log.warning("UPnP: could not remove the mapping: %s", error)
            self._igd_pool.shutdown(wait=False, cancel_futures=True)
            self._igd.close()       # the worker process (a job still running there ends with it)

    def port_mapped(self) -> tuple[str, int] | None:
        """The router's mapping of our port, if it is usable: its external address must be the one
        the server sees (a router behind another NAT, e.g. carrier-grade, maps uselessly)."""
        pm = self._portmap
        return pm.usable(self.srflx[0] if self.srflx else None) if pm is not None else None

    def port_mapping_summary(self) -> dict | None:
        """What each port-mapping protocol answered and which mapping is used (for ``netcheck``);
        None when none was tried."""
        pm = self._portmap
        return pm.summary(self.srflx[0] if self.srflx else None) if pm is not None else None

    # ------------------------------------------------------------------ birthday punching
    def _bday_role(self, key: bytes) -> str | None:
        n, peer = self.nat, self._bday_nat.get(key, {})
        if n is None or not n.udp or peer.get("birthday") is False:   # the peer opted out
            return None
        return birthday.role(n.mapping, n.allocation, peer.get("mapping"), peer.get("allocation"))

    def _bday_timer(self) -> float | None:
        times = list(self._bday_check.values())
        times += [t for b in self._bday.values() if (t := b.get_timer()) is not None]
        return min(times) if times else None

    def _bday_target(self, entry: PeerEntry, role: str) -> tuple | None:
        """Hard role: the easy side's server-reflexive address; easy role: the hard side's (its IP)."""
        for c in entry.path.remote_candidates:
            if c.kind == "srflx" and ":" not in c.addr[0]:
                return c.addr
        return None

    def _bday_tick(self, now: float) -> None:
        for key, at in list(self._bday_check.items()):
            if at > now:
                continue
            del self._bday_check[key]
            entry = self.peers.get(key)
            if entry is None or entry.path is None or entry.path.current_path is not None or not self.hard_nat:
                continue   # never while a direct path works
            role = self._bday_role(key)
            if role is None or (target := self._bday_target(entry, role)) is None:
                continue
            b = self._bday.setdefault(key, birthday.BirthdayPunch(self.birthday_config))
            if not b.may_start(now) or (role == birthday.HARD and self._bday_owner is not None):
                continue
            n = b.start(role, target, now)
            if role == birthday.HARD:
                self._bday_owner = key
                self._open_bday_socks(n)
            log.info("birthday punching toward %s as the %s side (%s)", entry.name, role,
                     f"{n} sockets" if n else f"{self.birthday_config.probes} probes")
        for key, b in list(self._bday.items()):
            if b.state != birthday.ACTIVE:
                continue
            entry = self.peers.get(key)
            t = b.get_timer()
            if t is None or t > now or entry is None:
                continue
            due = b.due(now)
            if b.role == birthday.EASY and due:
                dg = entry.path.spray_ping(due[0], now)
                self._out.extend((dg, a) for a in due)
            elif b.role == birthday.HARD and due:
                dg = entry.path.spray_ping(b.target, now)
                for sock in self._bday_socks:
                    sock.send_batch([(dg, b.target)])
            if b.state != birthday.ACTIVE:
                log.info("birthday punching toward %s: no hit after %d probes", entry.name, b.probes_sent)
                if key == self._bday_owner:
                    self._close_bday_socks()

    def _open_bday_socks(self, n: int) -> None:
        for _ in range(n):
            try:
                sock = bind_udp("0.0.0.0", 0, rcvbuf=1 << 16, sndbuf=1 << 16)
            except OSError as e:    # out of descriptors or ports: go with what we have
                log.warning("birthday punching: %d sockets only (%s)", len(self._bday_socks), e)
                break
            u = UdpSocket(sock, lambda view, addr: None, on_batch=self._flush, loop=self.loop, gro=False, gso=False)
            u._on_datagram = lambda view, addr, u=u: self._on_bday_datagram(u, view, addr)
            self._bday_socks.append(u)

    def _close_bday_socks(self) -> None:
        socks, self._bday_socks = self._bday_socks, []
        self._bday_owner = None
        for s in socks:
            s.close()

    def _on_bday_datagram(self, sock: UdpSocket, view: memoryview, addr) -> None:
        """A datagram on one of the hard side's extra sockets: only the peer's discovery message from
        the target address counts (a hit); that socket then carries everything to that address."""
        key = self._bday_owner
        b = self._bday.get(key) if key is not None else None
        src = (addr[0], addr[1])
        if b is None or b.state != birthday.ACTIVE or src != tuple(b.target) or view[:4] != disco_mod.MAGIC:
            self.stats["not_ours"] += 1
            return
        entry = self.peers.get(key)
        if entry is None or (msg := self._disco_from(key, view)) is None:
            return
        self._bday_socks.remove(sock)
        self._adopt_winner(key, src, sock)
        b.hit(self.now())
        log.info("birthday punching toward %s: hit on local port %d after %.2f s", entry.name,
                 sock.sock.getsockname()[1], b.last_time_to_hit)
        self._close_bday_socks()
        entry.path.receive(msg, src, self.now())
        self._dirty_paths.add(entry)

    def _disco_from(self, key: bytes, view: memoryview):
        """The discovery message in ``view`` if it opens and comes from peer ``key``, else None
        (counted)."""
        try:
            sender, msg = self.disco.open(bytes(view))
        except disco_mod.DiscoError:
            self.stats["disco_bad"] += 1
            return None
        if sender != key:
            self.stats["not_ours"] += 1
            return None
        return msg

    def _adopt_winner(self, key: bytes, src: tuple, sock: UdpSocket) -> None:
        """A hard-NAT attempt's socket got the peer's message from ``src``: from now on it carries
        everything to that address, like the main socket (one winner per peer)."""
        self._drop_winner(key)
        sock._on_datagram = self._on_datagram
        self._via[src] = sock
        self._winner[key] = (src, sock)

    def _bday_path_changed(self, key: bytes, path) -> None:
        b = self._bday.get(key)
        if path is not None and b is not None and b.state == birthday.ACTIVE:
            b.hit(self.now())   # direct: this attempt (or ordinary punching) won
            if key == self._bday_owner:
                self._close_bday_socks()
        w = self._winner.get(key)
        if w is not None and path != w[0]:
            self._drop_winner(key)

    def _drop_winner(self, key: bytes) -> None:
        w = self._winner.pop(key, None)
        if w is not None:
            self._via.pop(w[0], None)
            w[1].close()

    def _bday_forget(self, key: bytes) -> None:
        self._bday_check.pop(key, None)
        self._bday_nat.pop(key, None)
        b = self._bday.pop(key, None)
        if b is not None:
            b.abort(self.now())
        if key == self._bday_owner:
            self._close_bday_socks()
        self._drop_winner(key)

    def birthday_stats(self) -> dict:
        out = {"enabled": self.hard_nat, "attempts": 0, "hits": 0, "probes": 0, "sockets": 0,
               "open_sockets": len(self._bday_socks) + len(self._winner)}
        for b in self._bday.values():
            for k in ("attempts", "hits", "probes", "sockets"):
                out[k] += b.stats()[k]
        return out

    # ------------------------------------------------------------------ sequential <-> sequential / easy
    def _seq_applies(self, key: bytes) -> str | None:
        """Our ``seqpunch.role`` toward this peer, or None."""
        n, peer = self.nat, self._bday_nat.get(key, {})
        if not self.hard_nat or n is None or not n.udp or peer.get("birthday") is False or not self._probe_servers:
            return None
        return seqpunch.role(n.mapping, n.allocation, peer.get("mapping"), peer.get("allocation"))

    def _seq_for(self, key: bytes, role: str) -> seqpunch.SeqPunch:
        s = self._seq.get(key)
        if s is None or (s.role != role and s.state == seqpunch.IDLE):
            s = self._seq[key] = seqpunch.SeqPunch(self.seq_config, lower=self.public_key < key, role=role)
        return s

    def _seq_on_punch(self, key: bytes, entry: PeerEntry, nat: dict) -> None:
        """An introduction: take the peer's published base for our attempt, join the peer's attempt,
        or schedule one of our own."""
        role = self._seq_applies(key)
        if entry.path.current_path is not None or key in self._winner or role is None:
            return    # direct, or a hit's path being confirmed
        now = self.now()
        s = self._seq_for(key, role)
        base = nat.get("seq")
        if not isinstance(base, dict) or base.get("for") != base64.b64encode(self.public_key).decode():
            base = None
        if role == seqpunch.EASY:   # the sequential side measured for us: spray its window from our socket
            if base is not None and s.state == seqpunch.IDLE and s.may_join(now):
                s.start(now, join=True)
                self._seq_easy.add(key)
            if base is not None and s.state == seqpunch.READY:
                try:
                    s.peer_ready(int(base["next"]), int(base["step"]), now)
                except (KeyError, TypeError, ValueError):
                    return
                self._seq_send(key, now)
            return
        if base is not None and s.state == seqpunch.IDLE and self._seq_owner is None and s.may_join(now):
            self._seq_start(key, entry, now, join=True)     # the peer is measuring or spraying: at once
        if base is not None and s.state in (seqpunch.MEASURING, seqpunch.READY):
            try:
                s.peer_ready(int(base["next"]), int(base["step"]), now)
            except (KeyError, TypeError, ValueError):
                return
            self._seq_send(key, now)
        elif s.state == seqpunch.IDLE:
            delay = self.seq_config.easy_delay if role == seqpunch.SEQ else self.seq_config.delay
            self._seq_check.setdefault(key, now + delay)

    def _seq_start(self, key: bytes, entry: PeerEntry, now: float, join: bool = False) -> None:
        """Open the attempt's fresh socket and measure our next port from it."""
        try:
            sock = bind_udp("0.0.0.0", 0, rcvbuf=1 << 16, sndbuf=1 << 16)
        except OSError as e:
            log.warning("sequential punching: no socket (%s)", e)
            return
        s = self._seq[key]
        s.start(now, join=join)
        if s.role == seqpunch.SEQ:      # the easy peer's one port: its server-reflexive address
            if (target := self._bday_target(entry, birthday.EASY)) is None:
                s.abort(now)
                sock.close()
                return
            s.peer_ready(target[1], 0, now)
        self._seq_owner = key
        u = UdpSocket(sock, lambda view, addr: None, on_batch=self._flush, loop=self.loop, gro=False, gso=False)
        u._on_datagram = lambda view, addr, u=u: self._on_seq_datagram(u, view, addr)
        self._seq_sock = u
        tx = self._seq_stun = stun.StunTransaction(self._probe_servers[0], now, rto=0.3, rc=4, rm=4)
        u.send_batch(tx.datagrams_to_send(now))
        log.info("sequential punching toward %s: measuring our next port%s", entry.name,
                 " (the peer started)" if join else "")
        self._schedule_flush()

    def _seq_published(self) -> dict | None:
        s = self._seq.get(self._seq_owner) if self._seq_owner is not None else None
        if s is None or s.base is None or s.state == seqpunch.IDLE:
            self._seq_pub = None
        else:
            self._seq_pub = {"for": base64.b64encode(self._seq_owner).decode(), "next": s.base[0], "step": s.base[1]}
        return self._seq_pub

    def _seq_timer(self) -> float | None:
        if not self._seq_check and self._seq_owner is None and not self._seq_easy:
            return None     # nothing pending (the usual case: computed on every flush, no allocation)
        times = list(self._seq_check.values())
        times += [t for s in self._seq.values() if (t := s.get_timer()) is not None]
        if self._seq_stun is not None and (t := self._seq_stun.get_timer()) is not None:
            times.append(t)
        return min(times) if times else None

    def _seq_tick(self, now: float) -> None:
        for key, at in list(self._seq_check.items()):
            if at > now:
                continue
            del self._seq_check[key]
            entry = self.peers.get(key)
            if entry is None or entry.path is None or entry.path.current_path is not None or key in self._winner:
                continue   # never while a direct path works (or a hit's is being confirmed)
            if (role := self._seq_applies(key)) is None or role == seqpunch.EASY:
                continue
            if self._seq_owner is not None:     # one attempt per node at a time: this one waits
                self._seq_check[key] = now + self.seq_config.delay
                continue
            s = self._seq_for(key, role)
            if s.may_start(now):
                self._seq_start(key, entry, now)
            elif (at := s.retry_at()) is not None:
                self._seq_check[key] = at           # backing off: then
        tx = self._seq_stun
        if tx is not None and self._seq_sock is not None:
            if (t := tx.get_timer()) is not None and t <= now:
                tx.handle_timer(now)
            self._seq_sock.send_batch(tx.datagrams_to_send(now))
            if tx.done and tx.result is None:
                self._seq_stun = None   # no answer: the attempt times out
        for key in list(self._seq):
            self._seq_send(key, now)

    def _seq_send(self, key: bytes, now: float) -> None:
        s, entry = self._seq.get(key), self.peers.get(key)
        if s is None or s.state == seqpunch.IDLE:
            return
        if entry is None or entry.path is None:
            s.abort(now)
        elif (t := s.get_timer()) is not None and t <= now:
            ports = s.due(now)
            target = self._bday_target(entry, birthday.EASY)
            if ports and target is not None and s.role == seqpunch.EASY:
                dg = entry.path.spray_ping((target[0], ports[0]), now)
                self._out.extend((dg, (target[0], p)) for p in ports)
                if s.bursts == 1:
                    log.info("sequential punching with %s: %d pings at %s:%d.. from our socket", entry.name,
                             len(ports), target[0], ports[0])
            elif ports and target is not None and key == self._seq_owner and self._seq_sock is not None:
                dg = entry.path.spray_ping((target[0], ports[0]), now)
                self._seq_sock.send_batch([(dg, (target[0], p)) for p in ports])
                if s.bursts == 1:
                    log.info("sequential punching toward %s: %d pings at %s:%d.., our next port %d", entry.name,
                             len(ports), target[0], ports[0], s.base[0] if s.base else 0)
        if s.state == seqpunch.IDLE and key == self._seq_owner:
            log.info("sequential punching toward %s: no hit", entry.name if entry else "?")
            self._seq_close()
        if s.state == seqpunch.IDLE:
            self._seq_easy.discard(key)
        if (s.state == seqpunch.IDLE and entry is not None and entry.path is not None
                and entry.path.current_path is None and (at := s.retry_at()) is not None):
            self._seq_check.setdefault(key, at)     # still relayed: again with fresh port data

    def _on_seq_datagram(self, sock: UdpSocket, view: memoryview, addr) -> None:
        """The fresh socket: our STUN answer (the measurement), or the peer's discovery message
        from one of the ports we aimed at (a hit: the socket then carries that path)."""
        key = self._seq_owner
        s = self._seq.get(key) if key is not None else None
        src = (addr[0], addr[1])
        if s is None or sock is not self._seq_sock:
            self.stats["not_ours"] += 1
            return
        now = self.now()
        if stun.is_stun(view):
            tx = self._seq_stun
            if tx is not None and tx.receive(bytes(view), src, now) and tx.result is not None:
                self._seq_stun = None
                step = self.nat.delta if self.nat is not None else 0
                s.measured(tx.result[1], step, now)
                if s.base is not None:
                    self._publish_endpoints()
                    self.send_control({"t": "punch", "peer": base64.b64encode(key).decode()})
                    self._seq_send(key, now)
                self._schedule_flush()
            return
        entry = self.peers.get(key)
        if (view[:4] != disco_mod.MAGIC or s.state != seqpunch.SPRAYING or entry is None
                or (target := self._bday_target(entry, birthday.EASY)) is None
                or src[0] != target[0] or src[1] not in s.targets):
            self.stats["not_ours"] += 1
            return
        if (msg := self._disco_from(key, view)) is None:
            return
        self._seq_sock = None
        self._seq_close()
        self._adopt_winner(key, src, sock)
        s.hit(now)
        log.info("sequential punching toward %s: hit %s:%d on local port %d after %.2f s", entry.name, src[0],
                 src[1], sock.sock.getsockname()[1], s.last_time_to_hit or 0.0)
        entry.path.receive(msg, src, now)
        self._dirty_paths.add(entry)
        self._schedule_flush()

    def _seq_path_changed(self, key: bytes, path) -> None:
        s = self._seq.get(key)
        if path is not None and s is not None and s.state != seqpunch.IDLE:
            s.hit(self.now())
            self._seq_easy.discard(key)
            if key == self._seq_owner:
                self._seq_close()

    def _seq_close(self) -> None:
        """End the node's attempt: close its socket (unless a hit took it) and withdraw our base."""
        sock, self._seq_sock = self._seq_sock, None
        self._seq_owner = None
        self._seq_stun = None
        if sock is not None:
            sock.close()
        if self._seq_pub is not None and self.srflx and self.loop is not None:
            self._publish_endpoints()

    def _seq_forget(self, key: bytes) -> None:
        self._seq_check.pop(key, None)
        self._seq_easy.discard(key)
        s = self._seq.pop(key, None)
        if s is not None:
            s.abort(self.now())
        if key == self._seq_owner:
            self._seq_close()

    def sequential_stats(self) -> dict:
        out = {"enabled": self.hard_nat, "attempts": 0, "hits": 0, "probes": 0, "mappings": 0}
        for s in self._seq.values():
            for k in ("attempts", "hits", "probes", "mappings"):
                out[k] += s.stats()[k]
        return out

    # ------------------------------------------------------------------ status
    def peer_path(self, key: bytes) -> tuple[str | None, float | None]:
        entry = self.peers.get(key)
        if entry is None:
            return None, None
        if entry.endpoint is None:
            return None, None
        if isinstance(entry.endpoint, RelayAddr):
            return "relay", None
        if entry.path is None:
            return f"direct {_fmt(entry.endpoint)} (static)", None
        rtt = entry.path.rtt if entry.path.current_path == entry.endpoint else None
        return f"direct {_fmt(entry.endpoint)}", (rtt * 1000 if rtt is not None else None)

"""The node's data plane: one UDP socket, WireGuard sessions, path discovery, relay, netstack.

Datagrams on the single socket are sorted by ``nat.classify_datagram`` (the function the NAT
simulator uses too: WireGuard types 1-5 with three zero bytes, relay "OVR", discovery "OVD", the
router's port-mapping answers, STUN with its magic cookie) and fed to the sans-I/O cores:
``wire.Device`` (sessions), ``nat.PeerPath`` per peer (probing, choosing, keeping alive a direct
path), and the parts composed here, each holding its own state:

- ``peers.PeerTable``: the peers, cryptokey routing, the group (broadcast) cap;
- ``server_path.ServerPath``: relay registration and framing, STUN probing of our NAT;
- ``turn_path.TurnPath``: the relay through a TURN server, when the server names one;
- ``portmap_glue.PortMapGlue``: port mapping on the router;
- ``hardnat.HardNat``: birthday and sequential punching through hard NATs;
- ``local_candidates``: the addresses we publish for peers to probe;
- ``ipv6.Ipv6Side``: the IPv6 socket and its addresses; ``tunnel_guard.TunnelGuard``.

This module keeps the socket demultiplexing, the flush (device events, path changes, the outgoing
batch) and the one timer. Inner packets go to the userspace stack (``netstack``) or a TUN/TAP
device and come back from it.

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
import logging
import socket
from typing import Callable

from overlay.iface.ethernet import L2_FRAME
from overlay.io.udp import UdpSocket, bind_udp
from overlay.nat import DISCO, PORTMAP, RELAY, STUN, WIREGUARD, birthday, classify_datagram, natpmp, portmap
from overlay.nat import disco as disco_mod
from overlay.nat.candidate import Candidate, format_addr, parse_addr
from overlay.nat.traversal import TraversalConfig
from overlay.node import ipv6, local_candidates
from overlay.node.hardnat import HardNat
from overlay.node.local_candidates import interface_addresses
from overlay.node.peers import PeerEntry, PeerTable, RelayAddr
from overlay.node.peers import fmt_endpoint as _fmt
from overlay.node.portmap_glue import PortMapGlue
from overlay.node.server_path import ServerPath
from overlay.node.state import Peer
from overlay.node.tunnel_guard import TunnelGuard
from overlay.node.turn_path import TurnPath
from overlay.wire.device import Device
from overlay.wire.events import EndpointChanged, HandshakeCompleted, PacketReceived, PeerUnreachable

log = logging.getLogger("overlay.dataplane")

INNER_MTU = 1380
"""Largest inner IP packet: 1380 + 32 (WireGuard) + 37 (relay framing) + 8 (UDP) + 20 (IPv4) = 1477,
under the 1500 of an Ethernet path; a TAP frame adds its 14-byte header and the inner type byte."""


class DataPlane:
    def __init__(self, private_key: bytes, *, port: int = 0, keepalive: float = 25.0,
                 send_control: Callable[[dict], None] = lambda msg: None, hard_nat: bool = True,
                 birthday_config: birthday.BirthdayConfig | None = None,
                 port_mapping: tuple[str, ...] = portmap.PROTOCOLS):
        self.private_key = private_key
        self.device = Device(private_key)
        self.public_key = self.device.public_key
        self.disco = disco_mod.DiscoCodec(private_key, accept_sender=lambda k: k in self.table.peers)
        self.config = TraversalConfig(keepalive_interval=keepalive)
        self.port = port
        self.magic_port = port != 0   # a fixed port was asked for: worth advertising as forwarded
        self.send_control = send_control
        self.stats = {"not_ours": 0, "spoofed": 0, "no_route": 0, "disco_bad": 0, "relay_tcp_tx": 0,
                      "group_capped": 0, "inside_tunnel": 0}
        self.udp: UdpSocket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._out: list[tuple[bytes, object]] = []      # datagrams for the next flush (never replaced)
        self._dirty_paths: set[PeerEntry] = set()
        # earliest discovery timer over all peers; only discovery input or timers move it, so it is
        # recomputed then, not on every data packet
        self._paths_at: float | None = None
        self._paths_stale = True
        # earliest timer of every part but the device (server, probes, paths, hard NAT, port
        # mapping, IPv6, TURN): only recomputed after something other than WireGuard traffic ran
        # (``_arm_timer``)
        self._others_at: float | None = None
        self._others_stale = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._delivering = False  # inside _flush handing inner packets over: it sends what they cause
        self.inner_sink: Callable[[list[bytes]], None] = lambda packets: None
        # Ethernet frames from TAP members, (key, frame): only a TAP node sets this
        self.frame_sink: Callable[[list[tuple[bytes, bytes]]], None] | None = None
        self.own_ifaces: tuple[str, ...] = ()
        self._frames: list[tuple[bytes, bytes]] = []
        self.on_endpoints: Callable[[], None] = lambda: None  # our candidates changed: re-introduce
        self._inner: list[bytes] = []
        # addresses whose outer datagrams would enter our own tunnel (``tunnel_guard``): never a path
        self.guard = TunnelGuard(lambda: self.loop.time() if self.loop else 0.0,
                                 lambda addr: self._local_toward(addr)[0])
        self.guard.on_change = self._guard_changed
        self.table = PeerTable(self.device, self.disco, self.config, self.guard.blocked, self.stats)
        self.server = ServerPath(self.public_key, now=self.now, out=self._out, schedule_flush=self._schedule_flush,
                                 send_control=self._send_control, on_public=self._public_changed, stats=self.stats)
        # mapping of our port on the router (PCP, NAT-PMP, UPnP IGD; not on loopback)
        self.port_mapping = port_mapping
        self.portmap = PortMapGlue(port_mapping, now=self.now, out=self._out, schedule_flush=self._schedule_flush,
                                   on_changed=self._mapping_changed, loop=lambda: self.loop)
        self.hard_nat = hard_nat
        self.hardnat = HardNat(self, hard_nat, birthday_config or birthday.BirthdayConfig())
        # the relay through a TURN server (``turn_path``): used before the built-in one when ready
        self.turn = TurnPath(now=self.now, out=self._out, schedule_flush=self._schedule_flush,
                             on_relayed=self._public_changed)
        # IPv6 (``overlay.node.ipv6``): a second socket beside the IPv4 one, and STUN in the
        # other address family than ``server_udp``'s
        self.v6 = ipv6.Ipv6Side()

    # the parts' state other modules read
    peers = property(lambda self: self.table.peers)
    by_vip = property(lambda self: self.table.by_vip)
    routes = property(lambda self: self.table.routes)
    pool = property(lambda self: self.table.pool)
    pool_broadcast = property(lambda self: self.table.pool_broadcast)
    server_udp = property(lambda self: self.server.server_udp)
    server_is_loopback = property(lambda self: self.server.server_is_loopback)
    udp_ok = property(lambda self: self.server.udp_ok)
    srflx = property(lambda self: self.server.srflx)
    nat = property(lambda self: self.server.nat)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = bind_udp("0.0.0.0", self.port)
        self.port = sock.getsockname()[1]
        self.udp = UdpSocket(sock, self._on_datagram, on_batch=self._flush_wire, loop=self.loop)
        log.info("data plane on UDP port %d", self.port)
        self.v6.open(self.port, self._on_datagram, self._flush_wire, self.loop)

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        self.hardnat.close()
        if self.udp is not None and (bye := self.turn.close()):
            self.udp.send_batch(bye)        # Deallocate
        self.portmap.close(self.udp.send_batch if self.udp is not None else None)
        if self.udp:
            self.udp.close()
        self.v6.close()

    def now(self) -> float:
        return self.loop.time()

    def _send_control(self, msg: dict) -> None:
        self.send_control(msg)

    # ------------------------------------------------------------------ configuration from the control plane
    def set_server(self, host: str, udp_port: int, token: bytes, stun_ports: list[int] | None = None,
                   stun_alt_ip: str | None = None, udp_addrs: list[str] | None = None) -> None:
        """``host``: the address the control connection reached (relay and NAT probe go there);
        ``udp_addrs``: the server's UDP endpoints it announced (one of the other address family is
        used for STUN: the node's public address in that family)."""
        server = self.server
        self._others_stale = True     # the registration's and the probes' timers (``_arm_timer``)
        if (ip := server.resolve(host, udp_port)) is None:
            return
        self.v6.set_server(host, ip, udp_port, udp_addrs or [], server.server_is_loopback, self.own_ifaces)
        server.set_token(token)
        if (self.portmap.mapper is None and self.port_mapping and not server.server_is_loopback
                and (gw := natpmp.default_gateway())):
            self.portmap.start(gw, self._local_toward((gw, natpmp.PORT))[0], self.port)
        server.set_probe_servers(ip, udp_port, stun_ports, stun_alt_ip)
        self.start_probe()

    def start_probe(self) -> asyncio.Future:
        """(Re)learn our public address and NAT behaviour from the server's STUN ports."""
        self._others_stale = True
        if out := self.v6.start_stun(self.now()):
            self._out.extend(out)
            self._schedule_flush()
        fut, started = self.server.start_probe(self.loop, self._local_toward_server)
        if started:
            self._on_timer()
        return fut

    def _local_toward_server(self) -> tuple[str, int]:
        return self._local_toward(self.server.server_udp)

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

    def _public_changed(self) -> None:
        """The server sees us at a new address."""
        self._publish_endpoints()
        self.on_endpoints()

    def _mapping_changed(self) -> None:
        """The router's mapping of our port changed."""
        if self.server.srflx:
            self._publish_endpoints()
            self.on_endpoints()

    def local_candidates(self) -> list[dict]:
        """Our candidates (``local_candidates.gather``); the interfaces read through this module's
        ``interface_addresses``."""
        loopback = self.server.server_is_loopback
        lan = ["127.0.0.1"] if loopback else interface_addresses(self.own_ifaces, self.table.pool)
        mapped = self.port_mapped() if self.server.srflx else None
        return local_candidates.gather(self.port, lan, srflx=self.server.srflx, nat=self.server.nat, mapped=mapped,
                                       magic_port=self.magic_port, inside=self.guard.inside, parse=parse_addr,
                                       ipv6=[] if loopback else self.v6.candidates(self.own_ifaces))

    def _publish_endpoints(self) -> None:
        nat = {k: v for k, v in self.nat_summary().items() if k in ("mapping", "allocation", "port_delta")}
        if self.server.server_udp is not None and ":" in self.server.server_udp[0]:
            nat = {}   # classified over IPv6: says nothing about an IPv4 NAT (birthday punching)
        nat = self.hardnat.advertise(nat)
        if self.turn.published is not None:
            nat["turn"] = format_addr(self.turn.published)     # our relayed address (``turn_path``)
        self.send_control({"t": "endpoints", "candidates": self.local_candidates(), "nat": nat})

    def set_turn(self, creds: dict | None) -> None:
        """The server's TURN server and our credentials for it (None: it names none)."""
        self._others_stale = True
        self.turn.configure(creds)

    def ipv6_summary(self) -> dict:
        return self.v6.summary(self.server.server_udp, self.server.srflx, self.own_ifaces)

    def nat_summary(self) -> dict:
        return self.server.nat_summary()

    def port_mapped(self) -> tuple[str, int] | None:
        """The router's mapping of our port, if usable (its external address is the one the server sees)."""
        return self.portmap.mapped(self.server.srflx[0] if self.server.srflx else None)

    def port_mapping_summary(self) -> dict | None:
        """What each port-mapping protocol answered (for ``netcheck``); None when none was tried."""
        return self.portmap.summary(self.server.srflx[0] if self.server.srflx else None)

    def update_peers(self, peers: dict[bytes, Peer]) -> None:
        """``peers``: key -> ``Peer``: everyone sharing a network with us."""
        for entry in self.table.update(peers):
            self.hardnat.forget(entry.key)
            self.turn.forget_peer(entry.key)
            self._dirty_paths.discard(entry)
        # peers on another instance of the server's deployment: the relay their pair uses
        self.server.set_peer_relays({k: p.relay for k, p in peers.items() if p.relay is not None and p.online})
        self._paths_stale = True
        self._schedule_flush()

    def add_static_peer(self, key: bytes, *, name: str, endpoint: tuple[str, int] | None,
                        allowed_ips: list[str], persistent_keepalive: float | None = None) -> None:
        """A plain WireGuard peer from the configuration (``PeerTable.add_static``)."""
        self.table.add_static(key, name=name, endpoint=endpoint, allowed_ips=allowed_ips,
                              persistent_keepalive=persistent_keepalive)
        if self.loop is not None:
            self._schedule_flush()

    def route_peer(self, ip: str) -> PeerEntry | None:
        """The member or static peer packets to ``ip`` (outside the pool) go to."""
        try:
            return self.table.route(socket.inet_aton(ip))
        except OSError:
            return None

    def punch(self, ev: dict) -> None:
        """The server introduced us to a peer: probe its candidates now."""
        try:
            key = base64.b64decode(ev["peer"])
        except (KeyError, ValueError):
            return
        entry = self.table.peers.get(key)
        if entry is None or entry.path is None:
            return
        cands = []
        v6 = self.v6.usable(self.server.server_udp, self.own_ifaces)
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
            self.hardnat.on_punch(key, entry, ev["nat"])
        if self.turn.configured:
            self.turn.set_peer(key, self._turn_addr(ev.get("nat")))
        self._dirty_paths.add(entry)
        self._schedule_flush()

    @staticmethod
    def _turn_addr(nat) -> tuple[str, int] | None:
        """The relayed address a peer published (``nat.turn``), if any and well-formed."""
        text = nat.get("turn") if isinstance(nat, dict) else None
        try:
            return parse_addr(text) if isinstance(text, str) and len(text) <= 64 else None
        except ValueError:
            return None

    def relay_from_tcp(self, ev: dict) -> None:
        """A relayed WireGuard packet that reached us over the control connection."""
        if (got := self.server.relay_from_tcp(ev)) is not None and got[0] in self.table.peers:
            self.device.receive(got[1], RelayAddr(got[0]), self.now())
            self._flush()

    # ------------------------------------------------------------------ inner packets
    def set_pool(self, pool: str | None) -> None:
        self.table.set_pool(pool)
        self.guard.set_pool(self.table.pool)

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
        for entry in self.table.peers.values():
            if entry.path is not None and entry.path.drop_blocked(now):
                self._dirty_paths.add(entry)
        self._schedule_flush()

    def is_group(self, dst: bytes) -> bool:
        """Multicast (224.0.0.0/4), limited broadcast or the pool's broadcast address."""
        return self.table.is_group(dst)

    def send_packets(self, packets: list[bytes]) -> None:
        """Outbound inner IPv4 packets (from the netstack or a TUN/TAP device), sent at once
        (``PeerTable.send_packets``): callers hand over whole batches, and waiting for another loop
        turn would only add latency. Answers made while ``_flush`` delivers inner packets (the
        netstack's ACKs) go out with that flush's batch."""
        self.table.send_packets(packets, self.now())
        if not self._delivering:
            self._flush_wire()

    def send_frames(self, frames: list[tuple[bytes | None, bytes]]) -> None:
        """Ethernet frames from our TAP device: (key, frame) to one TAP member, (None, frame) to all."""
        self.table.send_frames(frames, self.now())
        self._flush()

    # ------------------------------------------------------------------ input
    def _on_datagram(self, view: memoryview, addr) -> None:
        """One datagram of a batch (the socket calls ``_flush_wire`` after the batch): anything
        but WireGuard may move a part's timer, so it marks them for ``_arm_timer``."""
        if self.turn.server is not None and self.turn.is_server(addr):
            self._others_stale = True
            # before the classifier: ChannelData's first bytes look like other protocols' magic
            if (got := self.turn.receive(view, self.now())) is not None and got[0] in self.table.peers:
                self.device.receive(got[1], RelayAddr(got[0]), self.now())
            return
        kind = classify_datagram(view, addr, self.portmap.gateway)
        if kind is WIREGUARD:
            self.device.receive(view, addr, self.loop.time())
            return
        self._others_stale = True
        if kind is RELAY:
            if (got := self.server.relay_receive(bytes(view), addr)) is not None and got[0] in self.table.peers:
                self.device.receive(got[1], RelayAddr(got[0]), self.now())
        elif kind is DISCO:
            self._disco_receive(bytes(view), (addr[0], addr[1]))
        elif kind is PORTMAP:
            self.portmap.receive(bytes(view), (addr[0], addr[1]), self.now())
        elif kind is STUN:
            now = self.now()
            if self.server.stun_receive(bytes(view), (addr[0], addr[1]), now):
                pass
            elif self.v6.receive_stun(bytes(view), (addr[0], addr[1]), now) and self.v6.changed:
                self.v6.changed = False
                if self.server.srflx:
                    self._publish_endpoints()
                    self.on_endpoints()
        else:
            self.stats["not_ours"] += 1

    def _disco_receive(self, data: bytes, addr) -> None:
        try:
            sender, msg = self.disco.open(data)
        except disco_mod.DiscoError:
            self.stats["disco_bad"] += 1
            return
        entry = self.table.peers.get(sender)
        if entry is not None and entry.path is not None:
            if self.guard.blocked(addr):
                self.stats["inside_tunnel"] += 1    # it came through our own tunnel: no path there
                return
            entry.path.receive(msg, addr, self.now())
            self._dirty_paths.add(entry)

    # ------------------------------------------------------------------ output
    def _schedule_flush(self) -> None:
        self._others_stale = True     # a part has output or a new timer (the parts call this)
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Flush after anything (a part's input, a timer, configuration): every timer is recomputed."""
        self._others_stale = True
        self._flush_wire()

    def _flush_wire(self) -> None:
        """Flush after WireGuard traffic only (outbound inner packets; a batch of datagrams, whose
        other kinds ``_on_datagram`` marked): the parts' timers are recomputed only when marked."""
        self._flush_scheduled = False
        dev = self.device
        peers = self.table.peers
        while (ev := dev.next_event()) is not None:
            if type(ev) is PacketReceived:
                key, pkt = ev
                entry = peers.get(key)
                if pkt[0] == L2_FRAME:
                    if entry is not None and self.frame_sink is not None and entry.group_rx.take(self.now()):
                        self._frames.append((entry.key, pkt[1:]))
                    else:
                        self.stats["group_capped"] += 1
                    continue
                if entry is None or len(pkt) < 20 or not entry.allows(pkt[12:16]):
                    self.stats["spoofed"] += 1  # cryptokey routing: a peer speaks only for its own IP
                    continue
                if pkt[16] >= 224 or pkt[16:20] == self.table.pool_broadcast:
                    if not self.table.is_group(pkt[16:20]) or not entry.group_rx.take(self.now()):
                        self.stats["group_capped"] += 1
                        continue
                self._inner.append(pkt)
            elif type(ev) is EndpointChanged:
                entry = peers.get(ev.public_key)
                if entry is not None:
                    if isinstance(ev.addr, RelayAddr) and ev.addr.key != entry.key:
                        dev.set_endpoint(entry.key, entry.endpoint)     # relayed as another peer: never roam there
                    elif (isinstance(ev.addr, RelayAddr) and entry.path is not None
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
                entry = peers.get(ev.public_key)
                if entry is not None:
                    log.info("session with %s established (%s)", entry.name, _fmt(entry.endpoint))
            elif type(ev) is PeerUnreachable:
                entry = peers.get(ev.public_key)
                if entry is not None:
                    log.info("%s unreachable: handshakes unanswered", entry.name)
        if self._inner:
            inner, self._inner = self._inner, []
            self._delivering = True
            try:
                self.inner_sink(inner)
            finally:
                self._delivering = False
        if self._frames:
            frames, self._frames = self._frames, []
            self.frame_sink(frames)
        out = self._out
        out.extend(dev.datagrams_to_send())
        if self._dirty_paths:
            self._flush_paths(out)
        if out:
            self._send_all(out)
            out.clear()
        self._arm_timer()

    def _flush_paths(self, out: list) -> None:
        """Output and events of the peers' paths that had input or timers."""
        dev = self.device
        now = self.now()
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
                self.hardnat.path_changed(entry.key, pev.path)
                if pev.path is None:
                    self.turn.need()    # no direct path: relay through the TURN server, if there is one
                if pev.path is None and pev.reason == "lost":
                    self.loop.call_soon(self.start_probe)  # a rebinding NAT: our public address may have moved
        self._dirty_paths.clear()

    def _send_all(self, items: list[tuple[bytes, object]]) -> None:
        batch: list = []
        via = self.hardnat.via
        v6 = False      # an IPv6 address in the batch (or one the relays put there)
        v6_open = self.v6.udp is not None
        for item in items:
            addr = item[1]
            if isinstance(addr, RelayAddr):
                v6 = True
                if not self.turn.send(addr.key, item[0], batch):
                    self.server.relay_send(addr.key, item[0], batch)
            elif via and addr in via:
                via[addr].send_batch([item])
            else:
                if v6_open and not v6 and ":" in addr[0]:   # type: ignore[index]
                    v6 = True
                batch.append(item)
        if v6 and batch:
            batch = self.v6.send_own(batch)     # IPv6 addresses leave through the IPv6 socket
        if batch and self.udp:
            self.udp.send_batch(batch)

    # ------------------------------------------------------------------ timers
    def _arm_timer(self) -> None:
        """(Re)arm the one timer at the earliest deadline of the device and the parts.

        The parts' timers (everything but the device's) move only when a part runs: on a timer,
        on input other than WireGuard, on configuration, or when a part asks for a flush
        (``_schedule_flush``); all of these mark them stale, so WireGuard traffic alone reads only
        the device's timer. An armed timer earlier than needed is kept: firing early costs one
        ``_on_timer`` that finds nothing due (every part checks its own deadlines) and re-arms at
        the right time, far cheaper than moving the loop's timer on every packet, as the device's
        keepalive deadlines do."""
        if self._others_stale or self._paths_stale:
            if self._paths_stale:
                pt = [t for e in self.table.peers.values()
                      if e.path is not None and (t := e.path.get_timer()) is not None]
                self._paths_at = min(pt) if pt else None
                self._paths_stale = False
            server = self.server
            others = [t for t in (server.next_register(), server.next_probe, self._paths_at,
                                  server.probe.get_timer() if server.probe else None, self.hardnat.timer(),
                                  self.portmap.timer(), self.v6.timer(), self.turn.timer())
                      if t is not None]
            self._others_at = min(others) if others else None
            self._others_stale = False
        at = self.device.get_timer()
        others_at = self._others_at
        if at is None or (others_at is not None and others_at < at):
            at = others_at
        if at is None:
            return      # nothing to wake for; a timer still armed fires early, harmlessly
        armed = self._timer_at
        if armed is not None and armed <= at:
            return
        if at < (now := self.now()):
            at = now    # the device may ask for "at once" (-inf)
            if armed is not None and armed <= at:
                return
        if self._timer:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.now()
        t = self.device.get_timer()
        if t is not None and t <= now:
            self.device.handle_timer(now)
        self.server.register_tick(now)
        if self.server.next_probe is not None and self.server.next_probe <= now:
            self.start_probe()
        self.portmap.tick(now)
        self.turn.tick(now)
        self.server.probe_tick(now)
        self._out.extend(self.v6.on_timer(now))
        if self._paths_at is not None and self._paths_at <= now:
            for entry in self.table.peers.values():
                if entry.path is None:
                    continue
                t = entry.path.get_timer()
                if t is not None and t <= now:
                    entry.path.handle_timer(now)
                    self._dirty_paths.add(entry)
            self._paths_stale = True
        self.hardnat.tick(now)
        self._flush()

    # ------------------------------------------------------------------ status
    def peer_path(self, key: bytes) -> tuple[str | None, float | None]:
        path, rtt = self.table.path_of(key)
        if path == "relay" and self.turn.active(key):
            return f"turn {self.turn.label}", rtt
        return path, rtt

    def relays_summary(self) -> list[dict]:
        """Other server instances' relays this node registers at, for peers there (``server_path``)."""
        return self.server.foreign_summary()

    def turn_summary(self) -> dict | None:
        return self.turn.summary()

    def birthday_stats(self) -> dict:
        return self.hardnat.birthday.stats()

    def sequential_stats(self) -> dict:
        return self.hardnat.sequential.stats()

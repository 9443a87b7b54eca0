"""No path inside the node's own tunnel (overlay/node/tunnel_guard.py and its users), sans-I/O
and on loopback; the real case with TUN/TAP nodes is tests/lab/test_tunnel_loop_lab.py."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket

from tests.unit.nat.test_nat_traversal import Peer, confirm, events

from overlay import crypto
from overlay.iface.ethernet import ETH_IPV4
from overlay.nat import Candidate, DiscoCodec, PathChanged, PeerPath
from overlay.nat.candidate import LAN, SRFLX
from overlay.nat.disco import Ping, Pong
from overlay.nat.traversal import DIRECT, RELAY
from overlay.netstack.wire import (
    PROTO_TCP,
    PROTO_UDP,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
)
from overlay.node import dataplane as dataplane_mod
from overlay.node.dataplane import DataPlane
from overlay.node.kernel_device import KernelInterface
from overlay.node.state import Peer as PeerRecord
from overlay.node.tunnel_guard import (
    CACHE_TTL,
    CAUGHT_FOR,
    TunnelGuard,
    own_outer_destination,
)
from overlay.wire.device import Device

POOL = ipaddress.IPv4Network("100.64.0.0/10")
LAN77 = ipaddress.IPv4Network("192.168.77.0/24")
WAN = ("198.51.100.20", 41641)
GW_LAN = ("192.168.77.2", 41641)        # a gateway's LAN address, inside its approved route
PEER_VIP = ("100.64.0.9", 41641)        # a member's virtual IP: inside the pool
DEVICE_IP = "100.64.0.1"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def udp(src: str, sport: int, dst: str, dport: int, data: bytes = b"x" * 8) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return build_ipv4(s, d, PROTO_UDP, build_udp(s, d, sport, dport, data))


def test_guard_knows_the_prefixes_the_kernel_route_and_caught_hosts():
    clock, lookups = Clock(), []
    routes_via = {"203.0.113.7": DEVICE_IP}         # an administrator's route through the device

    def source_toward(addr):
        lookups.append(addr[0])
        return routes_via.get(addr[0], "10.0.2.2")
    g = TunnelGuard(clock, source_toward)
    changes = []
    g.on_change = lambda: changes.append(g.nets)
    g.set_pool(POOL)
    assert g.inside("100.64.3.4") and not g.inside("192.168.77.2") and not g.inside("2001:db8::1")
    # userspace mode (no device): no kernel lookups at all
    assert not g.blocked(WAN) and not g.blocked(("203.0.113.7", 1)) and lookups == []
    g.set_device([DEVICE_IP], [POOL])
    g.set_routes([LAN77])
    assert g.nets == (POOL, LAN77) and len(changes) == 3
    g.set_routes([LAN77])                           # unchanged: no revalidation
    assert len(changes) == 3
    assert g.blocked(GW_LAN) and g.blocked(PEER_VIP) and lookups == []     # known prefixes: no lookup
    assert g.blocked(("203.0.113.7", 9)) and not g.blocked(WAN)
    assert g.blocked(("203.0.113.7", 10)) and lookups == ["203.0.113.7", WAN[0]]   # cached per host
    routes_via.clear()
    clock.t = CACHE_TTL + 1                         # the cache expires...
    assert not g.blocked(("203.0.113.7", 9))
    routes_via["203.0.113.7"] = DEVICE_IP
    g.set_routes([])                                # ...and is forgotten when the prefixes change
    assert g.blocked(("203.0.113.7", 9)) and not g.blocked(GW_LAN)
    # layer 3: a host caught looping is refused for a while, once reported
    assert g.caught("198.51.100.20") and not g.caught("198.51.100.20")
    assert g.blocked(WAN) and g.stats["caught"] == 1
    clock.t += CAUGHT_FOR + 1
    assert not g.blocked(WAN)
    assert g.stats["refused"] >= 6 and g.summary()["prefixes"] == [str(POOL)]


def test_own_outer_datagram_read_from_the_device_is_recognised():
    port = 41641
    assert own_outer_destination(udp(DEVICE_IP, port, "192.168.77.2", 5555), port) == ("192.168.77.2", 5555)
    assert own_outer_destination(udp(DEVICE_IP, 5353, "192.168.77.2", port), port) is None   # an app's
    s, d = socket.inet_aton(DEVICE_IP), socket.inet_aton("192.168.77.2")
    tcp = build_ipv4(s, d, PROTO_TCP, bytes([port >> 8, port & 255]) + bytes(30))
    assert own_outer_destination(tcp, port) is None
    frags = build_ipv4_fragments(s, d, PROTO_UDP, build_udp(s, d, port, 7, bytes(3000)), mtu=1000)
    assert own_outer_destination(frags[0], port) == ("192.168.77.2", 7)
    assert all(own_outer_destination(f, port) is None for f in frags[1:])
    assert own_outer_destination(b"\x45" + bytes(12), port) is None


def guarded_path(blocked_nets, candidates):
    codec = DiscoCodec(crypto.generate_private_key())
    peer = Peer(codec)
    g = TunnelGuard(Clock())
    g.set_pool(POOL)
    g.set_routes(blocked_nets)
    path = PeerPath(codec, peer.codec.public_key, blocked=g.blocked)
    path.set_remote_candidates(candidates)
    return path, peer, g


def test_candidates_inside_the_tunnel_are_never_probed_answered_or_learned():
    cands = [Candidate(GW_LAN, LAN), Candidate(PEER_VIP, LAN), Candidate(WAN, SRFLX)]
    path, peer, _ = guarded_path([LAN77], cands)
    assert path.remote_candidates == [Candidate(WAN, SRFLX)]
    path.start_punch(0.0)
    t = 0.0
    while (t := path.get_timer()) is not None and t < 30:
        path.handle_timer(t)
        assert {a for _, a in peer.pings(path.datagrams_to_send(t))} <= {WAN}
    # a ping that came through the tunnel gets no pong, no challenge, and is not learned
    path.receive_ping(peer.ping(), PEER_VIP, t)
    assert path.datagrams_to_send(t) == [] and PEER_VIP not in [c.addr for c in path.remote_candidates]
    # a pong to a real probe that comes back from inside the tunnel confirms nothing
    path.handle_timer(path.get_timer())
    (ping, _), = peer.pings(path.datagrams_to_send(t))
    path.receive_pong(peer.pong_for(ping), GW_LAN, t + 0.01)
    path.peer_seen_at(PEER_VIP, t + 0.01)
    assert path.current_path is None and path.datagrams_to_send(t) == []
    t = path.get_timer()
    path.handle_timer(t)
    (ping, _), = peer.pings(path.datagrams_to_send(t))
    path.receive_pong(peer.pong_for(ping), WAN, t + 0.02)
    assert path.state == DIRECT and path.current_path == WAN


def test_a_path_that_enters_the_tunnel_later_falls_back_to_the_relay():
    """The gateway's route is installed after its LAN address was confirmed (e.g. before that
    route existed a LAN path was real): the path goes, and nothing probes it again."""
    path, peer, g = guarded_path([], [Candidate(GW_LAN, LAN)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, GW_LAN, 0.0, 0.01)
    assert path.current_path == GW_LAN
    events(path)
    g.set_routes([LAN77])
    assert path.drop_blocked(1.0)
    assert path.state == RELAY and path.current_path is None
    assert events(path) == [PathChanged(None, None, "inside the tunnel")]
    t = 1.0
    while (t := path.get_timer()) is not None and t < 60:
        path.handle_timer(t)
        assert peer.pings(path.datagrams_to_send(t)) == []
    assert not path.drop_blocked(t)


def _dataplane_with_peer():
    dp = DataPlane(crypto.generate_private_key(), port=0)
    dp.start()
    sent: list = []
    dp.udp.send_batch = lambda items: sent.extend(items)
    dp.set_pool(str(POOL))
    peer_key = crypto.generate_private_key()
    pub = crypto.public_key(peer_key)
    dp.update_peers({pub: PeerRecord("p", pub, base64.b64encode(pub).decode(), PEER_VIP[0], True)})
    return dp, sent, peer_key, pub


def test_dataplane_never_sends_to_a_member_offering_its_virtual_ip():
    async def main():
        dp, sent, peer_key, pub = _dataplane_with_peer()
        try:
            dp.punch({"peer": base64.b64encode(pub).decode(),
                      "candidates": [{"addr": "100.64.0.9:41641", "kind": "lan"},
                                     {"addr": "198.51.100.20:41641", "kind": "srflx"}]})
            await asyncio.sleep(0.6)    # the first punch rounds
            dests = {a for _, a in sent}
            assert ("198.51.100.20", 41641) in dests and PEER_VIP not in dests, dests
            # its discovery ping arriving from its virtual IP (through our tunnel) gets no pong
            codec = DiscoCodec(peer_key)
            sent.clear()
            dp._on_datagram(memoryview(codec.seal(dp.public_key, Ping(b"\x01" * 12))), PEER_VIP)
            dp._flush()
            assert [a for _, a in sent if a == PEER_VIP] == [] and dp.stats["inside_tunnel"] == 1
            # a pong from there confirms nothing either
            dp._on_datagram(memoryview(codec.seal(dp.public_key, Pong(b"\x02" * 12, PEER_VIP))), PEER_VIP)
            assert dp.peer_path(pub)[0] == "relay" and dp.stats["inside_tunnel"] == 2
        finally:
            dp.close()
    asyncio.run(main())


def test_wireguard_never_roams_into_the_tunnel():
    """The member's own WireGuard packets, sent to our socket through our tunnel (its source is
    then its virtual IP): authenticated, yet the endpoint stays on the relay."""
    async def main():
        dp, sent, peer_key, pub = _dataplane_with_peer()
        try:
            b = Device(peer_key)
            b.add_peer(dp.public_key, endpoint="to-a")
            now = asyncio.get_running_loop().time()
            b.send(dp.public_key, udp(PEER_VIP[0], 1, "100.64.0.1", 2), now)
            for _ in range(3):
                for d, _ in b.datagrams_to_send():
                    dp._on_datagram(memoryview(d), PEER_VIP)
                dp._flush()
                for d, addr in sent:
                    if addr == PEER_VIP:
                        b.receive(d, "to-a", now)
                sent.clear()
            assert dp.peer_path(pub)[0] == "relay" and dp.stats["inside_tunnel"] >= 1
            assert dp.device.peer_stats(pub)["endpoint"] == dataplane_mod.RelayAddr(pub)
        finally:
            dp.close()
    asyncio.run(main())


def test_own_candidates_leave_out_addresses_inside_the_tunnel(monkeypatch):
    monkeypatch.setattr(dataplane_mod, "interface_addresses",
                        lambda exclude_ifaces=(), exclude_net=None: ["10.0.1.2", "192.168.77.5", "100.64.0.3"])
    dp = DataPlane(crypto.generate_private_key(), port=41641)
    dp.set_pool(str(POOL))
    dp.guard.set_routes([LAN77])
    assert [c["addr"] for c in dp.local_candidates()] == ["10.0.1.2:41641"]


def test_interface_drops_our_outer_datagrams_read_from_the_device():
    async def main():
        dp, _, _, pub = _dataplane_with_peer()
        try:
            dp.punch({"peer": base64.b64encode(pub).decode(),
                      "candidates": [{"addr": "198.51.100.20:41641", "kind": "srflx"}]})
            for kind in ("tun", "tap"):
                ki = KernelInterface(kind, "ovlx", dp, dp.public_key)
                routed = []
                dp.send_packets = routed.extend
                app = udp(DEVICE_IP, 5353, "100.64.0.9", 5353)
                packets = [udp(DEVICE_IP, dp.port, "198.51.100.20", 41641), app]
                if kind == "tap":
                    ki._from_tap([ki.mac + b"\x02" + bytes(5) + ETH_IPV4 + p for p in packets])
                else:
                    ki._from_tun(packets)
                assert routed == [app] and ki.stats["own_outer"] == 1, kind
            assert dp.guard.blocked(WAN)
            assert dp.peer_path(pub)[0] == "relay" and not dp.peers[pub].path.remote_candidates
        finally:
            dp.close()
    asyncio.run(main())


def test_a_kernel_route_into_the_device_is_noticed_at_the_next_keepalive():
    """A route the node did not add (an administrator's) sends the confirmed path's address into
    the device: the next keepalive asks the kernel again and the path falls back, unprobed."""
    clock, via = Clock(), {}
    g = TunnelGuard(clock, lambda addr: via.get(addr[0], "10.0.2.2"))
    g.set_pool(POOL)
    g.set_device([DEVICE_IP], [POOL])
    codec = DiscoCodec(crypto.generate_private_key())
    peer = Peer(codec)
    path = PeerPath(codec, peer.codec.public_key, blocked=g.blocked)
    path.set_remote_candidates([Candidate(WAN, SRFLX)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, WAN, 0.0, 0.01)
    events(path)
    while (t := path.get_timer()) < 10:        # the punch rounds, answered
        path.handle_timer(t)
        for p, a in peer.pings(path.datagrams_to_send(t)):
            path.receive_pong(peer.pong_for(p), a, t + 0.01)
    via[WAN[0]] = DEVICE_IP                    # ip route add 198.51.100.20/32 dev ovl0
    t = path.get_timer()                       # the keepalive...
    clock.t = CACHE_TTL + 1                    # ...after the cached verdict expired
    path.handle_timer(t)
    assert peer.pings(path.datagrams_to_send(t)) == [] and path.state == RELAY
    assert events(path) == [PathChanged(None, None, "inside the tunnel")] and g.stats["kernel_route"] == 1

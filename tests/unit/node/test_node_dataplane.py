"""The node's data plane glue: cryptokey routing in and out, over a real WireGuard session."""

from __future__ import annotations

import asyncio
import socket

from overlay import crypto
from overlay.netstack.wire import ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4
from overlay.node.dataplane import DataPlane
from overlay.node.state import Peer
from overlay.wire.device import Device
from overlay.wire.events import PacketReceived


def icmp(src: str, dst: str) -> bytes:
    return build_ipv4(socket.inet_aton(src), socket.inet_aton(dst), PROTO_ICMP,
                      build_icmp(ICMP_ECHO_REQUEST, 0, 1, b"x"))


def test_cryptokey_routing_in_and_out():
    async def main():
        ka, kb = crypto.generate_private_key(), crypto.generate_private_key()
        a, b = DataPlane(ka), Device(kb)
        a.start()
        sent: list = []
        a.udp.send_batch = lambda items: sent.extend(items)  # capture what A puts on the wire
        got: list = []
        a.inner_sink = got.extend
        b_addr = ("127.0.0.1", 9)
        try:
            a.add_static_peer(b.public_key, name="b", endpoint=b_addr, allowed_ips=["10.0.0.2/32"])
            b.add_peer(a.public_key, endpoint="to-a")
            now = asyncio.get_running_loop().time()

            def b_to_a():
                for d, _ in b.datagrams_to_send():
                    a._on_datagram(memoryview(d), b_addr)
                a._flush()

            def a_to_b():
                for d, addr in sent:
                    assert addr == b_addr
                    b.receive(d, "to-a", now)
                sent.clear()

            b.send(a.public_key, icmp("10.0.0.2", "10.0.0.1"), now)   # starts a handshake
            b_to_a()
            a_to_b()                                                  # response; b sends the staged packet
            b_to_a()
            assert [p[12:16] for p in got] == [socket.inet_aton("10.0.0.2")]

            # b speaking for an address it does not own is dropped
            b.send(a.public_key, icmp("10.0.0.99", "10.0.0.1"), now)
            b_to_a()
            assert len(got) == 1 and a.stats["spoofed"] == 1

            # outbound: routed to b by its allowed IPs, and nothing for an unknown address
            a.send_packets([icmp("10.0.0.1", "10.0.0.2"), icmp("10.0.0.1", "10.9.9.9")])
            assert a.stats["no_route"] == 1 and len(sent) == 1
            a_to_b()
            events = []
            while (ev := b.next_event()) is not None:
                events.append(ev)
            assert any(type(e) is PacketReceived and e.packet[16:20] == socket.inet_aton("10.0.0.2")
                       for e in events)
        finally:
            a.close()
    asyncio.run(main())


def test_gateway_routes_of_members_longest_prefix_and_online_first():
    """Approved gateway routes: cryptokey routing out (longest prefix; between two gateways of one
    prefix the online one, else the first by name) and in (the gateway may send from its routes)."""
    import base64

    dp = DataPlane(crypto.generate_private_key())
    keys = {n: crypto.public_key(crypto.generate_private_key()) for n in ("gw1", "gw2", "gw3", "plain")}

    def peers(online: dict[str, bool], withdrawn: bool = False) -> dict:
        routes = {"gw1": ("192.168.1.0/24",), "gw2": ("192.168.1.0/24",), "gw3": ("192.168.1.128/25",), "plain": ()}
        return {keys[n]: Peer(n, keys[n], base64.b64encode(keys[n]).decode(), f"100.64.0.{i + 1}", online[n],
                              routes=() if withdrawn else routes[n])
                for i, n in enumerate(keys)}

    dp.update_peers(peers({"gw1": True, "gw2": True, "gw3": True, "plain": True}))
    assert dp.route_peer("192.168.1.200").name == "gw3"      # longest prefix
    assert dp.route_peer("192.168.1.20").name == "gw1"       # same prefix: first by name
    assert dp.route_peer("192.168.2.1") is None
    dp.update_peers(peers({"gw1": False, "gw2": True, "gw3": False, "plain": True}))
    assert dp.route_peer("192.168.1.20").name == "gw2"       # the online one
    assert dp.route_peer("192.168.1.200").name == "gw2"      # an online shorter prefix beats an offline longer one
    gw2 = dp.peers[keys["gw2"]]
    assert gw2.allows(socket.inet_aton("192.168.1.7")) and gw2.allows(socket.inet_aton("100.64.0.2"))
    assert not dp.peers[keys["plain"]].allows(socket.inet_aton("192.168.1.7"))   # no route: no spoofing it
    # a route withdrawn (removed by the owner) is gone from both directions
    dp.update_peers(peers({"gw1": True, "gw2": True, "gw3": True, "plain": True}, withdrawn=True))
    assert dp.route_peer("192.168.1.20") is None and not gw2.allows(socket.inet_aton("192.168.1.7"))


def test_node_demux_is_the_simulators_classify_datagram(monkeypatch):
    """The node sorts its socket's datagrams with ``nat.classify_datagram``, the simulator's
    function: a spy on it sees every datagram, and a relay frame not from the server is dropped."""
    from overlay import nat
    from overlay.node import dataplane as dataplane_mod
    from overlay.relay import frames

    seen = []

    def spy(datagram, addr=None, portmap_gateway=None):
        seen.append(bytes(datagram[:4]))
        return nat.classify_datagram(datagram, addr, portmap_gateway)

    monkeypatch.setattr(dataplane_mod, "classify_datagram", spy)

    async def main():
        dp = DataPlane(crypto.generate_private_key())
        dp.loop = asyncio.get_running_loop()
        dp._on_datagram(memoryview(frames.data(bytes(32), b"\x04wg")), ("192.0.2.7", 9))
        dp._on_datagram(memoryview(b"junk"), ("192.0.2.7", 9))
        assert seen == [b"OVR\x01", b"junk"] and dp.stats["not_ours"] == 2
    asyncio.run(main())


def test_hard_nat_drivers_share_one_interface_and_a_won_socket_joins_the_demux():
    """Both punchers are ``HardNatDriver``s; an attempt's socket reports to its driver until it
    wins (``HardNat.adopt``), then its datagrams go to the node's demux and its address is routed
    through it."""
    from overlay.node.hardnat import HardNatDriver

    async def main():
        dp = DataPlane(crypto.generate_private_key())
        dp.start()
        hn = dp.hardnat
        assert all(isinstance(d, HardNatDriver) for d in hn.drivers)
        assert {type(d).__name__ for d in hn.drivers} == {"BirthdayDriver", "SequentialDriver"}
        got: list = []
        sock = hn.open_socket(lambda s, view, addr: got.append((s, bytes(view))))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        target = ("127.0.0.1", sock.local_address[1])
        try:
            peer.sendto(b"probe", target)
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [(sock, b"probe")]
            src = peer.getsockname()
            hn.adopt(b"k" * 32, src, sock)
            assert hn.via[src] is sock and hn.winners[b"k" * 32] == (src, sock)
            peer.sendto(b"junk", target)
            for _ in range(200):
                if dp.stats["not_ours"]:
                    break
                await asyncio.sleep(0.01)
            assert dp.stats["not_ours"] == 1 and len(got) == 1    # the node's demux, not the driver's
            hn.drop_winner(b"k" * 32)
            assert not hn.via and not hn.winners
        finally:
            peer.close()
            dp.close()
    asyncio.run(main())


def test_local_candidates_order_and_bounds():
    """``local_candidates.gather`` (sans-I/O): the server-reflexive address first, then the router's
    mapping and IPv6, LAN addresses, the fixed port on the public address, predicted ports; no
    duplicate, nothing inside our tunnel, at most 16."""
    from overlay.nat.candidate import parse_addr
    from overlay.node.local_candidates import gather

    class Nat:
        predictable = True

        def gap_ports(self):
            return [5001]

        def predicted_ports(self, n):
            return [5002 + i for i in range(2 * n)] + [5002]

    got = gather(41641, ["10.0.0.2", "100.64.0.3"], srflx=("203.0.113.1", 5000), nat=Nat(),
                 mapped=("203.0.113.1", 41641), magic_port=True, ipv6=[{"addr": "[2001:db8::1]:41641", "kind": "srflx"}],
                 inside=lambda host: host.startswith("100.64."), parse=parse_addr)
    assert [(c["kind"], c["addr"]) for c in got[:5]] == [
        ("srflx", "203.0.113.1:5000"), ("magic", "203.0.113.1:41641"), ("srflx", "[2001:db8::1]:41641"),
        ("lan", "10.0.0.2:41641"), ("predicted", "203.0.113.1:5001")]
    assert len(got) == 16 and len({c["addr"] for c in got}) == 16
    assert [c["addr"] for c in gather(7, ["10.0.0.2"], srflx=None, nat=None, mapped=None, magic_port=False,
                                      ipv6=[], inside=lambda h: False, parse=parse_addr)] == ["10.0.0.2:7"]

"""The node's data plane glue: cryptokey routing in and out, over a real WireGuard session."""

from __future__ import annotations

import asyncio
import socket

from overlay import crypto
from overlay.netstack.wire import ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4
from overlay.node.dataplane import DataPlane
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

    def peers(online: dict[str, bool]) -> dict:
        routes = {"gw1": ["192.168.1.0/24"], "gw2": ["192.168.1.0/24"], "gw3": ["192.168.1.128/25"], "plain": []}
        return {base64.b64encode(keys[n]).decode(): {"name": n, "ip": f"100.64.0.{i + 1}", "online": online[n],
                                                     "routes": routes[n]}
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
    p = peers({"gw1": True, "gw2": True, "gw3": True, "plain": True})
    for v in p.values():
        v["routes"] = []
    dp.update_peers(p)
    assert dp.route_peer("192.168.1.20") is None and not gw2.allows(socket.inet_aton("192.168.1.7"))

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

"""The userspace gateway (overlay/node/gateway.py) fed hand-built packets, on loopback.

Loopback stands in for the LAN (the real LAN case is tests/test_gateway_lab.py): routes are set
directly here, past the validation that refuses loopback routes from users.
"""

from __future__ import annotations

import asyncio
import socket

from overlay.netstack.wire import (ACK, PROTO_TCP, PROTO_UDP, SYN, build_ipv4, build_tcp, build_udp,
                                   parse_ipv4, parse_tcp, parse_udp)
from overlay.node.gateway import Gateway

MEMBER = "100.64.0.2"
STRANGER = "100.64.0.9"   # a member of a network where the route is not approved


def udp(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return build_ipv4(s, d, PROTO_UDP, build_udp(s, d, sport, dport, data))


def syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return build_ipv4(s, d, PROTO_TCP, build_tcp(s, d, sport, dport, 1000, 0, SYN, 65535))


def test_gateway_carries_udp_and_tcp_only_for_approved_routes_and_members():
    async def main():
        sent: list[bytes] = []
        gw = Gateway(sent.extend, mtu=1380)
        gw.set_routes([("127.0.0.0/8", {MEMBER})])
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        port = echo.getsockname()[1]
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        tport = listener.getsockname()[1]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]   # bound, not listening: refused
        loop = asyncio.get_running_loop()
        try:
            # UDP from a member to an approved destination: out of an OS socket, the reply comes back
            gw.deliver([udp(MEMBER, 5000, "127.0.0.1", port, b"hi")])
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 5)
            assert data == b"hi"
            echo.sendto(b"back", addr)
            for _ in range(100):
                if sent:
                    break
                await asyncio.sleep(0.02)
            ip = parse_ipv4(sent.pop())
            d = parse_udp(ip)
            assert (socket.inet_ntoa(ip.src), d.src_port, socket.inet_ntoa(ip.dst), d.dst_port, d.data) == \
                ("127.0.0.1", port, MEMBER, 5000, b"back")

            # a member of another network, or a destination outside the routes: dropped, counted
            gw.deliver([udp(STRANGER, 5000, "127.0.0.1", port, b"x"), syn(MEMBER, 4000, "10.9.9.9", 80),
                        udp(MEMBER, 5000, "10.9.9.9", 53, b"x")])
            await asyncio.sleep(0.2)
            assert gw.stats["refused"] == 3 and not sent
            echo.settimeout(0.1)

            # TCP: the member's SYN is answered (SYN-ACK from the LAN address) only once the
            # gateway's own connection to the host was accepted
            gw.deliver([syn(MEMBER, 4001, "127.0.0.1", tport)])
            for _ in range(100):
                if sent:
                    break
                await asyncio.sleep(0.02)
            ip = parse_ipv4(sent.pop())
            seg = parse_tcp(ip)
            assert socket.inet_ntoa(ip.src) == "127.0.0.1" and seg.flags & (SYN | ACK) == SYN | ACK
            assert seg.src_port == tport and seg.dst_port == 4001
            # nothing listens there: ICMP port unreachable, no handshake
            gw.deliver([syn(MEMBER, 4002, "127.0.0.1", closed_port)])
            for _ in range(100):
                if sent:
                    break
                await asyncio.sleep(0.02)
            ip = parse_ipv4(sent.pop())
            assert ip.proto == 1 and gw.stats["lan_refused"] == 1
        finally:
            gw.close()
            for s in (echo, listener, closed):
                s.close()

    asyncio.run(main())

"""The userspace gateway (overlay/node/gateway.py) fed hand-built packets, on loopback.

Loopback stands in for the LAN (the real LAN case is tests/lab/test_gateway_lab.py): routes are set
directly here, past the validation that refuses loopback routes from users.
"""

from __future__ import annotations

import asyncio
import socket

from polling import wait_async

from overlay.netstack.wire import (ACK, PROTO_TCP, PROTO_UDP, SYN, build_ipv4, build_tcp, build_udp,
                                   parse_ipv4, parse_tcp, parse_udp)
from overlay.node import gateway
from overlay.node.gateway import Gateway
from overlay.node.state import Peer

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


HOG = "100.64.0.66"   # a member flooding the gateway's tables


async def _until(cond, what: str, timeout: float = 5.0) -> None:
    await wait_async(cond, timeout, what)


def test_one_member_cannot_fill_the_udp_flows_for_the_others():
    """A member holding every UDP flow gives up its least recently used one to another member,
    whose datagram goes out at once."""
    async def main():
        sent: list[bytes] = []
        gw = Gateway(sent.extend, mtu=1380)
        gw.set_routes([("127.0.0.0/8", {MEMBER, HOG})])
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        port = echo.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            gw.deliver([udp(HOG, 10000 + i, "127.0.0.1", port, b"hog") for i in range(gateway.MAX_UDP_FLOWS + 4)])
            await _until(lambda: len(gw._udp) == gateway.MAX_UDP_FLOWS and all(tr for tr, _ in gw._udp.values()),
                         "the hog's flows open")
            while True:    # drain what the hog sent
                try:
                    echo.recvfrom(100)
                except BlockingIOError:
                    break
            gw.deliver([udp(MEMBER, 5000, "127.0.0.1", port, b"member")])
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 5)
            assert data == b"member"
            assert len(gw._udp) == gateway.MAX_UDP_FLOWS and (MEMBER, 5000, "127.0.0.1", port) in gw._udp
            assert gw.stats["busy"] == 4        # the hog's flows beyond the table: dropped
        finally:
            gw.close()
            echo.close()

    asyncio.run(main())


def test_one_member_cannot_fill_the_tcp_dials_for_the_others():
    """Dials to LAN hosts in flight are bounded; a member flooding SYNs to hosts that never answer
    holds at most MAX_DIALS of them, and another member's SYN still gets its dial."""
    async def main():
        sent: list[bytes] = []
        dials: list[tuple[str, int]] = []

        async def open_connection(host: str, port: int):
            dials.append((host, port))
            await asyncio.sleep(3600)     # a LAN host that never answers

        gw = Gateway(sent.extend, mtu=1380, open_connection=open_connection)
        gw.set_routes([("127.0.0.0/8", {MEMBER, HOG})])
        try:
            n = gateway.MAX_DIALS + 40
            gw.deliver([syn(HOG, 20000 + i, "127.0.0.2", 1000 + i) for i in range(n)])
            await _until(lambda: len(dials) >= gateway.MAX_DIALS, "the hog's dials")
            await asyncio.sleep(0.1)
            assert len(dials) == gateway.MAX_DIALS, len(dials)       # bounded
            gw.deliver([syn(MEMBER, 4000, "127.0.0.2", 80)])
            await _until(lambda: ("127.0.0.2", 80) in dials, "the member's dial")
            assert sum(len(t) for t in gw._dials.values()) == gateway.MAX_DIALS
            assert len(gw._dials[MEMBER]) == 1
        finally:
            gw.close()

    asyncio.run(main())


def test_member_is_told_what_the_gateway_saw_when_a_lan_host_does_not_answer(monkeypatch):
    """A member's dial through the gateway (its netstack and OverlayDialer, the gateway's stack
    for the LAN host) to a LAN host that never answers, or that the gateway's kernel cannot reach:
    the member's error says so and names the gateway, never "refused"."""
    from overlay.netstack.asyncio_glue import StackDriver
    from overlay.netstack.stack import Stack
    from overlay.node.services import OverlayDialer
    from overlay.proxy.dialer import DialTimeout, PeerUnreachable
    monkeypatch.setattr(gateway, "LAN_DIAL_TIMEOUT", 0.3)

    async def main():
        async def open_connection(host: str, port: int):
            if port == 81:
                raise OSError(113, "No route to host")
            await asyncio.sleep(3600)     # no such host: nobody answers

        member: StackDriver | None = None
        gw = Gateway(lambda pkts: member.receive_packets(pkts), mtu=1380, open_connection=open_connection)
        gw.set_routes([("192.168.77.0/24", {MEMBER})])
        loop = asyncio.get_running_loop()
        member = StackDriver(Stack(MEMBER, mtu=1380, now=loop.time()), lambda p: gw.deliver([p]),
                             send_packets=gw.deliver)
        peer = Peer("homepc", bytes(32), "A" * 43 + "=", "100.64.0.1", True)
        dialer = OverlayDialer(lambda h: None, lambda: member, find_route=lambda ip: peer)
        try:
            try:
                await dialer.open_connection("192.168.77.20", 80)
                raise AssertionError("connected")
            except DialTimeout as e:
                assert e.message == "connecting to 192.168.77.20:80 timed out: gateway homepc got no answer from it"
            try:
                await dialer.open_connection("192.168.77.20", 81)
                raise AssertionError("connected")
            except PeerUnreachable as e:
                assert e.message == "192.168.77.20:81 is unreachable: gateway homepc reports host unreachable"
        finally:
            gw.close()
            member.close()

    asyncio.run(asyncio.wait_for(main(), 30))

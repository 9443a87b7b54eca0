"""ICMP echo through the userspace gateway (overlay/node/gateway_icmp.py).

The table is checked on its own (identifiers, sequence numbers, timeouts, bounds); then the
gateway pings 127.0.0.1 for a member with the kernel's real ICMP sockets (a raw socket as root, a
ping socket where net.ipv4.ping_group_range allows it); the real LAN case, with the sysctl and
without any ICMP socket, is tests/lab/test_gateway_lab.py.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from overlay.netstack.wire import (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4,
                                   parse_icmp, parse_ipv4)
from overlay.node import gateway_icmp
from overlay.node.gateway import Gateway
from overlay.node.gateway_icmp import ECHO_TIMEOUT, MAX_FLOWS, MAX_OUTSTANDING, EchoTable

MEMBER = "100.64.0.2"
STRANGER = "100.64.0.9"
M, HOST = socket.inet_aton(MEMBER), socket.inet_aton("192.168.1.20")


def test_table_maps_replies_back_to_the_members_identifier_and_sequence():
    t = EchoTable()
    f, new = t.flow(M, 0x1234, HOST, 0.0)
    assert new and t.flow(M, 0x1234, HOST, 0.1) == (f, False)
    t.bind(f, 0x0BAD)
    assert t.sent(f, 7, 0.0)
    pkt = t.reply(HOST, 0x0BAD, 7, b"data", 1.0)
    ip = parse_ipv4(pkt)
    msg = parse_icmp(ip.payload)
    assert (ip.src, ip.dst, ip.proto) == (HOST, M, PROTO_ICMP)
    assert (msg.type, msg.rest, msg.data) == (ICMP_ECHO_REPLY, 0x1234 << 16 | 7, b"data")
    # a duplicate, an unknown sequence, another host, or a reply after the timeout: dropped
    assert t.reply(HOST, 0x0BAD, 7, b"data", 1.1) is None
    assert t.reply(HOST, 0x0BAD, 8, b"data", 1.1) is None
    assert t.sent(f, 9, 2.0)
    assert t.reply(M, 0x0BAD, 9, b"", 2.1) is None
    assert t.reply(HOST, 0x0BAD, 9, b"", 2.0 + ECHO_TIMEOUT + 0.1) is None
    assert t.stats == {"requests": 2, "replies": 1, "dropped": 0}


def test_table_is_bounded():
    t = EchoTable()
    f, _ = t.flow(M, 1, HOST, 0.0)
    t.bind(f, 1)
    assert all(t.sent(f, seq, 0.0) for seq in range(MAX_OUTSTANDING))
    assert not t.sent(f, MAX_OUTSTANDING, 0.0)                 # in flight: full
    assert t.sent(f, MAX_OUTSTANDING, ECHO_TIMEOUT + 0.1)       # the old ones timed out
    for i in range(2, MAX_FLOWS + 1):
        assert t.flow(M, i, HOST, 1.0)[0] is not None
    assert t.flow(M, 9999, HOST, 1.0) == (None, False)          # MAX_FLOWS busy
    assert t.flow(M, 9999, HOST, 1.0 + gateway_icmp.FLOW_IDLE + 1)[1]   # idle ones forgotten
    assert t.stats["dropped"] == 2


def test_one_member_cannot_fill_the_tables_for_the_others():
    """A member holding every flow and every request in flight gives up its oldest to another
    member, who gets up to an equal share; the hog cannot take them back."""
    hog, other = socket.inet_aton("100.64.0.66"), M
    t = EchoTable()
    flows = []
    for i in range(MAX_FLOWS):
        f, new = t.flow(hog, i, HOST, float(i) / 1000)
        assert new
        t.bind(f, i)
        flows.append(f)
    assert t.flow(hog, 9999, HOST, 1.0) == (None, False)       # alone: the whole table, then no more
    f, new = t.flow(other, 1, HOST, 1.0)
    assert new and f is not None
    assert t.evicted == [flows[0]] and (hog, 0, HOST) not in t.flows   # the hog's least recently used
    t.bind(f, 5000)
    assert t.flow(hog, 9999, HOST, 1.1) == (None, False)        # and it cannot evict the newcomer back
    others = [f] + [t.flow(other, i, HOST, 1.2)[0] for i in range(2, MAX_FLOWS // 2 + 1)]
    assert all(o is not None for o in others) and len(t.flows) == MAX_FLOWS
    assert t.flow(other, 9999, HOST, 1.3) == (None, False)      # an equal share, not more
    assert len({g.member for g in t.flows.values()}) == 2

    # requests in flight: the hog's flood leaves room for the other member's pings
    h = flows[-1]
    assert all(t.sent(h, seq, 2.0) for seq in range(MAX_OUTSTANDING))
    assert not t.sent(h, MAX_OUTSTANDING, 2.0)
    assert t.sent(f, 1, 2.1)                                     # the hog's oldest request gave way
    assert t.reply(HOST, 5000, 1, b"x", 2.2) is not None
    assert t.reply(HOST, h.local_id, 0, b"x", 2.2) is None       # (that one was given up)
    assert t.reply(HOST, h.local_id, 1, b"x", 2.2) is not None


def _expected_mode() -> str | None:
    """Which ICMP socket this process may open, in the gateway's order of preference."""
    for kind, mode in ((socket.SOCK_DGRAM, gateway_icmp.PING), (socket.SOCK_RAW, gateway_icmp.RAW)):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return mode
        except OSError:
            pass
    return None


def echo(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return build_ipv4(s, d, PROTO_ICMP, build_icmp(ICMP_ECHO_REQUEST, 0, ident << 16 | seq, data))


def test_gateway_answers_a_members_ping_from_the_lan_host():
    mode = _expected_mode()
    if mode is None:
        pytest.skip("no ICMP socket here: needs root or net.ipv4.ping_group_range covering this group")

    async def main():
        sent: list[bytes] = []
        gw = Gateway(sent.extend, mtu=1380)
        gw.set_routes([("127.0.0.0/8", {MEMBER})])
        try:
            data = os.urandom(24)
            gw.deliver([echo(MEMBER, "127.0.0.1", 0x4242, 1, data), echo(MEMBER, "127.0.0.1", 0x4242, 2, data)])
            for _ in range(100):
                if len(sent) >= 2:
                    break
                await asyncio.sleep(0.02)
            got = sorted((parse_ipv4(p) for p in sent), key=lambda ip: parse_icmp(ip.payload).rest)
            assert [(ip.src, ip.dst) for ip in got] == [(socket.inet_aton("127.0.0.1"), M)] * 2
            msgs = [parse_icmp(ip.payload) for ip in got]      # checksums verified
            assert [(m.type, m.rest, m.data) for m in msgs] == [(ICMP_ECHO_REPLY, 0x4242 << 16 | 1, data),
                                                                 (ICMP_ECHO_REPLY, 0x4242 << 16 | 2, data)]
            assert gw.icmp.mode == mode     # as root with ping_group_range "1 0" (the usual CI): the raw socket
            # not approved for this member, or outside the routes: refused, nothing sent
            sent.clear()
            gw.deliver([echo(STRANGER, "127.0.0.1", 1, 1, b"x"), echo(MEMBER, "10.9.9.9", 1, 1, b"x")])
            await asyncio.sleep(0.3)
            assert not sent and gw.stats["refused"] == 2
            assert gw.icmp.table.stats["requests"] == 2 and gw.icmp.table.stats["replies"] == 2
        finally:
            gw.close()

    asyncio.run(main())


def test_approved_routes_per_member():
    from overlay.node.approved_routes import ApprovedRoutes
    r = ApprovedRoutes()
    assert not r and not r.permits(M, HOST)
    r.set([("192.168.1.0/24", {MEMBER}), ("10.0.0.0/8", {MEMBER, STRANGER})])
    s = socket.inet_aton(STRANGER)
    assert r.permits(M, HOST) and not r.permits(s, HOST)          # approved in the member's network only
    assert r.permits(s, socket.inet_aton("10.200.1.1")) and not r.permits(M, socket.inet_aton("192.168.2.1"))
    assert r.prefixes() == ["192.168.1.0/24", "10.0.0.0/8"]

"""IPv6 pieces without the lab: address text, which interface addresses are offered, the server's
IPv6 listen addresses (STUN, relay between an IPv4 and an IPv6 registration, the hello's
``udp_addrs``), and a WireGuard session between two data planes over their IPv6 sockets (::1)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from overlay import crypto
from overlay.control.rawclient import RawClient
from overlay.nat import stun
from overlay.nat.candidate import AddressError, format_addr, is_global_ipv6, parse_addr
from overlay.node.dataplane import DataPlane, _fmt
from overlay.node.ipv6 import Ipv6Side, parse_if_inet6
from overlay.relay import frames
from overlay.server.app import MediationServer
from tests.unit.node.test_node_dataplane import icmp
from tests.unit.server.test_server_udp import recv, register, share


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")


def test_address_text_round_trip():
    assert format_addr(("2001:db8::1", 41641)) == "[2001:db8::1]:41641"
    assert format_addr(("198.51.100.7", 41641)) == "198.51.100.7:41641"
    assert _fmt(("2001:db8::1", 9)) == "[2001:db8::1]:9"
    for text in ("[2001:db8::1]:41641", "2001:db8::1:41641", "[2001:0db8:0::1]:41641"):
        assert parse_addr(text) == ("2001:db8::1", 41641)
    assert parse_addr("[::ffff:198.51.100.7]:5") == ("198.51.100.7", 5)   # mapped form folds to IPv4
    assert parse_addr("198.51.100.7:5") == ("198.51.100.7", 5)
    for bad in ("[2001:db8::1]", "2001:db8::1:0", "[nope]:5", "", "1.2.3.4:70000", None):
        with pytest.raises(AddressError):
            parse_addr(bad)


def test_which_ipv6_addresses_are_offered():
    assert is_global_ipv6("2001:db8:1::2") and is_global_ipv6("2a01:4f8::1")
    for host in ("fe80::1", "fe80::1%eth0", "fd00::2", "fc00::1", "::1", "::", "ff02::1",
                 "::ffff:198.51.100.7", "fec0::1", "not an address"):
        assert not is_global_ipv6(host), host


IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010db8000100000000000000000002 04 40 00 80     eth0
20010db800010000a1b2c3d4e5f60718 04 40 00 01     eth0
20010db8000100000000000000000099 04 40 00 20     eth0
20010db8000100000000000000000077 04 40 00 40     eth0
20010db8000100000000000000000066 04 40 00 c8     eth0
20010db8000900000000000000000001 07 40 00 80     ovl0
20010db8000100000000000000000002 05 40 00 80     eth1
garbage line
"""


def test_global_addresses_from_proc_temporary_first():
    # temporary first (the kernel sends from it), then stable; no ULA, link-local, loopback,
    # deprecated (0x20), tentative (0x40) or failed (0x08) ones; the overlay's own device left out
    assert parse_if_inet6(IF_INET6, ("ovl0",)) == ["2001:db8:1:0:a1b2:c3d4:e5f6:718", "2001:db8:1::2"]
    assert "2001:db8:9::1" in parse_if_inet6(IF_INET6)
    assert parse_if_inet6("") == []


@needs_v6
def test_server_listens_on_ipv4_and_ipv6(tmp_path):
    async def main():
        server = MediationServer(tmp_path / "srv", ["127.0.0.1", "::1"], 0)
        await server.start()
        try:
            port = server.port
            a = await RawClient("a", crypto.generate_private_key()).connect("127.0.0.1", port)
            b = await RawClient("b", crypto.generate_private_key()).connect("::1", port)   # control over IPv6
            assert b.hello["udp_addrs"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]
            await share(server, a, b)
            # STUN over IPv6 sees the IPv6 source
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s6.bind(("::1", 0))
            s6.setblocking(False)
            tid = stun.new_transaction_id()
            s6.sendto(stun.binding_request(tid), ("::1", port))
            msg = stun.parse(await recv(s6))
            assert msg.xor_mapped_address == ("::1", s6.getsockname()[1])
            # relay between an IPv4 and an IPv6 registration, both ways
            s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s4.bind(("127.0.0.1", 0))
            s4.setblocking(False)
            await register(s4, a, ("127.0.0.1", port))
            await register(s6, b, ("::1", port))
            pa, pb = crypto.public_key(a.key), crypto.public_key(b.key)
            s4.sendto(frames.data(pb, b"\x04over to six"), ("127.0.0.1", port))
            assert frames.parse(await recv(s6)) == (frames.DATA, pa, b"\x04over to six")
            s6.sendto(frames.data(pa, b"\x04back to four"), ("::1", port))
            assert frames.parse(await recv(s4)) == (frames.DATA, pb, b"\x04back to four")
            # the introduction carries the IPv6 registration as a bracketed srflx candidate
            assert {"addr": f"[::1]:{s6.getsockname()[1]}", "kind": "srflx"} in server.mediator.candidates_of(pb)
            s4.close()
            s6.close()
        finally:
            await server.close()
    asyncio.run(main())


@needs_v6
def test_tunnel_between_data_planes_over_ipv6():
    async def main():
        a, b = DataPlane(crypto.generate_private_key()), DataPlane(crypto.generate_private_key())
        a.start()
        b.start()
        got: list = []
        b.inner_sink = got.extend
        try:
            assert a.v6.udp is not None and b.v6.udp is not None
            assert a.v6.udp.local_address[1] == a.port   # the IPv4 socket's number, when free
            a.add_static_peer(b.public_key, name="b", endpoint=("::1", b.v6.udp.local_address[1]),
                              allowed_ips=["10.0.0.2/32"])
            b.add_static_peer(a.public_key, name="a", endpoint=("::1", a.v6.udp.local_address[1]),
                              allowed_ips=["10.0.0.1/32"])
            a.send_packets([icmp("10.0.0.1", "10.0.0.2")])   # handshake, then the packet
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.02)
            assert [p[12:16] for p in got] == [socket.inet_aton("10.0.0.1")]
            assert a.v6.udp.stats["tx"] >= 2 and a.udp.stats["tx"] == 0   # all over IPv6
            assert b.peer_path(a.public_key)[0].startswith("direct [::1]:")
        finally:
            a.close()
            b.close()
    asyncio.run(main())


def test_stun_in_the_other_family_for_a_node_on_ipv6():
    """A node that reaches the server over IPv6 asks the IPv4 endpoint the server announced what
    its IPv4 address is, and offers that as a candidate (sans-I/O part of ``Ipv6Side``)."""
    side = Ipv6Side()
    side.set_server("2001:db8::7", "2001:db8::7", 7777, ["[2001:db8::7]:7777", "bad", "198.51.100.7:7777"], False)
    assert side.server_other == ("198.51.100.7", 7777)
    [(req, dest)] = side.start_stun(10.0)
    assert dest == ("198.51.100.7", 7777) and stun.is_stun(req)
    assert side.start_stun(10.1) == []                 # one transaction at a time
    assert side.on_timer(10.31) == [(req, dest)]       # retransmitted after its RTO
    assert not side.receive_stun(stun.binding_response(req, ("203.0.113.9", 5)), ("198.51.100.8", 7777), 10.4)
    assert side.receive_stun(stun.binding_response(req, ("203.0.113.9", 5)), dest, 10.4)
    assert side.srflx_other == ("203.0.113.9", 5) and side.changed
    assert side.candidates() == [{"addr": "203.0.113.9:5", "kind": "srflx"}]
    assert side.summary(("2001:db8::7", 7777), ("2001:db8:1::2", 41641)) == {
        "port": None, "addresses": [], "server": "[2001:db8::7]:7777", "public": "[2001:db8:1::2]:41641"}
    batch = [(b"x", ("2001:db8::1", 1)), (b"y", ("198.51.100.1", 2))]
    assert side.send_own(batch) is batch               # no IPv6 socket: everything stays
    # an address literal with nothing announced in the other family: no STUN there
    other = Ipv6Side()
    other.set_server("2001:db8::7", "2001:db8::7", 7777, ["[2001:db8::7]:7777"], False)
    assert other.server_other is None and other.start_stun(0.0) == [] and other.timer() is None

"""NAT-PMP client core (``overlay.nat.natpmp``) against a scripted gateway."""

from __future__ import annotations

import struct

from overlay.nat import natpmp
from overlay.nat.natpmp import NatPmp

GW = ("192.168.1.1", 5351)


def addr_reply(ip: str = "203.0.113.5", result: int = 0) -> bytes:
    return struct.pack("!BBHI", 0, 128, result, 1000) + bytes(int(x) for x in ip.split("."))


def map_reply(internal: int, external: int, lifetime: int, result: int = 0) -> bytes:
    return struct.pack("!BBHIHHI", 0, 129, result, 1000, internal, external, lifetime)


def test_maps_our_port_then_renews_at_half_life_and_deletes():
    c = NatPmp(GW[0], 41641, 0.0, lifetime=7200)
    c.handle_timer(0.0)
    assert c.datagrams_to_send(0.0) == [(b"\x00\x00", GW)]
    assert c.receive(addr_reply(), 0.01)
    [(req, dst)] = c.datagrams_to_send(0.01)
    assert dst == GW and struct.unpack("!BBHHHI", req) == (0, 1, 0, 41641, 41641, 7200)
    assert not c.receive(map_reply(999, 5000, 7200), 0.02)     # another port's answer: not ours
    assert c.receive(map_reply(41641, 5000, 3600), 0.02)
    assert c.mapped == ("203.0.113.5", 5000) and c.changed and c.answered
    assert c.summary() == {"answered": True, "external_ip": "203.0.113.5", "mapped": "203.0.113.5:5000",
                           "error": None}
    assert c.get_timer() == 0.02 + 1800
    c.handle_timer(1800.02)                                    # renewal asks for the port it has
    [(req, _)] = c.datagrams_to_send(1800.02)
    assert struct.unpack("!BBHHHI", req)[3:] == (41641, 5000, 7200)
    c.receive(map_reply(41641, 5000, 7200), 1800.03)
    assert c.mapped == ("203.0.113.5", 5000)
    [(req, dst)] = c.delete()
    assert struct.unpack("!BBHHHI", req)[3:] == (41641, 0, 0)


def test_no_gateway_answer_gives_up_after_four_tries_then_asks_again_later():
    c = NatPmp(GW[0], 41641, 0.0, retry_after=300)
    sent = []
    while (t := c.get_timer()) is not None and t < 100:
        c.handle_timer(t)
        sent += [t for _ in c.datagrams_to_send(t)]
    assert [round(t, 2) for t in sent] == [0.0, 0.25, 0.75, 1.75]
    assert c.answered is False and c.mapped is None and c.get_timer() == 3.75 + 300   # gave up at 3.75 s
    assert c.delete() == []


def test_a_router_without_a_public_address_says_so():
    c = NatPmp(GW[0], 41641, 0.0)
    c.handle_timer(0.0)
    c.datagrams_to_send(0.0)
    assert c.receive(addr_reply("0.0.0.0", result=3), 0.01)
    assert c.answered and c.mapped is None and c.error == natpmp.RESULTS[3]
    assert c.datagrams_to_send(0.01) == []


def test_refused_mapping_is_reported_and_a_lost_mapping_is_a_change():
    c = NatPmp(GW[0], 41641, 0.0)
    c.handle_timer(0.0)
    c.receive(addr_reply(), 0.01)
    c.receive(map_reply(41641, 0, 0, result=2), 0.02)
    assert c.mapped is None and c.answered and c.error == natpmp.RESULTS[2]


def test_garbage_is_not_ours():
    c = NatPmp(GW[0], 41641, 0.0)
    c.handle_timer(0.0)
    for junk in (b"", b"\x00", b"\x01\x80" + bytes(10), b"\x00\x05" + bytes(10), map_reply(41641, 5, 5)):
        assert not c.receive(junk, 0.1)     # (a mapping answer before the address one: ignored)
    assert c.answered is None


def test_default_gateway(tmp_path):
    f = tmp_path / "route"
    f.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
                 "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                 "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n")
    assert natpmp.default_gateway(str(f)) == "192.168.1.1"
    assert natpmp.default_gateway(str(tmp_path / "none")) is None

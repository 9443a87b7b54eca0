"""PCP (RFC 6887) MAP client core (``overlay.nat.pcp``) against a scripted gateway, including
hostile and broken answers: wrong nonce, truncated packets, other protocols, error codes."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from overlay.nat import pcp
from overlay.nat.pcp import Pcp

GW = ("192.168.1.1", 5351)
NONCE = bytes(range(12))


def v4(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def answer(internal=41641, external=41641, ip="203.0.113.5", lifetime=3600, result=0, nonce=NONCE,
           proto=17, version=2, op=0x81) -> bytes:
    return (struct.pack("!BBBBII12x", version, op, 0, result, lifetime, 1234)
            + struct.pack("!12sB3xHH16s", nonce, proto, internal, external, v4(ip)))


def started(**kw) -> Pcp:
    c = Pcp(GW[0], "192.168.1.20", 41641, 0.0, nonce=NONCE, **kw)
    c.handle_timer(0.0)
    return c


def test_request_layout():
    c = started(lifetime=7200)
    [(req, dst)] = c.datagrams_to_send(0.0)
    assert dst == GW and len(req) == 60
    version, op, _, lifetime, client = struct.unpack("!BBHI16s", req[:24])
    nonce, proto, internal, external, ext_ip = struct.unpack("!12sB3xHH16s", req[24:])
    assert (version, op, lifetime, client) == (2, 1, 7200, v4("192.168.1.20"))
    assert (nonce, proto, internal, external, ext_ip) == (NONCE, 17, 41641, 41641, v4("0.0.0.0"))


def test_maps_renews_at_half_life_with_the_same_nonce_and_deletes_with_lifetime_zero():
    c = started()
    c.datagrams_to_send(0.0)
    assert c.receive(answer(external=5000, lifetime=3600), 0.01)
    assert c.mapped == ("203.0.113.5", 5000) and c.changed and c.answered and c.error is None
    assert c.get_timer() == pytest.approx(0.01 + 1800)
    c.handle_timer(1800.01)
    [(req, _)] = c.datagrams_to_send(1800.01)
    nonce, _, internal, external, ext_ip = struct.unpack("!12sB3xHH16s", req[24:])
    assert (nonce, internal, external, ext_ip) == (NONCE, 41641, 5000, v4("203.0.113.5"))  # asks for what it has
    assert c.mapped == ("203.0.113.5", 5000)       # still advertised while the renewal is in flight
    assert c.receive(answer(external=5000), 1800.02)
    [(bye, dst)] = c.delete()
    assert dst == GW and struct.unpack("!I", bye[4:8]) == (0,) and bye[24:36] == NONCE


@pytest.mark.parametrize("bad", [
    answer(nonce=b"x" * 12),                    # another mapping's (or an attacker's) nonce
    answer(internal=999),                       # another port
    answer(proto=6),                            # TCP
    answer()[:59],                              # truncated
    answer()[:24],                              # header only
    b"\x02",
    b"",
    answer(op=0x01),                            # a request, not a response (R bit clear)
    answer(op=0x82),                            # PEER response
    answer(version=3)[:3],
])
def test_answers_that_are_not_ours_are_ignored(bad):
    c = started()
    assert not c.receive(bad, 0.01)
    assert c.mapped is None and c.answered is None and c.state == pcp.MAPPING
    assert c.receive(answer(), 0.02)            # the real answer still counts
    assert c.mapped == ("203.0.113.5", 41641)


def test_wrong_nonce_never_moves_a_held_mapping():
    c = started()
    c.receive(answer(external=5000), 0.01)
    c.handle_timer(c.get_timer())
    assert not c.receive(answer(external=6666, ip="198.51.100.99", nonce=b"\xff" * 12), 1800.1)
    assert c.mapped == ("203.0.113.5", 5000) and c.ignored == 1


@pytest.mark.parametrize("code,text", [(2, "NOT_AUTHORIZED"), (7, "NETWORK_FAILURE: the router has no public address"),
                                       (8, "NO_RESOURCES"), (12, "ADDRESS_MISMATCH"), (99, "result 99")])
def test_error_codes_are_named_and_back_off(code, text):
    c = started(retry_after=300)
    c.datagrams_to_send(0.0)
    assert c.receive(answer(result=code, external=0, lifetime=30), 0.01)
    assert c.answered and c.mapped is None and c.error.startswith(text), c.error
    assert c.get_timer() == pytest.approx(300.01) and c.datagrams_to_send(0.01) == []
    assert c.delete() == []


def test_success_without_an_ipv4_address_or_port_is_an_error():
    c = started()
    bad = answer()[:44] + ipaddress.IPv6Address("2001:db8::1").packed
    assert c.receive(bad, 0.01) and c.mapped is None and "no IPv4" in c.error
    c = started()
    assert c.receive(answer(external=0), 0.01) and c.mapped is None


def test_nat_pmp_only_router_answers_unsupported_version():
    """RFC 6887 section 9: a NAT-PMP server answers a version-2 request with its own version-0
    "unsupported version"; the client notes it so the caller falls back to NAT-PMP."""
    c = started()
    assert c.receive(struct.pack("!BBHI", 0, 0, 1, 77), 0.01)
    assert c.nat_pmp_only and c.answered and "NAT-PMP" in c.error and c.mapped is None
    c = started()
    assert not c.receive(struct.pack("!BBHI", 0, 128, 0, 77) + bytes(4), 0.01)   # a NAT-PMP success: not ours
    assert not c.nat_pmp_only


def test_no_answer_four_tries_then_back_off():
    c = Pcp(GW[0], "192.168.1.20", 41641, 0.0, retry_after=300)
    sent = []
    while (t := c.get_timer()) is not None and t < 100:
        c.handle_timer(t)
        sent += [t for _ in c.datagrams_to_send(t)]
    assert [round(t, 2) for t in sent] == [0.0, 0.25, 0.75, 1.75]
    assert c.answered is False and c.get_timer() == pytest.approx(303.75)
    c.handle_timer(303.75)                       # asks again after the back-off
    assert len(c.datagrams_to_send(303.75)) == 1


def test_nonces_differ_between_clients():
    a, b = Pcp(GW[0], "10.0.0.2", 1, 0.0), Pcp(GW[0], "10.0.0.2", 1, 0.0)
    assert a.nonce != b.nonce and len(a.nonce) == 12

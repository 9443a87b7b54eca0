"""The node's DNS core (overlay/node/dns.py): queries built and answers read by dnspython."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from overlay.node.dns import (BURST, MAX_POINTERS, Malformed, Names, Responder, SUFFIX, _read_name, answer,
                              parse_query)

PEERS = [
    {"name": "bob", "ip": "100.64.0.2", "online": True, "networks": ["gamers", "work"]},
    {"name": "carol", "ip": "100.64.0.3", "online": True, "networks": ["gamers"]},
    {"name": "dave", "ip": "100.64.0.4", "online": False, "networks": ["gamers"]},
    {"name": "eve", "ip": "100.64.0.5", "online": True, "networks": ["gamers"]},
    {"name": "eve", "ip": "100.64.0.6", "online": True, "networks": ["work"]},   # another node, same name
]
ME = {"name": "alice", "ip": "100.64.0.1", "networks": ["gamers", "work"]}
POOL = ipaddress.IPv4Network("100.64.0.0/10")


def names() -> Names:
    return Names.build(PEERS, ME, ["gamers", "work"], POOL)


def ask(name: str, rdtype: str = "A", use_edns=False, names_=None) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=use_edns)
    wire = answer(parse_query(q.to_wire()), names_ or names())
    r = dns.message.from_wire(wire)
    assert r.id == q.id and r.question == q.question
    return r


def a_records(r: dns.message.Message) -> list[str]:
    return [rd.address for rrset in r.answer for rd in rrset]


@pytest.mark.parametrize("name", ["bob.gamers", "bob.work", "BoB.Gamers.", f"bob.work.{SUFFIX}", "bob", f"bob.{SUFFIX}"])
def test_a_for_a_peer_in_every_network_and_bare_and_full(name):
    r = ask(name)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert a_records(r) == ["100.64.0.2"]


def test_this_node_answers_its_own_name():
    assert a_records(ask("alice.work")) == ["100.64.0.1"]


def test_aaaa_is_an_empty_answer_not_an_error():
    r = ask("bob.gamers", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []


def test_ptr_names_the_peer():
    r = ask("2.0.64.100.in-addr.arpa", "PTR")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rd.target.to_text() for rrset in r.answer for rd in rrset] == [f"bob.gamers.{SUFFIX}."]
    assert ask("99.0.64.100.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN    # in the pool, nobody
    assert ask("1.1.168.192.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED     # not ours


def test_names_outside_our_zones_are_refused_and_unknown_peers_do_not_exist():
    assert ask("example.com").rcode() == dns.rcode.REFUSED
    assert ask("mallory.gamers").rcode() == dns.rcode.NXDOMAIN
    assert ask(f"x.y.{SUFFIX}").rcode() == dns.rcode.NXDOMAIN
    r = ask("gamers")                       # a network's apex exists: no NXDOMAIN hiding its names
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []


def test_non_members_offline_peers_and_other_networks():
    assert ask("dave.gamers").rcode() == dns.rcode.NXDOMAIN      # offline: follows presence
    assert ask("carol.work").rcode() == dns.rcode.NXDOMAIN       # carol is not in work
    assert ask("bob.chess").rcode() == dns.rcode.REFUSED         # not one of our networks


def test_an_ambiguous_bare_name_is_not_answered_but_its_full_names_are():
    assert ask("eve").rcode() == dns.rcode.REFUSED
    assert a_records(ask("eve.gamers")) == ["100.64.0.5"]
    assert a_records(ask("eve.work")) == ["100.64.0.6"]


def test_the_table_follows_a_rename():
    renamed = [dict(p, name="robert") if p["name"] == "bob" else p for p in PEERS]
    n = Names.build(renamed, ME, ["gamers", "work"], POOL)
    assert ask("bob.gamers", names_=n).rcode() == dns.rcode.NXDOMAIN
    assert a_records(ask("robert.gamers", names_=n)) == ["100.64.0.2"]
    assert "robert.gamers" in n.names() and "bob" not in n.names()


def test_edns_is_echoed():
    r = ask("bob.gamers", use_edns=0)
    assert r.edns == 0 and a_records(r) == ["100.64.0.2"]


def _query(name: bytes = b"\x03bob\x06gamers\x00", qd=1, flags=0x0100, tail=b"") -> bytes:
    return struct.pack("!HHHHHH", 7, flags, qd, 0, 0, 0) + name + struct.pack("!HH", 1, 1) + tail


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 11,                                     # short
    _query(qd=2), _query(qd=0),                            # one question only
    _query(flags=0x8100),                                  # a response
    _query(name=b"\x03bob"),                               # name runs off the end
    _query(name=b"\xc0\x0c"),                              # pointer to itself
    _query(name=b"\xc0\x40"),                              # pointer forwards
    _query(name=b"\x80bob\x00"),                           # reserved label type
    _query(name=b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00"),
    _query()[:-2],                                         # truncated question
    _query(tail=b"\x00" * 500),                            # over 512 bytes without EDNS
    _query(tail=b"\x00" * 1300),                           # over any UDP bound
])
def test_malformed_queries_are_dropped_and_counted(data):
    with pytest.raises(Malformed):
        parse_query(data)
    r = Responder(names)
    assert r.handle(data, ("127.0.0.1", 5000), 0.0) is None
    assert r.stats["malformed"] == 1 and r.stats["answered"] == 0


def test_compression_pointers_are_bounded():
    def chain(hops: int) -> bytes:     # the root at 0, then each pointer to the one before it
        data = bytearray(b"\x00\xc0\x00")
        for _ in range(hops - 1):
            data += bytes([0xC0, len(data) - 2])
        return bytes(data)
    assert _read_name(chain(MAX_POINTERS), len(chain(MAX_POINTERS)) - 2) == ("", len(chain(MAX_POINTERS)))
    with pytest.raises(Malformed, match="pointer"):
        _read_name(chain(MAX_POINTERS + 1), len(chain(MAX_POINTERS + 1)) - 2)


def test_a_large_query_with_edns_is_accepted():
    q = dns.message.make_query("bob.gamers", "A", use_edns=0, payload=1232,
                               options=[dns.edns.GenericOption(65001, b"x" * 600)])
    wire = q.to_wire()
    assert len(wire) > 512
    assert a_records(dns.message.from_wire(answer(parse_query(wire), names()))) == ["100.64.0.2"]


def test_a_flood_from_one_source_costs_a_bounded_number_of_answers():
    r = Responder(names)
    q = dns.message.make_query("bob.gamers", "A").to_wire()
    answered = sum(r.handle(q, ("127.0.0.1", 4000 + i), 10.0) is not None for i in range(5000))
    assert answered == BURST and r.stats["rate_limited"] == 5000 - BURST
    assert r.handle(q, ("127.0.0.2", 1), 10.0) is not None     # another source has its own budget
    assert r.handle(q, ("127.0.0.1", 1), 11.0) is not None     # and the bucket refills


def test_peers_reaching_the_overlay_address_are_refused():
    r = Responder(names, local=lambda src: src[0] in ("127.0.0.1", "100.64.0.1"))
    q = dns.message.make_query("bob.gamers", "A").to_wire()
    assert dns.message.from_wire(r.handle(q, ("100.64.0.1", 1), 0.0)).answer
    out = dns.message.from_wire(r.handle(q, ("100.64.0.3", 1), 0.0))
    assert out.rcode() == dns.rcode.REFUSED and r.stats["foreign"] == 1


def test_tcp_glue_answers_length_prefixed_and_bounds_connections():
    import asyncio

    from overlay.node import dns_server
    from overlay.node.dns_server import DnsServer

    async def main():
        srv = DnsServer(Responder(names))
        await srv.start("127.0.0.1", 0)
        host, port = srv.address
        q = dns.message.make_query("bob.gamers", "A").to_wire()
        r, w = await asyncio.open_connection(host, port)
        w.write(len(q).to_bytes(2, "big") + q)
        size = int.from_bytes(await r.readexactly(2), "big")
        assert a_records(dns.message.from_wire(await r.readexactly(size))) == ["100.64.0.2"]
        w.write((60000).to_bytes(2, "big"))          # over MAX_TCP_QUERY: closed, counted
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert srv.responder.stats["malformed"] == 1
        held = [await asyncio.open_connection(host, port) for _ in range(dns_server.MAX_TCP_CONNECTIONS)]

        async def all_accepted():
            while len(srv._conns) < dns_server.MAX_TCP_CONNECTIONS:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(all_accepted(), 5)
        r2, _ = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(r2.read(), 5) == b""   # one too many: closed at once
        for _, hw in held:
            hw.close()
        srv.close()

    asyncio.run(main())


def test_a_name_that_is_no_dns_label_is_left_out():
    odd = [{"name": n, "ip": f"100.64.1.{i}", "online": True, "networks": []}
           for i, n in enumerate(["caf\u00e9", "wg-ab+/cd", "x" * 64, "a.b"], 1)]
    n = Names.build([*PEERS, *odd], ME, ["gamers", "work"], POOL)
    assert not any(k.startswith(("caf", "wg-", "xxx", "a.b")) for k in n.forward)
    assert ask("1.1.64.100.in-addr.arpa", "PTR", names_=n).rcode() == dns.rcode.NXDOMAIN

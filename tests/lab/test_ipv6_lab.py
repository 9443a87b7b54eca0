"""IPv6 paths with real processes in the real-kernel NAT lab's dual-stack sites (``natlab.py``).

The server listens on IPv4 and on 2001:db8:ffff::10 (``--listen`` twice). Sites:

- ``a``, ``b``: random-port symmetric IPv4 NATs (two such sites alone stay on the relay) with
  IPv6: a routed /64 per LAN behind each router's stateful ip6 firewall (no NAT66);
- ``c``: a full-cone IPv4 NAT, no IPv6 at all (IPv6 disabled in its namespaces);
- ``d``: port-restricted IPv4 NAT with IPv6, but its IPv4 uplink dropped on the wire: its node
  reaches the server over IPv6 only.

What is proven: the firewall drops unsolicited inbound IPv6 (so IPv6 needs the punching both sides
do); the two hard-NAT nodes go direct over IPv6 and traffic flows (ping, and a TCP stream through a
port forward); a dual-stack and an IPv4-only node go direct over IPv4 with nothing about IPv6 in
the IPv4-only node's log; the IPv6-only node works (control, relay registration, STUN and a direct
path over IPv6), and the IPv4-only node reaches it through the relay, which forwards between an
IPv4 and an IPv6 registration. One lab per module; every wait bounded.
"""

from __future__ import annotations

import socket
import time

import pytest

import lab
import natlab
from lab_overlay import PASSWORD, OverlayLab, stream_through_forward

pytestmark = pytest.mark.netns

SERVER6 = f"[{natlab.SERVER_IPS6[0]}]:7777"
FORWARD_PORT = 18080


@pytest.fixture(scope="module")
def env():
    lab.require_lab("conntrack")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        sites = {"a": nl.add_site("a", "symmetric_random", ipv6=True),
                 "b": nl.add_site("b", "symmetric_random", ipv6=True),
                 "c": nl.add_site("c", "full_cone"),
                 "d": nl.add_site("d", "port_restricted", ipv6=True)}
        nl.block_ipv4("d")
        yield nl, ol, sites
    finally:
        ol.close()
        nl.close()


@pytest.fixture(scope="module")
def nodes(env):
    nl, ol, sites = env
    ol.start_server("--listen", SERVER6)
    alice = ol.start_node("a1", "alice")
    bob = ol.start_node("b1", "bob")
    carol = ol.start_node("c1", "carol")
    dave = ol.start_node("d1", "dave", server=SERVER6)
    ol.pair(alice, bob, "six")
    t0 = time.monotonic()   # bob joined: the server introduces the two now
    ol.wait(lambda: (alice.path_to("bob") or "").startswith("direct [") and
            (bob.path_to("alice") or "").startswith("direct ["), 20, "alice <-> bob direct over IPv6",
            interval=0.05)
    to_direct = time.monotonic() - t0
    ol.wait_connected(carol, dave)
    for n in (carol, dave):
        n.ok("join", "six", "--password", PASSWORD)
    return {**{n.name: n for n in (alice, bob, carol, dave)}, "ab_to_direct": to_direct}


def direct_host(path: str | None) -> str | None:
    """The host of a ``direct [v6]:port`` / ``direct v4:port`` status path, else None."""
    if not path or not path.startswith("direct "):
        return None
    return path.split()[1].rpartition(":")[0].strip("[]")


def wait_path(ol: OverlayLab, a, b, ok, timeout: float, what: str) -> tuple[str, str]:
    def both():
        pa, pb = a.path_to(b.name), b.path_to(a.name)
        return (pa, pb) if ok(pa) and ok(pb) else None
    return ol.wait(both, timeout, what)


def test_firewall_drops_unsolicited_inbound_ipv6(env):
    """The lab's dual-stack routers behave like home routers: nothing gets in unasked, and a flow
    gets in once the inside sent to it (which is why nodes must punch IPv6 too)."""
    nl, _, sites = env
    a1, b1 = sites["a"].hosts[0], sites["b"].hosts[0]
    sa = nl.socket("a1", socket.AF_INET6)
    sa.bind(("::", 5000))
    sa.settimeout(1.0)
    sb = nl.socket("b1", socket.AF_INET6)
    sb.bind(("::", 6000))
    sb.settimeout(1.0)
    sb.sendto(b"unsolicited", (a1.ip6, 5000))
    with pytest.raises(socket.timeout):
        sa.recvfrom(100)            # a's firewall dropped it: a never sent to b
    sa.sendto(b"punch", (b1.ip6, 6000))   # now a's router knows the flow (and b's knows it from b's send)
    assert sb.recvfrom(100) == (b"punch", (a1.ip6, 5000, 0, 0))
    sb.sendto(b"answer", (a1.ip6, 5000))
    assert sa.recvfrom(100) == (b"answer", (b1.ip6, 6000, 0, 0))
    # the pair's IPv4 NATs are hard: two random-port symmetric NATs (their own test shows the relay)
    assert {sites["a"].nat, sites["b"].nat} == {"symmetric_random"}


def test_hard_nat_pair_goes_direct_over_ipv6(env, nodes, record_property):
    nl, ol, sites = env
    alice, bob = nodes["alice"], nodes["bob"]
    pa, pb = wait_path(ol, alice, bob, lambda p: p is not None and p.startswith("direct ["), 20,
                       "alice <-> bob direct over IPv6")
    record_property("alice_bob_to_ipv6_s", round(nodes["ab_to_direct"], 2))
    print(f"alice <-> bob direct over IPv6 {nodes['ab_to_direct']:.2f} s after bob joined")
    assert direct_host(pa) == sites["b"].hosts[0].ip6 and direct_host(pb) == sites["a"].hosts[0].ip6, (pa, pb)
    # both IPv4 NATs really are hard: the server sees a different port per destination
    for n in (alice, bob):
        nat = n.status()["udp"]["nat"]
        assert nat.get("varies_by_destination") is True, (n.name, nat)
    probes = alice.ping("bob", 3)
    direct6 = [p["rtt_ms"] for p in probes if p["rtt_ms"] is not None and p["path"].startswith("direct [")]
    assert direct6, probes
    print(f"alice -> bob ping over IPv6: {min(direct6):.2f} ms")
    # a TCP stream through a port forward, carried over the IPv6 path
    stream_through_forward(ol, alice, bob, FORWARD_PORT)
    assert alice.path_to("bob").startswith("direct [")
    # netcheck / status show the IPv6 side: global address, server's IPv6 STUN endpoint, what it saw
    v6 = alice.status()["udp"]["ipv6"]
    assert v6["addresses"] == [sites["a"].hosts[0].ip6] and v6["server"] == SERVER6, v6
    assert v6["public"] == f"[{sites['a'].hosts[0].ip6}]:{v6['port']}", v6
    text = alice.ok("netcheck")
    assert f"[{sites['a'].hosts[0].ip6}]:{v6['port']}" in text, text


def test_dual_stack_and_ipv4_only_go_direct_over_ipv4(env, nodes):
    nl, ol, sites = env
    alice, carol = nodes["alice"], nodes["carol"]
    pa, pc = wait_path(ol, alice, carol, lambda p: direct_host(p) is not None and ":" not in direct_host(p), 20,
                       "alice <-> carol direct over IPv4")
    assert direct_host(pa) == sites["c"].wan_ip and direct_host(pc) == sites["a"].wan_ip, (pa, pc)
    assert alice.answered("carol")
    st = carol.status()["udp"]["ipv6"]
    assert st["addresses"] == [] and st["public"] is None and st["server"] is None, st
    log = carol.log()
    # nothing about IPv6 (no errors, no log lines) on a host without it; warnings a loaded machine
    # may cause (a late relay answer) are not about IPv6 and are left alone
    for bad in ("Traceback", "ERROR", "IPv6", "2001:db8", "fe80:"):
        assert bad not in log, f"{bad!r} in carol's log:\n{log[-3000:]}"


def test_ipv6_only_node_works(env, nodes):
    nl, ol, sites = env
    alice, carol, dave = nodes["alice"], nodes["carol"], nodes["dave"]
    st = dave.status()
    assert st["server"]["connected"] and st["udp"]["server_udp"] is True, st["udp"]   # relay registered over IPv6
    assert st["udp"]["public"] == f"[{sites['d'].hosts[0].ip6}]:{st['udp']['ipv6']['port']}", st["udp"]
    pd, pa = wait_path(ol, dave, alice, lambda p: p is not None and p.startswith("direct ["), 20,
                       "dave <-> alice direct over IPv6")
    assert direct_host(pd) == sites["a"].hosts[0].ip6, pd
    assert dave.answered("alice")
    # carol has no IPv6, dave no IPv4: the relay carries them (from an IPv4 to an IPv6 registration)
    assert carol.path_to("dave") == "relay" and dave.path_to("carol") == "relay"
    probes = carol.answered("dave")
    assert {p["path"] for p in probes} == {"relay"}, probes
    print(f"carol -> dave ping through the relay (IPv4 to IPv6): {min(p['rtt_ms'] for p in probes):.2f} ms")
    assert "Traceback" not in dave.log(), dave.log()[-3000:]

"""The port mapping coordinator (``overlay.nat.portmap``): one mapping at a time, PCP before
NAT-PMP before UPnP IGD, fallback when the preferred protocol fails, the STUN address check, and
datagrams from anywhere but gateway:5351 ignored."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from overlay.nat import portmap
from overlay.nat.portmap import PortMapper, parse_protocols

GW = "192.168.1.1"
SRC = (GW, 5351)


def pcp_answer(c, ip="203.0.113.5", external=41641, lifetime=3600, result=0) -> bytes:
    return (struct.pack("!BBBBII12x", 2, 0x81, 0, result, lifetime, 1)
            + struct.pack("!12sB3xHH16s", c.nonce, 17, 41641, external,
                          ipaddress.IPv6Address(f"::ffff:{ip}").packed))


def pmp_addr(ip="203.0.113.5") -> bytes:
    return struct.pack("!BBHI", 0, 128, 0, 1) + bytes(int(x) for x in ip.split("."))


def pmp_map(external=41641, lifetime=3600) -> bytes:
    return struct.pack("!BBHIHHI", 0, 129, 0, 1, 41641, external, lifetime)


def kinds(dgrams) -> list[str]:
    return ["pcp" if d[0] == 2 else "nat-pmp-address" if d[1] == 0 else "nat-pmp-map" for d, _ in dgrams]


def run_until(m: PortMapper, t_end: float) -> list:
    sent = []
    while (t := m.get_timer()) is not None and t <= t_end:
        m.handle_timer(t)
        sent += m.datagrams_to_send(t)
    return sent


def test_pcp_wins_and_the_others_only_probe():
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0)
    m.handle_timer(0.0)
    assert kinds(m.datagrams_to_send(0.0)) == ["pcp", "nat-pmp-address"]
    assert m.jobs_to_run() == [("discover",)]
    pcp = m.clients["pcp"]
    assert m.receive(pmp_addr(), SRC, 0.01)                 # NAT-PMP answers: held back, no map request
    assert m.datagrams_to_send(0.01) == []
    assert m.receive(pcp_answer(pcp), SRC, 0.02)
    assert m.mapping == ("pcp", ("203.0.113.5", 41641)) and m.changed
    m.job_done(("discover",), {"external_ip": "203.0.113.5", "lan_addr": "192.168.1.20"}, 2.0)
    assert m.jobs_to_run() == []                            # UPnP found the IGD but does not map
    s = m.summary("203.0.113.5")
    assert s["protocol"] == "pcp" and s["usable"] and s["mapped"] == "203.0.113.5:41641" and s["note"] is None
    assert s["nat_pmp"]["answered"] and s["nat_pmp"]["mapped"] is None
    assert s["upnp"]["answered"] and s["upnp"]["mapped"] is None
    dgrams, jobs = m.delete()
    assert kinds(dgrams) == ["pcp"] and jobs == []


def test_nat_pmp_only_router_falls_back_to_nat_pmp():
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0, protocols=("pcp", "nat-pmp"))
    m.handle_timer(0.0)
    m.datagrams_to_send(0.0)
    assert m.receive(pmp_addr(), SRC, 0.01)
    assert m.datagrams_to_send(0.01) == []
    assert m.receive(struct.pack("!BBHI", 0, 0, 1, 5), SRC, 0.02)      # "unsupported version" to PCP
    assert kinds(m.datagrams_to_send(0.02)) == ["nat-pmp-map"]
    assert m.receive(pmp_map(), SRC, 0.03)
    assert m.mapping == ("nat-pmp", ("203.0.113.5", 41641))
    assert m.summary("203.0.113.5")["pcp"]["error"].startswith("router speaks NAT-PMP")
    # PCP stays quiet while NAT-PMP holds the mapping: the router gets one mapping, not two
    assert [k for k in kinds(run_until(m, 1000.0)) if k == "pcp"] == []


def test_silent_router_falls_back_to_upnp_after_the_udp_protocols_give_up():
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0)
    m.handle_timer(0.0)
    m.datagrams_to_send(0.0)
    [job] = m.jobs_to_run()
    m.job_done(job, {"external_ip": "203.0.113.5", "lan_addr": "192.168.1.20"}, 2.0)
    assert m.jobs_to_run() == []                            # PCP and NAT-PMP are still being asked
    sent = run_until(m, 3.8)
    assert len(sent) == 6                                   # 3 more tries each, then both gave up
    [job] = m.jobs_to_run()
    assert job[0] == "map"
    m.job_done(job, {"external_ip": "203.0.113.5"}, 4.0)
    assert m.mapping == ("upnp", ("203.0.113.5", 41641))
    s = m.summary("203.0.113.5")
    assert s["pcp"]["answered"] is False and s["nat_pmp"]["answered"] is False and s["upnp"]["mapped"]
    assert m.delete() == ([], [("delete", 41641)])


def test_mapping_behind_another_nat_is_reported_not_usable():
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0, protocols=("upnp",))
    m.handle_timer(0.0)
    [job] = m.jobs_to_run()
    m.job_done(job, {"external_ip": "198.51.100.5", "lan_addr": "192.168.1.20"}, 1.0)
    [job] = m.jobs_to_run()
    m.job_done(job, {"external_ip": "198.51.100.5"}, 1.1)
    assert m.usable("203.0.113.9") is None and m.usable("198.51.100.5") == ("198.51.100.5", 41641)
    s = m.summary("203.0.113.9")
    assert s["usable"] is False
    assert s["note"] == ("mapping 198.51.100.5:41641 via UPnP IGD differs from the address the server sees "
                         "(203.0.113.9): router behind another NAT, not advertised")


def test_datagrams_from_elsewhere_are_ignored():
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0, protocols=("pcp", "nat-pmp"))
    m.handle_timer(0.0)
    pcp = m.clients["pcp"]
    for src in (("192.168.1.66", 5351), (GW, 5350), (GW, 1234)):
        assert not m.receive(pcp_answer(pcp), src, 0.01)
    for junk in (b"", b"\x00", b"\x02", b"\x07" * 70, pmp_map()):
        assert not m.receive(junk, SRC, 0.01)
    assert m.mapping is None


def test_parse_protocols():
    assert parse_protocols(True) == parse_protocols("all") == parse_protocols(None) == portmap.PROTOCOLS
    assert parse_protocols(False) == parse_protocols("off") == ()
    assert parse_protocols("upnp, NAT_PMP") == ("nat-pmp", "upnp")
    assert parse_protocols(["pcp"]) == ("pcp",)
    with pytest.raises(ValueError, match="unknown port mapping protocol 'stun'"):
        parse_protocols("pcp,stun")


def test_hostile_pcp_lifetime_of_two_seconds_renews_and_readvertises_at_most_once_a_minute():
    """A router granting 2 s, and another port on every renewal: the mapping is renewed at the
    floor (``mapclient.RENEW_FLOOR``), not every second, so the node re-advertises its candidates
    at most once per floor."""
    from overlay.nat import mapclient
    m = PortMapper(GW, "192.168.1.20", 41641, 0.0, protocols=("pcp",))
    pcp = m.clients["pcp"]
    now, port, requests, adverts = 0.0, 50000, 0, []
    while (t := m.get_timer()) is not None and t <= 600.0:
        now = t
        m.handle_timer(now)
        for _ in m.datagrams_to_send(now):
            requests += 1
            port += 1
            assert m.receive(pcp_answer(pcp, external=port, lifetime=2), SRC, now + 0.01)
        if m.changed:
            m.changed = False
            adverts.append(now)
    assert pcp.short_lived and m.mapping == ("pcp", ("203.0.113.5", port))
    assert requests <= 600 / mapclient.RENEW_FLOOR + 1, requests
    assert len(adverts) <= 600 / mapclient.RENEW_FLOOR + 1, adverts
    assert all(b - a >= mapclient.RENEW_FLOOR for a, b in zip(adverts, adverts[1:])), adverts

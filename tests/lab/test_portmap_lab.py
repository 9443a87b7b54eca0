"""Port mapping against a real router daemon: Debian's miniupnpd (UPnP IGD, NAT-PMP and PCP) on
a lab router, ``overlay up`` nodes started through the CLI (``natlab.py``, ``lab_overlay.py``).

The mapping site is a random-port symmetric NAT (Linux ``masquerade fully-random``): without a
mapping, two such sites stay on the relay. Its router takes its WAN address from the lab's
unreserved subnet (``natlab.UNRESERVED_NET``), because Debian 12's miniupnpd refuses to map
behind a reserved one (its log says "reserved / private IP address"). Shown here:

- a node behind it goes direct with port-restricted, full-cone, sequential-symmetric and another
  random-symmetric site; the peers (other than the full cone one, which also accepts its
  random-port probes) reach it at the mapped address;
- each protocol alone (``--port-mapping pcp`` / ``nat-pmp`` / ``upnp``) maps and gives a
  direct path, and its mapping is gone from the router (miniupnpd's nft rules, ``upnpc -l``)
  once the node stops;
- a router that maps but sits behind another NAT: reported by ``netcheck``, not advertised.

One lab, one server and the miniupnpd routers serve the module. Birthday punching is off on the
mapped nodes (``--no-hard-nat-punch``, which their peers honour too), so a direct path to a
random-symmetric node can only come from its mapping.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

import lab
import natlab
from lab_overlay import LabNode, OverlayLab

pytestmark = pytest.mark.netns

OBSERVE = 20.0


@pytest.fixture(scope="module")
def env():
    lab.require_lab("conntrack")
    if not shutil.which("miniupnpd"):
        pytest.skip("miniupnpd not installed (apt-get install miniupnpd-nftables)")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        sites = {
            "up": nl.add_site("up", "symmetric_random", hosts=4, unreserved_wan=True),
            "pr": nl.add_site("pr", "port_restricted"),
            "fc": nl.add_site("fc", "full_cone"),
            "ss": nl.add_site("ss", "symmetric_sequential"),
            "sr": nl.add_site("sr", "symmetric_random"),
        }
        mapper = nl.start_port_mapper(sites["up"])
        ol.start_server()
        yield nl, ol, sites, mapper
    finally:
        ol.close()
        nl.close()


def netcheck(n: LabNode) -> dict:
    return json.loads(n.ok("netcheck", "--json"))


def mapping(n: LabNode) -> dict | None:
    """The node's port mapping summary once a mapping is in use, else None (for ``wait``)."""
    pm = netcheck(n)["port_mapping"]
    return pm if pm and pm["mapped"] else None


def router_rules(site: natlab.Site) -> str:
    return site.router.run("nft", "list", "chain", "inet", "miniupnpd", "pre_upnp").stdout


def upnpc_list(nl: natlab.NatLab, host: str) -> str:
    return nl.run(host, ["upnpc", "-l"], check=False, timeout=20).stdout


def test_random_symmetric_site_with_a_mapping_goes_direct_with_every_other_site(env):
    nl, ol, sites, mapper = env
    up = sites["up"]
    m = ol.start_node(up.hosts[0].name, "mapped", "--no-hard-nat-punch")
    peers = [ol.start_node(sites[s].hosts[0].name, f"p{s}") for s in ("pr", "fc", "ss", "sr")]
    try:
        ol.pair(m, peers[0], "pmnet", *peers[1:])
        ol.wait(lambda: mapping(m), 15, "a port mapping")
        pm = ol.wait(lambda: (x := mapping(m)) and x["upnp"]["answered"] is not None and x, 10, "UPnP discovery")
        port = netcheck(m)["local_port"]
        mapped = f"{up.wan_ip}:{port}"
        assert pm["mapped"] == mapped and pm["protocol"] == "pcp" and pm["usable"] is True, pm
        # every protocol answered; only PCP (the preferred one) maps
        assert pm["nat_pmp"]["answered"] and pm["nat_pmp"]["mapped"] is None, pm
        assert pm["upnp"]["answered"] and pm["upnp"]["external_ip"] == up.wan_ip and pm["upnp"]["mapped"] is None, pm
        assert {"addr": mapped, "kind": "magic"} in netcheck(m)["candidates"]
        text = m.ok("netcheck")
        assert f"port mapping (PCP):       answered yes, mapped {mapped}" in text, text
        assert f"port mapping in use:      {mapped} (pcp, advertised)" in text, text
        for p in peers:
            path = ol.wait(lambda: p.path_to("mapped", direct=True), OBSERVE, f"{p.name} direct to the mapped node")
            if p.name != "pfc":
                assert path == f"direct {mapped}", (p.name, path, ol.dump())
            assert ol.wait(lambda: m.path_to(p.name, direct=True), OBSERVE, f"mapped node direct to {p.name}")
            assert m.answered(p.name)[-1]["path"].startswith("direct"), p.name
        # the pair of random-symmetric sites, relay-only without the mapping, pings over the direct path
        assert peers[3].answered("mapped")[-1]["path"] == f"direct {mapped}"
    finally:
        ol.stop_nodes(m, *peers)


@pytest.mark.parametrize("proto,label,host", [("pcp", "PCP", 1), ("nat-pmp", "NAT-PMP", 2), ("upnp", "UPnP IGD", 3)])
def test_each_protocol_alone_maps_goes_direct_and_is_removed_on_exit(env, proto, label, host, record_property):
    nl, ol, sites, mapper = env
    up, pr = sites["up"], sites["pr"]
    lan_host = up.hosts[host].name
    t0 = time.monotonic()
    m = ol.start_node(lan_host, f"only{host}", "--no-hard-nat-punch", "--port-mapping", proto)
    p = ol.start_node(pr.hosts[0].name, f"peer{host}")
    try:
        ol.pair(m, p, f"only{host}net")
        pm = ol.wait(lambda: mapping(m), 15, f"a {label} mapping")
        record_property("mapped_after_s", round(time.monotonic() - t0, 2))
        print(f"{label}: mapping seen {time.monotonic() - t0:.2f} s after the daemon was started")
        port = netcheck(m)["local_port"]
        mapped = f"{up.wan_ip}:{port}"
        assert pm["protocol"] == proto and pm["mapped"] == mapped and pm["usable"], pm
        others = [k for k in ("pcp", "nat_pmp", "upnp") if k != proto.replace("-", "_")]
        assert all(pm[k] is None for k in others), pm            # the other protocols were not asked
        assert f"port mapping ({label}):" in m.ok("netcheck")
        assert f"dnat ip to {up.hosts[host].ip}:{port}" in router_rules(up), router_rules(up)
        assert ol.wait(lambda: p.path_to(m.name, direct=True), OBSERVE, "peer direct through the mapping") == \
            f"direct {mapped}"
        listing = upnpc_list(nl, lan_host)
        assert f"UDP {port}->{up.hosts[host].ip}:{port}" in listing, listing
        m.stop()
        ol.wait(lambda: f"{up.hosts[host].ip}:{port}" not in router_rules(up), 5, "mapping removed on exit")
        assert f"->{up.hosts[host].ip}:{port}" not in upnpc_list(nl, lan_host)
    finally:
        ol.stop_nodes(m, p)


def test_router_behind_another_nat_is_reported_and_not_advertised(env):
    """miniupnpd told its external address is 11.22.33.44 while its traffic leaves as the lab
    address the server sees: the mapping exists on the router but leads nowhere."""
    nl, ol, sites, mapper = env
    cg = nl.add_site("cg", "port_restricted")
    nl.start_port_mapper(cg, ext_ip="11.22.33.44")
    c = ol.start_node(cg.hosts[0].name, "behindcgn")
    try:
        ol.wait_connected(c)
        pm = ol.wait(lambda: mapping(c), 15, "a mapping")
        r = netcheck(c)
        port = r["local_port"]
        assert pm["mapped"] == f"11.22.33.44:{port}" and pm["usable"] is False, pm
        assert pm["note"] == (f"mapping 11.22.33.44:{port} via PCP differs from the address the server sees "
                              f"({cg.wan_ip}): router behind another NAT, not advertised"), pm
        assert not any(x["addr"].startswith("11.22.33.44") for x in r["candidates"]), r["candidates"]
        text = c.ok("netcheck")
        assert "router behind another NAT, not advertised" in text and "(pcp, not advertised)" in text, text
        assert c.status()["udp"]["port_mapping"]["usable"] is False
        c.stop()
        ol.wait(lambda: "dnat" not in router_rules(cg), 5, "mapping removed on exit")
    finally:
        ol.stop_nodes(c)

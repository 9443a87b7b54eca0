"""No path inside the node's own tunnel, with real processes in the NAT lab (``natlab.py``).

A member with a TUN/TAP device routes the pool and its gateways' approved routes into the device.
Were one of those addresses taken as a direct path, the outer (encrypted) packets would go into
the tunnel themselves: every packet sent comes back out of the device to be sent again, and the
device carries millions of packets a second (what happened before the fix: see the report figures
in the lead's notes). Here direct UDP between the two sites is dropped by the member's router, so
the relay is the only real path; the addresses that lead into the tunnel are the gateway's LAN
address (inside its approved route) and a hostile member's own virtual IP.
"""

from __future__ import annotations

import json
import sys
import time

from repo_paths import SUPPORT
import lab
import natlab
import pytest
from lab_overlay import OverlayLab

pytestmark = pytest.mark.netns

WEB_PORT = 8080
LAN77 = "192.168.77.0/24"
WINDOW = 25.0          # seconds watched after the candidate was dealt with (punch rounds, backoff)
TX_LIMIT = 10_000      # overlay device packets over the whole test: a loop makes millions
HOSTILE = str(SUPPORT / "hostile_member.py")


def _block_udp_between(nl: natlab.NatLab, site: str, other_wan: str) -> None:
    """Drop UDP between ``site``'s router and ``other_wan`` (both ways): only the relay remains."""
    nl.run(site, ["nft", "-f", "-"], input=(
        "table inet noudp {\n chain blockudp {\n  type filter hook forward priority -5; policy accept;\n"
        f"  ip daddr {other_wan} meta l4proto udp drop\n  ip saddr {other_wan} meta l4proto udp drop\n }}\n}}\n"))


def _tx_packets(nl: natlab.NatLab, host: str, dev: str = "ovl0") -> int:
    r = nl.run(host, ["cat", f"/sys/class/net/{dev}/statistics/tx_packets"], check=False)
    return int(r.stdout.strip() or 0)


def _refused(node) -> int:
    return int(((node.status().get("udp") or {}).get("tunnel_guard") or {}).get("refused", 0))


def _watch(nl: natlab.NatLab, sides: list[tuple], until) -> tuple[int, list[str | None]]:
    """Poll for ``WINDOW`` seconds after ``until()`` holds (bounded: 60 s for that); ``sides``:
    (node, its lab host, a peer's name). Stop at once when a path goes direct or the overlay
    devices' tx packets (summed over the hosts) pass the limit. (tx packets, paths)."""
    def look():
        tx = sum(_tx_packets(nl, host) for _, host, _ in sides)
        paths = [node.path_to(peer) for node, _, peer in sides]
        return tx, paths, tx > TX_LIMIT or any((p or "").startswith("direct") for p in paths)
    deadline = time.monotonic() + 60
    while not until() and time.monotonic() < deadline:
        tx, paths, bad = look()
        if bad:
            return tx, paths
        time.sleep(0.5)
    end = time.monotonic() + WINDOW
    while time.monotonic() < end:
        tx, paths, bad = look()
        if bad:
            break
        time.sleep(0.5)
    return look()[:2]


@pytest.mark.parametrize("gw_kind,member_kind", [("tun", "tap"), ("tap", "tun"), ("userspace", "tap")])
def test_gateway_lan_address_is_never_a_path_through_the_tunnel(tmp_path, gw_kind, member_kind):
    """The gateway's LAN address is inside its approved route, which the member routes into its
    device; the member's virtual IP is inside the pool, which a TUN/TAP gateway routes into its
    own. Neither may become a path, for either side."""
    lab.require_lab("conntrack", "tun")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from 77\n")
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=2, lan_subnet=LAN77)
        nl.add_site("b", "port_restricted")
        gw_lan, web = a.hosts[0].ip, a.hosts[1].ip      # 192.168.77.2 (the gateway), .3 (a web server)
        nl.popen("a2", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", web], cwd=www, label="web")
        _block_udp_between(nl, "b", a.wan_ip)
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            kind = () if gw_kind == "userspace" else (f"--{gw_kind}",)
            gw = ol.start_node("a1", "gw", *kind, "--advertise-routes", LAN77)
            m = ol.start_node("b1", "member", f"--{member_kind}")
            ol.pair(gw, m, "home")
            ol.wait(lambda: m.path_to("gw") == "relay", 30, "member on the relay")
            # the gateway offers its LAN address as a path candidate
            assert any(c.startswith(gw_lan + ":") for c in ol.wait(lambda: _candidates(gw), 20, "netcheck")), ol.dump()
            gw.ok("admin", "routes", "home", "approve", "gw", LAN77)
            ol.wait(lambda: LAN77 in nl.run("b1", ["ip", "route", "show", "dev", "ovl0"]).stdout, 20,
                    "the member routes the approved LAN into its device")

            tx, paths = _watch(nl, [(m, "b1", "gw"), (gw, "a1", "member")], lambda: _refused(m) > 0)
            print(f"\n{gw_kind} gateway, {member_kind} member: ovl0 tx {tx} packets (both hosts), "
                  f"paths {paths}, refused {_refused(m)} (member) {_refused(gw)} (gateway)")
            assert paths == ["relay", "relay"] and tx < TX_LIMIT, (tx, paths, ol.dump())
            assert _refused(m) > 0, ol.dump()
            assert LAN77 in m.status()["udp"]["tunnel_guard"]["prefixes"]

            # through the gateway, by kernel ping and curl
            r = nl.run("b1", ["ping", "-c", "3", "-i", "0.3", "-W", "2", web], check=False)
            assert r.returncode == 0 and f"from {web}" in r.stdout, r.stdout + r.stderr + ol.dump()
            r = nl.run("b1", ["curl", "-sS", "--max-time", "20", f"http://{web}:{WEB_PORT}/index.html"],
                       check=False, timeout=30)
            assert r.returncode == 0 and r.stdout == "hello from 77\n", r.stdout + r.stderr + ol.dump()
            assert _tx_packets(nl, "b1") + _tx_packets(nl, "a1") < TX_LIMIT and m.path_to("gw") == "relay"

            if gw_kind == "userspace":
                # a route into the device the node did not add (an administrator's) toward the
                # gateway's public address: the kernel-route check or the device's evidence of our
                # own outer packets refuses it; nothing loops
                nl.run("b1", ["ip", "route", "add", f"{a.wan_ip}/32", "dev", "ovl0"])
                def guard():
                    return m.status()["udp"]["tunnel_guard"]
                ol.wait(lambda: guard()["caught"] + guard()["kernel_route"] > 0, 60,
                        "the member notices the route into its device")
                assert m.path_to("gw") == "relay"
                r = nl.run("b1", ["curl", "-sS", "--max-time", "20", f"http://{web}:{WEB_PORT}/index.html"],
                           check=False, timeout=30)
                assert r.returncode == 0 and r.stdout == "hello from 77\n", r.stdout + r.stderr + ol.dump()
            tx = _tx_packets(nl, "b1") + _tx_packets(nl, "a1")
            print(f"ovl0 tx at the end: {tx} packets (both hosts); guard {m.status()['udp']['tunnel_guard']}")
            assert tx < TX_LIMIT
        finally:
            ol.close()


def _candidates(node) -> list[str]:
    """The path candidates ``node`` offers its peers (``overlay netcheck``; none while it is not
    connected)."""
    r = node.cli("netcheck", "--json", timeout=30)
    return [c["addr"] for c in json.loads(r.stdout)["candidates"]] if r.returncode == 0 else []


def test_hostile_member_advertising_its_virtual_ip_is_ignored():
    lab.require_lab("conntrack", "tun")
    with natlab.NatLab() as nl:
        nl.add_site("c", "port_restricted")
        d = nl.add_site("d", "port_restricted")
        _block_udp_between(nl, "c", d.wan_ip)
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            v = ol.start_node("c1", "victim", "--tun")
            h = ol.start_node("d1", "hostile", "--tun")
            ol.pair(v, h, "home")
            h_ip = ol.wait(lambda: h.status()["node"]["virtual_ip"], 10, "hostile member's address")
            # restarted as the hostile program: it now knows its address at once and offers it
            h.stop()
            h.argv = [sys.executable, HOSTILE, *h.argv[3:]]
            h.restart()
            ol.wait(lambda: any(c.startswith(h_ip + ":") for c in _candidates(h)), 30,
                    "the hostile member offers its virtual IP")
            ol.wait(lambda: (v.peer("hostile") or {}).get("online"), 20, "victim sees it online")

            tx, paths = _watch(nl, [(v, "c1", "hostile")], lambda: _refused(v) > 0)
            print(f"\nhostile member: victim's ovl0 tx {tx} packets, path {paths[0]}, refused {_refused(v)}")
            assert paths == ["relay"] and tx < TX_LIMIT, (tx, paths, ol.dump())
            assert _refused(v) > 0, ol.dump()
            assert v.answered("hostile", count=3)
            assert _tx_packets(nl, "c1") < TX_LIMIT
        finally:
            ol.close()

"""DNS for peers on TUN nodes in the real-kernel NAT lab, through the CLI.

Two ``overlay up --tun`` nodes, each behind its own NAT, in one network. The node answers on its
virtual IP, port 53: ``dig`` (Debian's dnsutils) asks it for the peer's name, and ``curl`` reaches
the peer by name with no ``--resolve``, through the C library's resolver reading a resolv.conf
that points at the node (``ip netns exec`` mounts /etc/netns/NAMESPACE/resolv.conf over
/etc/resolv.conf). A peer asking the node's address is refused: the table shows every network of
the node, not only the ones it shares with that peer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import lab
import natlab
from lab_overlay import OverlayLab, wait

pytestmark = pytest.mark.netns

NET = "lan"


@pytest.fixture(scope="module")
def world():
    lab.require_lab("nft", "ip", "curl", "dig")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    etc = None
    try:
        for site in ("da", "db"):
            nl.add_site(site, "port_restricted")
        ol.start_server()
        a = ol.start_node("da1", "dns1", "--tun")
        b = ol.start_node("db1", "dns2", "--tun")
        ol.pair(a, b, NET)
        for n in (a, b):
            ol.wait(lambda n=n: any(p["online"] for p in n.status()["peers"]), 20, f"{n.name} sees its peer")
        vip_a, vip_b = a.status()["node"]["virtual_ip"], b.status()["node"]["virtual_ip"]
        # both devices hold their virtual IPs (each node's DNS answers there only once it does): dns2's
        # web server binds its address
        ol.wait(lambda: (a.status().get("dns") or {}).get("address") == f"{vip_a}:53", 20, "dns1 on its VIP")
        ol.wait(lambda: (b.status().get("dns") or {}).get("address") == f"{vip_b}:53", 20, "dns2 on its VIP")
        etc = Path("/etc/netns") / nl.ns("da1").name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {vip_a}\noptions timeout:2 attempts:1\n")
        ok = True
        yield nl, ol, a, b, vip_a, vip_b
    finally:
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


def _dig(nl, host: str, *args: str):
    return nl.run(host, ["dig", "+tries=1", "+time=2", *args], check=False)


def test_dig_asks_the_virtual_ip_and_curl_resolves_the_peer_by_name(world, tmp_path):
    nl, ol, a, b, vip_a, vip_b = world
    # each answer polled for (a bounded wait: the node's socket, the peer's presence), never taken from one try
    last = {}

    def answers(*args: str, want: list[str]) -> bool:
        last["r"] = r = _dig(nl, "da1", f"@{vip_a}", "+short", *args)
        return r.stdout.split() == want
    wait(lambda: answers(f"dns2.{NET}", want=[vip_b]), 20, f"dns2.{NET} -> {vip_b}",
         on_fail=lambda: last["r"].stdout + last["r"].stderr + ol.dump())
    wait(lambda: answers("-x", vip_b, want=[f"dns2.{NET}.overlay.internal."]), 20, f"PTR of {vip_b}",
         on_fail=lambda: last["r"].stdout + last["r"].stderr)
    (tmp_path / "hello.txt").write_text("hello from dns2\n")
    web = nl.popen("db1", ["python3", "-m", "http.server", "8000", "--bind", vip_b, "--directory", str(tmp_path)],
                   label=ol.label("http-dns2"))
    wait(lambda: "LISTEN" in nl.run("db1", ["ss", "-ltn", "sport = :8000"]).stdout, 20, "http.server on dns2",
         on_fail=lambda: f"{web.describe()}\n{web.stdout()}{web.stderr()}")

    def fetched() -> bool:
        last["r"] = r = nl.run("da1", ["curl", "-sS", "--max-time", "10", f"http://dns2.{NET}:8000/hello.txt"],
                               check=False, timeout=20)
        return r.returncode == 0 and r.stdout == "hello from dns2\n"
    wait(fetched, 40, f"curl http://dns2.{NET}:8000/ by name", interval=1.0,
         on_fail=lambda: last["r"].stdout + last["r"].stderr + ol.dump())


def test_a_peer_asking_the_nodes_address_is_refused(world):
    nl, ol, a, b, vip_a, vip_b = world
    last = {}

    def refused() -> bool:
        last["r"] = r = _dig(nl, "db1", f"@{vip_a}", f"dns2.{NET}")
        return "status: REFUSED" in r.stdout
    wait(refused, 20, "the peer's query refused", on_fail=lambda: last["r"].stdout + last["r"].stderr)
    assert a.status()["dns"]["stats"]["foreign"] >= 1

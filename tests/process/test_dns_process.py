"""Real daemons answer DNS for their peers: `dig` (and dnspython over TCP) asks the address that
`overlay status` shows; answers follow a rename and presence at once."""

from __future__ import annotations

import shutil
import subprocess

import dns.message
import dns.query
import dns.rcode
import pytest

from cluster import Cluster, free_port

pytestmark = pytest.mark.timeout(240)


def dig(address: str, *args: str) -> str:
    host, port = address.rsplit(":", 1)
    r = subprocess.run(["dig", f"@{host}", "-p", port, "+tries=1", "+time=2", *args], capture_output=True, text=True,
                       timeout=20)
    return r.stdout


def query(address: str, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    host, port = address.rsplit(":", 1)
    q = dns.message.make_query(name, rdtype)
    return (dns.query.tcp if tcp else dns.query.udp)(q, host, port=int(port), timeout=5)


def a(address: str, name: str, tcp: bool = False) -> list[str]:
    return [rd.address for rrset in query(address, name, tcp=tcp).answer for rd in rrset]


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (Debian: dnsutils) not installed")
def test_a_userspace_node_answers_peers_names_and_follows_a_rename(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        port = free_port()
        alice = c.start_node("alice", "--dns", f"127.0.0.1:{port}")
        bob = c.start_node("bob", "--dns", "off")
        alice.ok("create", "gamers", "--password", "pw")
        bob.ok("join", "gamers", "--password", "pw")
        c.wait(lambda: (p := alice.peer("bob")) is not None and p["online"], what="bob online for alice")
        st = alice.cli_status()
        address = st["dns"]["address"]
        assert address == f"127.0.0.1:{port}"
        assert "bob.gamers" in st["dns"]["names"] and bob.cli_status()["dns"] is None
        assert f"DNS for peers on 127.0.0.1:{port}" in alice.ok("status")
        bob_ip = alice.peer("bob")["ip"]

        assert dig(address, "+short", "bob.gamers").split() == [bob_ip]
        assert dig(address, "+short", "bob").split() == [bob_ip]
        assert dig(address, "+short", "bob.gamers.overlay.internal").split() == [bob_ip]
        assert dig(address, "+short", "-x", bob_ip).split() == ["bob.gamers.overlay.internal."]
        assert "status: NOERROR" in dig(address, "bob.gamers", "AAAA")
        assert "status: REFUSED" in dig(address, "example.com")
        assert "status: NXDOMAIN" in dig(address, "mallory.gamers")
        assert a(address, "bob.gamers", tcp=True) == [bob_ip]

        bob.ok("rename", "robert")          # at once: the next query already knows
        c.wait(lambda: alice.peer("robert") is not None, what="alice hears the rename")
        assert a(address, "robert.gamers") == [bob_ip]
        assert query(address, "bob.gamers").rcode() == dns.rcode.NXDOMAIN

        bob.ok("offline", "gamers")         # presence: an offline peer has no address
        c.wait(lambda: not alice.peer("robert")["online"], what="robert offline for alice")
        assert query(address, "robert.gamers").rcode() == dns.rcode.NXDOMAIN
        assert alice.status()["dns"]["stats"]["answered"] >= 8


def test_a_busy_dns_address_given_is_one_error_line_and_auto_falls_back(tmp_path):
    import socket
    import sys
    with Cluster(tmp_path) as c, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        c.start_server()
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "overlay", "up", "--server", c.server_addr, "--name", "carol",
                            "--home", str(tmp_path / "carol"), "--socks", "127.0.0.1:0", "--dns", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"error: cannot answer DNS on 127.0.0.1:{port}" in r.stderr and "--dns off" in r.stderr
        r = subprocess.run([sys.executable, "-m", "overlay", "up", "--name", "carol", "--home", str(tmp_path / "carol"),
                            "--dns", "192.168.1.1:53"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "only a loopback address" in r.stderr
        # 'auto' (the default): 127.0.0.1:1053, else any free loopback port
        dave = c.start_node("dave")
        c.wait(lambda: (dave.status().get("dns") or {}).get("address", "").startswith("127.0.0.1:"), what="dns")
        assert query(dave.status()["dns"]["address"], "dave").rcode() == dns.rcode.REFUSED  # no address yet
        dave.ok("create", "solo", "--password", "pw")
        c.wait(lambda: "dave.solo" in dave.status()["dns"]["names"], what="own name")
        assert a(dave.status()["dns"]["address"], "dave.solo") == [dave.status()["node"]["virtual_ip"]]


def test_a_start_undoes_what_a_killed_node_left_in_the_resolver(tmp_path):
    """dns-system.json in the home (what a TUN/TAP node had set when it was killed): the next start,
    in any mode, puts resolv.conf back (here a temporary file: the record names the file it edited)
    and clears the record."""
    import json
    conf = tmp_path / "resolv.conf"
    original = "nameserver 192.0.2.1\n"
    written = "# overlay: the node's DNS\nnameserver 100.64.0.9\n" + original
    conf.write_text(written)
    home = tmp_path / "home-alice"
    home.mkdir(mode=0o700)
    (home / "dns-system.json").write_text(json.dumps({
        "resolved": {"ifname": "ovl-gone9", "ifindex": 4242},   # the device went with the node
        "resolv_conf": {"path": str(conf), "original": original, "written": written,
                        "backup": str(home / "resolv.conf.overlay-backup")}}))
    with Cluster(tmp_path) as c:
        c.start_server()
        alice = c.start_node("alice", "--dns", "off")
        assert alice.home == home
        c.wait(lambda: not (home / "dns-system.json").exists(), what="the record cleared")
        assert conf.read_text() == original

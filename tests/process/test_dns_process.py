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

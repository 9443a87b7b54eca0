"""Who is calling: a service behind `overlay share` sees each peer as its own loopback address
(127.B.C.D for the virtual IP 100.B.C.D), for TCP and UDP, and `overlay whois` names the peer."""

from __future__ import annotations

import json
import socket

import pytest

from cluster import Cluster, free_port


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        yield c


def _tcp_caller(cluster, node, local: int, service: socket.socket) -> str:
    """Connect through ``node``'s forward at 127.0.0.1:``local``; the address the service saw."""
    seen: list[str] = []

    def attempt() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", local), timeout=5) as c:
                c.sendall(b"hello")
                conn, addr = service.accept()
                with conn:
                    if conn.recv(5) == b"hello":
                        seen.append(addr[0])
                        return True
        except OSError:
            return False
        return False
    cluster.wait(attempt, timeout=30, what=f"{node.name}'s connection reaches the shared TCP service")
    return seen[0]


def _udp_caller(cluster, node, local: int, service: socket.socket) -> str:
    seen: list[str] = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def attempt() -> bool:
        s.sendto(node.name.encode(), ("127.0.0.1", local))
        try:
            data, addr = service.recvfrom(2048)
        except socket.timeout:
            return False
        if data == node.name.encode():
            seen.append(addr[0])
            return True
        return False
    try:
        cluster.wait(attempt, timeout=30, what=f"{node.name}'s datagram reaches the shared UDP service")
    finally:
        s.close()
    return seen[0]


def _expected(vip: str) -> str:
    return "127." + vip.split(".", 1)[1]


def test_shared_services_see_each_peer_as_its_own_loopback_address_and_whois_names_it(cluster):
    b = cluster.start_node("bob")
    a = cluster.start_node("alice")
    c = cluster.start_node("carol")
    b.ok("create", "lan", "--password", "pw")
    a.ok("join", "lan", "--password", "pw")
    c.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: all((b.peer(n) or {}).get("online") for n in ("alice", "carol"))
                 and (a.peer("bob") or {}).get("online") and (c.peer("bob") or {}).get("online"),
                 what="bob sees alice and carol online, and they see him")
    vip = {n.name: n.status()["node"]["virtual_ip"] for n in (a, c)}

    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    try:
        tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
        b.ok("share", str(tport))
        b.ok("share", f"{uport}/udp")
        seen = {}
        for n in (a, c):
            lt, lu = free_port(), free_port()
            n.ok("forward", str(lt), f"bob:{tport}")
            n.ok("forward", f"{lu}/udp", f"bob:{uport}")
            seen[n.name] = (_tcp_caller(cluster, n, lt, tcp), _udp_caller(cluster, n, lu, udp))
    finally:
        tcp.close()
        udp.close()

    # each peer comes from its own address, the same for TCP and UDP: 127.B.C.D for 100.B.C.D
    for name in ("alice", "carol"):
        assert seen[name] == (_expected(vip[name]),) * 2, (name, vip[name], seen)
    assert seen["alice"][0] != seen["carol"][0]
    assert "127.0.0.1" not in {seen["alice"][0], seen["carol"][0]}

    # overlay whois maps each address back to its peer, in words and in JSON
    for name in ("alice", "carol"):
        addr = seen[name][0]
        text = b.ok("whois", addr)
        assert text.splitlines()[0] == f"{addr} is {name}", text
        assert vip[name] in text and "lan" in text
        r = json.loads(b.ok("whois", addr, "--json"))
        peer = b.peer(name)
        assert r == {"query": addr, "name": name, "virtual_ip": vip[name], "loopback": addr,
                     "networks": ["lan"], "key": peer["key"], "online": True}
        # a virtual IP or a name gives the same peer, and the address to allow in the service's config
        assert json.loads(b.ok("whois", vip[name], "--json"))["loopback"] == addr
        assert json.loads(b.ok("whois", name, "--json"))["virtual_ip"] == vip[name]

    # status says where peers come from; what stands for nobody is a one-line error
    assert b.status()["share_source"] == {"mode": "per_peer", "note": None}
    assert "overlay whois ADDR" in b.ok("status")
    assert "127.0.0.1 stands for no peer" in b.fails("whois", "127.0.0.1")
    assert "which no peer of this node has" in b.fails("whois", "127.64.255.254")
    err = json.loads(b.run("whois", "127.0.0.1", "--json").stdout)["error"]
    assert err["code"] == "unknown_peer"
    assert "no peer named 'nobody'" in b.fails("whois", "nobody")

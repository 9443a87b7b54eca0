"""What a TAP member's kernel takes from a hostile peer, with real daemons in the real-kernel NAT lab.

Three ``overlay up --tap`` nodes, each behind its own NAT, in one network: ``mallory`` (the attacker:
a real member whose own ``ovl0`` is used to hand-build frames with an AF_PACKET socket, so they go
through its daemon and tunnel like any frame its kernel sends), ``target`` (``--only-shared``) and
``open`` (the default inbound policy).

1. IPv4 and ARP wrapped in VLAN tags (VLAN ID 0, which Linux handles as untagged; 802.1Q, 802.1ad
   and both stacked) never reach the kernel: a UDP datagram with a spoofed source (another member's
   virtual IP, 203.0.113.66) to a port the victim shares, one to a port ``target`` does not share,
   and an ARP request claiming an overlay address for mallory's MAC. An IPX frame sent after them is
   the barrier: once the victim's ``ovl0`` saw it, the tagged frames before it were dealt with too.
   The same datagrams sent plainly by mallory's kernel arrive (the sockets work).
2. ``--only-shared`` covers IPv6: with IPv6 enabled on every ``ovl0``, mallory opens a TCP
   connection to ``open``'s link-local address, but not to ``target``'s, while ``target``'s shared
   port still answers over IPv4.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest

import lab
import natlab
from lab_overlay import OverlayLab

pytestmark = pytest.mark.netns

DEV = "ovl0"
ETH_P_ALL, ETH_P_IPX = 0x0003, 0x8137
SHARED, UNSHARED = 7101, 7102


def _dev_addr(nl: natlab.NatLab, host: str) -> str | None:
    r = nl.run(host, ["ip", "-4", "-o", "addr", "show", "dev", DEV, "up"], check=False, timeout=5)
    for line in r.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


def _link_local(nl: natlab.NatLab, host: str) -> str | None:
    r = nl.run(host, ["ip", "-j", "-6", "addr", "show", "dev", DEV, "scope", "link"], check=False, timeout=5)
    for link in json.loads(r.stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet6" and not a.get("tentative"):
                return a["local"]
    return None


class Lab:
    def __init__(self, nl: natlab.NatLab, ol: OverlayLab):
        self.nl, self.ol = nl, ol


@pytest.fixture(scope="module")
def world():
    lab.require_lab("conntrack", "tun", "ip")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    try:
        for site in ("m", "t", "o"):
            nl.add_site(site, "port_restricted")
        ol.start_server()
        w = Lab(nl, ol)
        w.mallory = ol.start_node("m1", "mallory", "--tap")
        w.target = ol.start_node("t1", "target", "--tap", "--only-shared")
        w.open = ol.start_node("o1", "open", "--tap")
        nodes = (w.mallory, w.target, w.open)
        ol.pair(w.mallory, w.target, "lan", w.open)
        for n in nodes:
            ol.wait(lambda n=n: len([p for p in n.status()["peers"] if p["online"]]) == 2, 25,
                    f"{n.name} sees both others online")
            n.vip = ol.wait(lambda n=n: n.status()["node"].get("virtual_ip"), 10, f"{n.name}'s virtual IP")
            ol.wait(lambda n=n: _dev_addr(nl, n.host) == n.vip, 10, f"{DEV} of {n.name} holds {n.vip}")
            n.mac = bytes.fromhex(n.status()["interface"]["mac"].replace(":", ""))
        w.target.ok("share", f"{SHARED}/udp")
        w.target.ok("share", str(SHARED))
        ok = True
        yield w
    finally:
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


def _udp(src: str, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: none, which Linux accepts over IPv4)."""
    from overlay.netstack.wire import PROTO_UDP, build_ipv4
    return build_ipv4(socket.inet_aton(src), socket.inet_aton(dst), PROTO_UDP,
                      struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload)


def _tags(*tpids: int) -> bytes:
    return b"".join(struct.pack("!HH", t, 0) for t in tpids)   # VLAN ID 0, priority 0


def _received(sock: socket.socket, until: float) -> list[tuple[bytes, str]]:
    got = []
    while time.monotonic() < until:
        sock.settimeout(max(0.05, until - time.monotonic()))
        try:
            data, addr = sock.recvfrom(2048)
        except (TimeoutError, socket.timeout):
            break
        got.append((data, addr[0]))
    return got


def _neigh(nl: natlab.NatLab, host: str, ip: str) -> str | None:
    r = nl.run(host, ["ip", "-j", "neigh", "show", ip, "dev", DEV], check=False, timeout=5)
    entries = json.loads(r.stdout or "[]")
    return entries[0].get("lladdr") if entries else None


@pytest.mark.parametrize("victim_name", ["target", "open"])
def test_vlan_tagged_ipv4_and_arp_never_reach_the_kernel(world, victim_name):
    w = world
    nl, m, victim = w.nl, w.mallory, getattr(w, victim_name)
    other = w.open if victim is w.target else w.target
    port = SHARED if victim is w.target else 7103     # a shared port (and on target an unshared one)
    rx = {p: nl.udp_socket(victim.host, p) for p in (port, UNSHARED)}
    barrier_rx = nl.socket(victim.host, socket.AF_PACKET, socket.SOCK_RAW)
    barrier_rx.bind((DEV, ETH_P_ALL))
    tx = nl.socket(m.host, socket.AF_PACKET, socket.SOCK_RAW)
    tx.bind((DEV, 0))
    plain = nl.socket(m.host)
    claimed = "100.100.100.100"            # an overlay address nobody holds
    assert claimed not in (m.vip, victim.vip, other.vip)

    # the path works: mallory's kernel, plainly, to the port (retried: a first datagram may meet a
    # handshake in progress)
    def plain_arrives():
        plain.sendto(b"plain", (victim.vip, port))
        return any(d == b"plain" and src == m.vip for d, src in _received(rx[port], time.monotonic() + 1))
    w.ol.wait(plain_arrives, 20, f"a plain datagram from mallory reaches {victim.name}")

    frames = {}
    for label, tags in (("802.1q", _tags(0x8100)), ("802.1ad", _tags(0x88A8)), ("qinq", _tags(0x88A8, 0x8100))):
        for src in (other.vip, "203.0.113.66", m.vip):
            for dport in ((port, UNSHARED) if src == m.vip else (port,)):
                marker = f"tagged {label} from {src} to {dport}".encode()
                frames[marker] = victim.mac + m.mac + tags + b"\x08\x00" + _udp(src, victim.vip, dport, marker)
        arp = (bytes.fromhex("0001080006040001") + m.mac + socket.inet_aton(claimed) + bytes(6)
               + socket.inet_aton(victim.vip))
        frames[f"arp {label}".encode()] = b"\xff" * 6 + m.mac + tags + b"\x08\x06" + arp
    barrier = os.urandom(16)
    barrier_frame = b"\xff" * 6 + m.mac + struct.pack("!H", ETH_P_IPX) + struct.pack(
        ">HHBB4s6sH4s6sH", 0xFFFF, 30 + len(barrier), 0, 4, bytes(4), b"\xff" * 6, 0x4000, bytes(4), m.mac,
        0x4001) + barrier
    for f in frames.values():
        tx.send(f)
    tx.send(barrier_frame)
    deadline = time.monotonic() + 10
    seen_barrier = False
    while not seen_barrier and time.monotonic() < deadline:
        barrier_rx.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = barrier_rx.recv(65535)
        except (TimeoutError, socket.timeout):
            break
        seen_barrier = data.endswith(barrier)
    assert seen_barrier, f"the IPX barrier frame never reached {victim.name}'s {DEV}\n{w.ol.dump()}"
    leaked = []
    for p, s in rx.items():
        leaked += [(p, d, src) for d, src in _received(s, time.monotonic() + 0.5) if d in frames]
    assert not leaked, f"tagged IPv4 reached {victim.name}'s kernel: {leaked}"
    assert _neigh(nl, victim.host, claimed) is None, f"a tagged ARP made {claimed} mallory's on {victim.name}"
    # ... while the plain datagram still arrives (nothing above broke the path)
    w.ol.wait(plain_arrives, 10, f"a plain datagram from mallory still reaches {victim.name}")


def _tcp_connects(nl: natlab.NatLab, host: str, addr: str, port: int, timeout: float = 5) -> bool:
    """A TCP connection from ``host`` to (``addr``, ``port``), a link-local address on its ovl0."""
    code = (f"import socket; socket.create_connection(({addr + '%' + DEV!r}, {port}), timeout={timeout}).close()")
    return nl.run(host, ["python3", "-c", code], check=False, timeout=timeout + 10).returncode == 0


def test_only_shared_tap_node_is_not_reachable_over_ipv6_link_local(world):
    w = world
    nl = w.nl
    for n in (w.mallory, w.target, w.open):   # the lab turns IPv6 off; a desktop has it on
        nl.run(n.host, ["sysctl", "-qw", f"net.ipv6.conf.{DEV}.accept_dad=0", f"net.ipv6.conf.{DEV}.disable_ipv6=0"])
        n.ll = w.ol.wait(lambda n=n: _link_local(nl, n.host), 10, f"{n.name}: a link-local address on {DEV}")
    listeners = []
    for n in (w.target, w.open):
        s6 = nl.socket(n.host, socket.AF_INET6, socket.SOCK_STREAM)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.bind(("::", UNSHARED))
        s6.listen(4)
        s4 = nl.socket(n.host, type=socket.SOCK_STREAM)
        s4.bind(("0.0.0.0", SHARED))
        s4.listen(4)
        listeners += [s6, s4]
    try:
        # IPv6 works between TAP members (the control), and mallory reaches target's shared port
        w.ol.wait(lambda: _tcp_connects(nl, w.mallory.host, w.open.ll, UNSHARED), 20,
                  "mallory reaches open over IPv6 link-local")
        code = f"import socket; socket.create_connection(({w.target.vip!r}, {SHARED}), timeout=5).close()"
        r = nl.run(w.mallory.host, ["python3", "-c", code], check=False, timeout=20)
        assert r.returncode == 0, r.stderr
        # --only-shared: an unshared port over IPv6 is no more reachable than over IPv4
        assert not _tcp_connects(nl, w.mallory.host, w.target.ll, UNSHARED), \
            "target (--only-shared) accepted a TCP connection to an unshared port over IPv6 link-local"
    finally:
        for s in listeners:
            s.close()

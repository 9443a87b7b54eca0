"""Gateway routes with real processes in the real-kernel NAT lab (``natlab.py``).

Site ``a`` (a NAT) holds two hosts on its LAN 10.0.1.0/24: ``a1`` runs the gateway member
(``overlay up --advertise-routes``, userspace, without any capability), ``a2`` only a plain web
server (``python -m http.server``) and a UDP echo, no overlay. ``b1``, behind another NAT, is a
member that reaches ``a2`` by its LAN address through its SOCKS5 / HTTP proxy and through
forwards, once the network's owner approved the route (TUN and TAP members too: their kernel, and
their SOCKS5 proxy through it); an unapproved advertised route and a
destination outside the approved ones are refused with a message. Pings to ``a2`` (a TUN
member's kernel ping, ``overlay ping`` from the userspace member) go unanswered, with one log
line naming the fix, until ``net.ipv4.ping_group_range`` of the gateway's namespace allows ping
sockets. The gateway's throughput (a 16 MiB download through SOCKS5) is printed, never asserted.
Then the network goes unencrypted: a capture between the NATs shows the payload, until the two
share an encrypted network too.

The second test makes a TUN (and a TAP) node the gateway: the kernel forwards (and masquerades) the
members' packets to the approved route only, and removes what it set up when the node stops.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

import lab
import natlab
from lab_overlay import OverlayLab

pytestmark = pytest.mark.netns

WEB_PORT = 8080
ECHO_PORT = 9999
BIG = 16 << 20

UDP_ECHO = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', %d))\n"
            "while True:\n    d, a = s.recvfrom(2048); s.sendto(b'echo:' + d, a)" % ECHO_PORT)


def _seen_on_wire(nl: natlab.NatLab, action, marker: bytes = b"hello from the LAN") -> bool:
    """Run ``action`` while capturing every frame crossing the lab's "Internet" (in ``pub``):
    whether ``marker`` appeared in one of them."""
    import threading
    sock = natlab._in_netns(nl.ns("pub").name,
                            lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
    # unbound: every interface of pub, so the bridge's ports too (frames bridged between two
    # sites never reach br0 itself)
    sock.settimeout(0.2)
    seen, frames, stop = [], [], threading.Event()

    def sniff():
        while not stop.is_set():
            try:
                frame = sock.recv(65535)
                frames.append(len(frame))
                if marker in frame:
                    seen.append(True)
            except socket.timeout:
                continue
    t = threading.Thread(target=sniff)
    t.start()
    try:
        action()
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
        sock.close()
    assert frames, "the capture saw nothing"
    return bool(seen)


def _proxy(node, kind: str) -> str:
    for p in node.status().get("proxies", []):
        if p["kind"] == kind:
            return p["address"]
    raise AssertionError(f"{node.name} has no {kind} proxy")


def test_member_reaches_a_lan_through_an_approved_gateway(tmp_path):
    lab.require_lab("conntrack")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the LAN\n")
    (www / "big.bin").write_bytes(os.urandom(BIG))
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=2)
        nl.add_site("b", "port_restricted")
        nl.add_site("c", "full_cone")
        nl.add_site("d", "port_restricted")
        lan_host = a.hosts[1].ip                      # a2: no overlay at all
        nl.popen("a2", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", lan_host], cwd=www, label="web")
        nl.popen("a2", ["python3", "-c", UDP_ECHO], label="echo")
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            gw = ol.start_node("a1", "gw", "--advertise-routes", "10.0.1.0/24,10.0.7.0/24")
            gw.stop()    # no capability at all (no CAP_NET_RAW either): what a user's login has
            gw.argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *gw.argv]
            gw.restart()
            m = ol.start_node("b1", "member", "--http-proxy", "127.0.0.1:0")
            tun = ol.start_node("c1", "tunmember", "--tun")     # kernel routes to the LAN through ovl0
            tap = ol.start_node("d1", "tapmember", "--tap")     # and ARP for LAN hosts answered locally
            ol.pair(gw, m, "home", tun, tap)
            ol.wait(lambda: m.peer("gw") and m.peer("gw")["online"], 20, "member sees the gateway")
            socks, http = _proxy(m, "socks5"), _proxy(m, "http")

            def curl(*args: str, timeout: float = 30):
                return nl.run("b1", ["curl", "-sS", "--max-time", "20", *args], check=False, timeout=timeout)

            # advertised but not approved: not usable, and the proxy says why
            g = gw.status()["gateway"]
            assert (g["advertised"], g["approved"], g["mode"]) == (["10.0.1.0/24", "10.0.7.0/24"], [], "userspace")
            r = curl("-x", f"http://{http}", f"http://{lan_host}:{WEB_PORT}/")
            assert "no approved gateway route of your networks contains it" in r.stdout, r.stdout + r.stderr
            assert curl("--socks5-hostname", socks, f"http://{lan_host}:{WEB_PORT}/").returncode != 0

            listing = gw.ok("admin", "routes", "home")
            assert "10.0.1.0/24 (not approved)" in listing and "10.0.7.0/24 (not approved)" in listing
            assert "approved" in gw.ok("admin", "routes", "home", "approve", "gw", "10.0.1.0/24")
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == ["10.0.1.0/24"], 10, "route handed to member")
            ol.wait(lambda: gw.status()["gateway"]["approved"] == ["10.0.1.0/24"], 10, "gateway knows")

            # SOCKS5 (name resolution at the proxy: the LAN address as given) and the HTTP proxy
            r = curl("--socks5-hostname", socks, f"http://{lan_host}:{WEB_PORT}/index.html")
            assert r.returncode == 0 and r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()
            r = curl("-x", f"http://{http}", f"http://{lan_host}:{WEB_PORT}/index.html")
            assert r.stdout == "hello from the LAN\n", r.stdout + r.stderr
            # TUN and TAP members: the kernel itself, no proxy, by LAN address
            for node in (tun, tap):
                ol.wait(lambda node=node: "10.0.1.0/24" in nl.run(node.host, ["ip", "route", "show", "dev", "ovl0"]).stdout,
                        10, f"{node.name}: kernel route to the LAN")
                r = nl.run(node.host, ["curl", "-sS", "--max-time", "20", f"http://{lan_host}:{WEB_PORT}/index.html"],
                           check=False, timeout=30)
                assert r.returncode == 0 and r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()
                # ... and their own SOCKS5 proxy, which dials through that kernel route
                r = nl.run(node.host, ["curl", "-sS", "--max-time", "20", "--socks5-hostname", _proxy(node, "socks5"),
                                       f"http://{lan_host}:{WEB_PORT}/index.html"], check=False, timeout=30)
                assert r.returncode == 0 and r.stdout == "hello from the LAN\n", f"{node.name}: {r.stdout}{r.stderr}"

            # ICMP echo: this namespace's ping_group_range is the kernel's "1 0" and the gateway has no
            # CAP_NET_RAW, so no answer and one line naming the fix; then the sysctl lets ping sockets in
            assert nl.run("a1", ["sysctl", "-n", "net.ipv4.ping_group_range"]).stdout.split() == ["1", "0"]
            caps = nl.run("a1", ["grep", "CapEff", f"/proc/{gw.proc.popen.pid}/status"]).stdout
            r = nl.run("c1", ["ping", "-c", "2", "-i", "0.3", "-W", "1", lan_host], check=False)
            assert r.returncode != 0, r.stdout
            assert all(p["rtt_ms"] is None for p in m.ping(lan_host, count=2))
            ol.wait(lambda: "net.ipv4.ping_group_range" in gw.log(), 10, "the gateway names the sysctl")
            assert gw.log().count("net.ipv4.ping_group_range") == 1, gw.log()[-3000:]
            assert "net.ipv4.ping_group_range='0 2147483647'" in " ".join(gw.ok("status").split())
            nl.run("a1", ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
            time.sleep(2.2)     # gateway_icmp.RETRY

            def kernel_ping() -> str | None:
                r = nl.run("c1", ["ping", "-c", "3", "-i", "0.3", "-W", "2", lan_host], check=False)
                return r.stdout if r.returncode == 0 else None
            assert f"from {lan_host}" in ol.wait(kernel_ping, 15, "kernel ping answered through the gateway")
            probes = m.ping(lan_host, count=3)
            assert any(p["rtt_ms"] is not None for p in probes), probes
            assert all(p["gateway"] == "gw" and p["ip"] == lan_host for p in probes), probes
            assert "pong from " + lan_host + " (through gateway gw)" in m.ok("ping", lan_host, "-c", "2")
            g = gw.status()["gateway"]
            assert g["mode"] == "userspace" and g["icmp"] == "ping socket" and g["stats"]["echo_replies"] >= 4, g
            assert caps.split()[1] == "0000000000000000", caps
            # outside the approved routes: no gateway route, refused by the member itself
            r = m.cli("ping", "10.0.7.5", "-c", "1")
            assert r.returncode == 1 and "no peer named '10.0.7.5'" in r.stdout + r.stderr, r.stdout + r.stderr

            # a forward to the LAN host, TCP and UDP
            out = m.ok("forward", "18080", f"{lan_host}:{WEB_PORT}", "--json")
            import json
            fport = int(json.loads(out)["listen"].rsplit(":", 1)[1])
            r = curl(f"http://127.0.0.1:{fport}/index.html")
            assert r.stdout == "hello from the LAN\n", r.stdout + r.stderr
            out = m.ok("forward", "19999/udp", f"{lan_host}:{ECHO_PORT}", "--json")
            uport = int(json.loads(out)["listen"].rsplit(":", 1)[1])
            s = nl.udp_socket("b1", timeout=2.0)
            got = None
            for _ in range(5):
                s.sendto(b"ping-udp", ("127.0.0.1", uport))
                try:
                    got = s.recv(2048)
                    break
                except socket.timeout:
                    continue
            assert got == b"echo:ping-udp", ol.dump()

            # outside the approved routes (the unapproved advertised one included): refused with the reason
            for dest in ("10.0.7.5", "10.0.9.9"):
                r = curl("-x", f"http://{http}", f"http://{dest}:{WEB_PORT}/")
                assert f"{dest} is not an overlay address and no approved gateway route" in r.stdout, r.stdout
            # inside, but nothing listens on that port of the LAN host: refused at once, saying so
            t0 = time.monotonic()
            r = curl("-x", f"http://{http}", f"http://{lan_host}:{WEB_PORT + 1}/")
            assert f"{lan_host}:{WEB_PORT + 1} refused the connection (reached through gateway gw)" in r.stdout, \
                r.stdout + r.stderr
            assert time.monotonic() - t0 < 8
            # no such host in the LAN: what the gateway saw (no answer / host unreachable), not "refused"
            r = curl("-x", f"http://{http}", f"http://10.0.1.77:{WEB_PORT}/")
            assert ("gateway gw got no answer from it" in r.stdout or "gateway gw reports host unreachable"
                    in r.stdout) and "refused" not in r.stdout, r.stdout + r.stderr

            # throughput through the gateway (printed)
            t0 = time.monotonic()
            r = curl("--socks5-hostname", socks, "-o", "/dev/null", "-w", "%{size_download}",
                     f"http://{lan_host}:{WEB_PORT}/big.bin", timeout=90)
            secs = time.monotonic() - t0
            assert r.stdout == str(BIG), r.stdout + r.stderr
            print(f"\ngateway: {BIG >> 20} MiB through SOCKS5 in {secs:.2f} s = {BIG * 8 / secs / 1e6:.0f} Mbit/s "
                  f"(path {m.peer('gw')['path']})")

            # unencrypted network: the same fetch is readable on the wire between the NATs, yet
            # authenticated; a second, encrypted network shared by the two keeps encryption
            assert not _seen_on_wire(nl, lambda: curl("--socks5-hostname", socks,
                                                      f"http://{lan_host}:{WEB_PORT}/index.html"))
            gw.ok("admin", "encryption", "home", "off")
            ol.wait(lambda: (m.peer("gw") or {}).get("encrypted") is False, 10, "member: gw unencrypted")
            ol.wait(lambda: (gw.peer("member") or {}).get("encrypted") is False, 10, "gw: member unencrypted")
            assert "UNENCRYPTED" in m.ok("status") and "(unencrypted)" in m.ok("status")
            r = None

            def fetch_plain():
                nonlocal r
                r = curl("--socks5-hostname", socks, f"http://{lan_host}:{WEB_PORT}/index.html")
            assert _seen_on_wire(nl, fetch_plain), ol.dump()
            assert r.stdout == "hello from the LAN\n"
            m.ok("create", "safe", "--password", "pw2")
            gw.ok("join", "safe", "--password", "pw2")
            ol.wait(lambda: (m.peer("gw") or {}).get("encrypted") is True, 10, "mixed networks: encrypted")
            ol.wait(lambda: (gw.peer("member") or {}).get("encrypted") is True, 10, "mixed networks: encrypted")
            assert not _seen_on_wire(nl, fetch_plain) and r.stdout == "hello from the LAN\n", r.stdout + r.stderr

            # removing the route makes it unusable again
            gw.ok("admin", "routes", "home", "remove", "gw", "10.0.1.0/24")
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == [], 10, "route withdrawn")
            ol.wait(lambda: "10.0.1.0/24" not in nl.run("c1", ["ip", "route", "show", "dev", "ovl0"]).stdout, 10,
                    "kernel route withdrawn on the TUN member")
            r = curl("-x", f"http://{http}", f"http://{lan_host}:{WEB_PORT}/index.html")
            assert "no approved gateway route" in r.stdout, r.stdout
        finally:
            ol.close()


def _inject(nl: natlab.NatLab, host: str, home, gw_key: bytes, gw_addr: tuple[str, int], packets: list[bytes],
            wait: float = 4.0) -> list[bytes]:
    """Speak WireGuard with the member key in ``home`` (its node stopped) to the gateway at
    ``gw_addr`` from lab host ``host``, send the hand-built inner ``packets``; the inner packets
    that come back within ``wait`` seconds."""
    from overlay.node.home import Home
    from overlay.wire.device import Device
    from overlay.wire.events import PacketReceived
    dev = Device(Home(home).private_key())
    dev.add_peer(gw_key, endpoint=gw_addr)
    sock = nl.udp_socket(host, timeout=0.1)
    dev.send(gw_key, packets[0], time.monotonic())
    rest = packets[1:]     # once the session is up: more than the handshake's staging queue holds
    got: list[bytes] = []
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if rest and dev.peer_stats(gw_key)["has_session"]:
            for p in rest:
                dev.send(gw_key, p, time.monotonic())
            rest = []
        for data, addr in dev.datagrams_to_send():
            sock.sendto(data, addr)
        try:
            data, addr = sock.recvfrom(65535)
            dev.receive(data, addr, time.monotonic())
        except socket.timeout:
            pass
        if (t := dev.get_timer()) is not None and t <= time.monotonic():
            dev.handle_timer(time.monotonic())
        while (ev := dev.next_event()) is not None:
            if isinstance(ev, PacketReceived) and ev.packet:
                got.append(bytes(ev.packet))
    return got


def _echo(src: str, dst: str, seq: int) -> bytes:
    from overlay.netstack.wire import ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4
    return build_ipv4(socket.inet_aton(src), socket.inet_aton(dst), PROTO_ICMP,
                      build_icmp(ICMP_ECHO_REQUEST, 0, 0x7777 << 16 | seq, b"hand-built"))


@pytest.mark.parametrize("kind", ["tun", "tap"])
def test_tun_node_as_the_gateway_forwards_approved_routes_only(tmp_path, kind):
    lab.require_lab("conntrack", "tun")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the LAN\n")
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=4)
        nl.add_site("b", "port_restricted")
        nl.add_site("c", "full_cone")
        gw_lan, web, other = a.hosts[0].ip, a.hosts[1].ip, a.hosts[2].ip   # a4: the hand-built sender
        web_proc = nl.popen("a2", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", web], cwd=www,
                            label="web")
        nl.popen("a3", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", other], cwd=www, label="other")
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            gw = ol.start_node("a1", "gw", f"--{kind}", "--advertise-routes", f"{web}/32,{other}/32")
            m = ol.start_node("b1", "member")
            tun = ol.start_node("c1", "tunmember", "--tun")
            ol.pair(gw, m, "home", tun)
            assert gw.ok("admin", "routes", "home", "approve", "gw", f"{web}/32")     # not `other`
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == [f"{web}/32"], 10, "route handed to member")
            ol.wait(lambda: (gw.status().get("gateway") or {}).get("stats", {}).get("forwarding"), 10,
                    "the gateway forwards")
            g = gw.status()["gateway"]
            assert g["mode"] == "kernel" and g["approved"] == [f"{web}/32"], g
            sysctl = nl.run("a1", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.ovl0.forwarding",
                                   "net.ipv4.conf.eth0.forwarding"]).stdout.split()
            assert sysctl == ["0", "1", "1"], sysctl     # per interface, not the global switch
            assert (f"gateway for {web}/32 (waiting for approval: {other}/32) (the kernel forwards)"
                    in " ".join(gw.ok("status").split()))
            assert "masquerade" in nl.run("a1", ["nft", "list", "table", "ip", "overlay_ovl0"]).stdout

            # a userspace member through SOCKS5, a TUN member with kernel curl and ping
            socks = _proxy(m, "socks5")
            r = nl.run("b1", ["curl", "-sS", "--max-time", "20", "--socks5-hostname", socks,
                              f"http://{web}:{WEB_PORT}/index.html"], check=False, timeout=30)
            assert r.returncode == 0 and r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()
            ol.wait(lambda: web in nl.run("c1", ["ip", "route", "show", "dev", "ovl0"]).stdout, 10, "kernel route")
            r = nl.run("c1", ["curl", "-sS", "--max-time", "20", f"http://{web}:{WEB_PORT}/index.html"],
                       check=False, timeout=30)
            assert r.returncode == 0 and r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()
            r = nl.run("c1", ["ping", "-c", "3", "-i", "0.3", "-W", "2", web], check=False)
            assert r.returncode == 0 and f"from {web}" in r.stdout, r.stdout + r.stderr
            assert any(p["rtt_ms"] is not None for p in m.ping(web, count=3))
            # the LAN host saw the gateway machine as the client (masquerade), not a pool address
            ol.wait(lambda: web_proc.stderr().count(f"{gw_lan} - - ") >= 2, 5, "web log")
            assert "100.6" not in web_proc.stderr(), web_proc.stderr()

            # outside the approved route: the member's proxy refuses, its data plane has no route
            r = nl.run("b1", ["curl", "-sS", "--max-time", "10", "--socks5-hostname", socks,
                              f"http://{other}:{WEB_PORT}/"], check=False, timeout=20)
            assert r.returncode != 0 and r.stdout == "", r.stdout
            nl.run("c1", ["ip", "route", "add", f"{other}/32", "dev", "ovl0"])
            r = nl.run("c1", ["curl", "-sS", "--max-time", "5", f"http://{other}:{WEB_PORT}/"], check=False,
                       timeout=15)
            assert r.returncode != 0, r.stdout

            # and a member that builds packets by hand (its key, its own WireGuard): the gateway
            # forwards the approved destination only; `other` (same LAN) and the Internet get nothing
            m_ip = m.status()["node"]["virtual_ip"]
            routed = gw.status()["gateway"]["stats"]["routed"]
            m.stop()
            gw_key = __import__("base64").b64decode(gw.status()["node"]["public_key"])
            got = _inject(nl, "a4", m.home, gw_key, (gw_lan, gw.status()["udp"]["port"]),
                          [_echo(m_ip, web, 1), _echo(m_ip, other, 2), _echo(m_ip, "198.51.100.10", 3),
                           _echo(m_ip, gw_lan, 4)])
            from overlay.netstack.wire import parse_icmp, parse_ipv4
            replies = sorted((socket.inet_ntoa(ip.src), parse_icmp(ip.payload).rest & 0xFFFF)
                             for ip in map(parse_ipv4, got) if ip.proto == 1)
            assert replies == [(web, 1)], (replies, ol.dump())
            assert gw.status()["gateway"]["stats"]["routed"] == routed + 1

            if kind == "tun":
                # a crash leaves the table (still filtering) and eth0's forwarding on; the next run
                # takes both over, so its clean exit switches eth0 back off
                os.killpg(gw.proc.popen.pid, 9)
                gw.proc.popen.wait(10)
                assert "overlay_ovl0" in nl.run("a1", ["nft", "list", "tables"]).stdout
                assert nl.run("a1", ["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"]).stdout.strip() == "1"
                gw.restart()
                ol.wait(lambda: (gw.status().get("gateway") or {}).get("stats", {}).get("forwarding"), 20,
                        "the restarted gateway forwards")
                assert "previous run left (eth0)" in gw.log(), gw.log()[-2000:]
                assert nl.run("a1", ["nft", "list", "tables"]).stdout.count("overlay_") == 1
                # (the member's old session with the killed process is gone: a ping from the gateway
                # makes the new process start one at once instead of after WireGuard's rekey timeout)
                nl.run("a1", ["ping", "-c", "2", "-W", "1", tun.status()["node"]["virtual_ip"]], check=False)
                ol.wait(lambda: nl.run("c1", ["ping", "-c", "1", "-W", "1", web], check=False).returncode == 0, 40,
                        "ping through the restarted gateway")

            # stopping the gateway removes its table and switches forwarding back off
            gw.stop()
            assert nl.run("a1", ["nft", "list", "tables"]).stdout.count("overlay_") == 0
            assert nl.run("a1", ["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"]).stdout.strip() == "0"
        finally:
            ol.close()


@pytest.mark.parametrize("own", ["192.168.77.1", "192.168.77.5"])
def test_tun_gateway_forwards_whatever_its_own_address_in_the_lan(tmp_path, own):
    """The TUN gateway's LAN interface holds ``own`` in the advertised 192.168.77.0/24 (the
    subnet's first address, where ``ip route get`` answers ``lo``, or another one): forwarding is
    switched on for that interface too, and a member reaches the LAN host (TCP through SOCKS5,
    ICMP echo)."""
    lab.require_lab("conntrack", "tun")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the LAN\n")
    host = "192.168.77.20"
    with natlab.NatLab() as nl:
        nl.add_site("a", "port_restricted", hosts=2)
        nl.add_site("b", "port_restricted")
        nl.run("a1", ["ip", "addr", "add", f"{own}/24", "dev", "eth0"])
        nl.run("a2", ["ip", "addr", "add", f"{host}/24", "dev", "eth0"])
        nl.popen("a2", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", host], cwd=www, label="web")
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            gw = ol.start_node("a1", "gw", "--tun", "--advertise-routes", "192.168.77.0/24")
            m = ol.start_node("b1", "member")
            ol.pair(gw, m, "home")
            gw.ok("admin", "routes", "home", "approve", "gw", "192.168.77.0/24")
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == ["192.168.77.0/24"], 10, "route handed out")
            ol.wait(lambda: (gw.status().get("gateway") or {}).get("stats", {}).get("forwarding"), 10,
                    "the gateway forwards")
            assert nl.run("a1", ["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"]).stdout.strip() == "1"
            r = nl.run("b1", ["curl", "-sS", "--max-time", "15", "--socks5-hostname", _proxy(m, "socks5"),
                              f"http://{host}:{WEB_PORT}/index.html"], check=False, timeout=25)
            assert r.returncode == 0 and r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()
            assert any(p["rtt_ms"] is not None for p in m.ping(host, count=3)), ol.dump()
        finally:
            ol.close()


def test_members_drop_a_route_their_gateway_no_longer_advertises(tmp_path):
    """The gateway restarted without --advertise-routes: its members drop the approved route as
    soon as it is back online, and refuse dials into it at once, naming the gateway (SOCKS5, the
    HTTP proxy with the reason, overlay ping), instead of sending them to a gateway that drops them."""
    lab.require_lab("conntrack")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the LAN\n")
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=2)
        nl.add_site("b", "port_restricted")
        lan_host = a.hosts[1].ip
        nl.popen("a2", ["python3", "-m", "http.server", str(WEB_PORT), "--bind", lan_host], cwd=www, label="web")
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            gw = ol.start_node("a1", "gw", "--advertise-routes", "10.0.1.0/24")
            m = ol.start_node("b1", "member", "--http-proxy", "127.0.0.1:0")
            ol.pair(gw, m, "home")
            gw.ok("admin", "routes", "home", "approve", "gw", "10.0.1.0/24")
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == ["10.0.1.0/24"], 10, "route handed to member")
            socks, http = _proxy(m, "socks5"), _proxy(m, "http")

            def curl(*args: str):
                return nl.run("b1", ["curl", "-sS", "--max-time", "20", *args], check=False, timeout=30)
            r = curl("--socks5-hostname", socks, f"http://{lan_host}:{WEB_PORT}/index.html")
            assert r.stdout == "hello from the LAN\n", r.stdout + r.stderr + ol.dump()

            gw.stop()
            i = gw.argv.index("--advertise-routes")
            gw.argv = gw.argv[:i] + ["--advertise-routes", ""] + gw.argv[i + 2:]   # plain `up` would reuse them
            gw.restart()
            ol.wait(lambda: (p := m.peer("gw")) and p["online"] and p["routes"] == []
                    and p["withdrawn"] == ["10.0.1.0/24"], 30, "the member sees the route withdrawn")
            why = f"{lan_host}: gateway gw no longer advertises 10.0.1.0/24"
            r = curl("-x", f"http://{http}", f"http://{lan_host}:{WEB_PORT}/index.html")
            assert why in r.stdout, r.stdout + r.stderr
            r = curl("--socks5-hostname", socks, f"http://{lan_host}:{WEB_PORT}/index.html")
            assert r.returncode != 0 and r.stdout == "", r.stdout
            ol.wait(lambda: m.log().count(why) >= 2, 5, "the member logs the SOCKS refusal")
            r = m.cli("ping", lan_host, "-c", "1")
            assert r.returncode != 0 and why in r.stdout + r.stderr, r.stdout + r.stderr
        finally:
            ol.close()


def test_one_member_cannot_fill_a_userspace_gateways_tables(tmp_path):
    """A member (its key, its own WireGuard: hand-built packets) opens more UDP flows and ICMP echo
    identifiers toward the LAN host than the gateway's tables hold, and keeps them busy; another
    member's datagrams and pings to the LAN still get through at once."""
    lab.require_lab("conntrack")
    from overlay.netstack.wire import build_udp
    from overlay.node import gateway, gateway_icmp
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=3)
        nl.add_site("b", "port_restricted")
        nl.add_site("c", "port_restricted")
        lan_host = a.hosts[1].ip
        nl.popen("a2", ["python3", "-c", UDP_ECHO], label="echo")
        nl.run("a1", ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        ol = OverlayLab(nl)
        try:
            ol.start_server()
            gw = ol.start_node("a1", "gw", "--advertise-routes", "10.0.1.0/24")
            hog = ol.start_node("b1", "hog")
            m = ol.start_node("c1", "member")
            ol.pair(gw, hog, "home", m)
            gw.ok("admin", "routes", "home", "approve", "gw", "10.0.1.0/24")
            ol.wait(lambda: (m.peer("gw") or {}).get("routes") == ["10.0.1.0/24"], 10, "route handed to member")
            ol.wait(lambda: (hog.peer("gw") or {}).get("routes") == ["10.0.1.0/24"], 10, "route handed to hog")
            out = m.ok("forward", "19999/udp", f"{lan_host}:{ECHO_PORT}", "--json")
            import json
            uport = int(json.loads(out)["listen"].rsplit(":", 1)[1])

            def member_udp() -> bytes | None:
                s = nl.udp_socket("c1", timeout=1.0)
                try:
                    for _ in range(3):
                        s.sendto(b"member", ("127.0.0.1", uport))
                        try:
                            return s.recv(2048)
                        except socket.timeout:
                            continue
                finally:
                    s.close()
                return None
            assert member_udp() == b"echo:member", ol.dump()

            hog_ip = hog.status()["node"]["virtual_ip"]
            gw_key = __import__("base64").b64decode(gw.status()["node"]["public_key"])
            gw_addr = (a.hosts[0].ip, gw.status()["udp"]["port"])
            hog.stop()
            src, dst = socket.inet_aton(hog_ip), socket.inet_aton(lan_host)
            from overlay.netstack.wire import PROTO_UDP, build_ipv4
            flood = [build_ipv4(src, dst, PROTO_UDP, build_udp(src, dst, 20000 + i, ECHO_PORT, b"hog"))
                     for i in range(gateway.MAX_UDP_FLOWS + 20)]
            flood += [_echo_id(hog_ip, lan_host, 0x1000 + i, 1) for i in range(gateway_icmp.MAX_FLOWS + 12)]
            got = _inject(nl, "a3", hog.home, gw_key, gw_addr, flood, wait=6.0)
            assert len(got) > gateway.MAX_UDP_FLOWS, len(got)      # the hog's flows and pings were carried
            stats = gw.status()["gateway"]["stats"]
            assert stats["udp_flows"] >= gateway.MAX_UDP_FLOWS and stats["echo_dropped"] >= 12, stats  # bounded

            # the tables are full of the hog's (fresh) entries: the member still gets through
            assert member_udp() == b"echo:member", ol.dump()
            probes = m.ping(lan_host, count=3)
            assert any(p["rtt_ms"] is not None for p in probes), (probes, ol.dump())
        finally:
            ol.close()


def _echo_id(src: str, dst: str, ident: int, seq: int) -> bytes:
    from overlay.netstack.wire import ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4
    return build_ipv4(socket.inet_aton(src), socket.inet_aton(dst), PROTO_ICMP,
                      build_icmp(ICMP_ECHO_REQUEST, 0, ident << 16 | seq, b"hand-built"))

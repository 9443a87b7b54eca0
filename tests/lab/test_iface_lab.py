"""``overlay up --tun`` / ``--tap`` with real kernels, in the real-kernel NAT lab, through the CLI.

One lab for the module: a server, two TUN nodes, three TAP nodes and one userspace node, each
behind its own NAT, all in one network. What is proven against the Linux kernel and programs
nobody here wrote (ping, curl, iperf3, Python's http.server):

- TUN: the device holds the virtual IP with the pool's prefix and an MTU that keeps the outer
  packet unfragmented; kernel ping both ways; curl and iperf3 between TUN nodes; 50 MB arrive
  sha256-equal through 5 % random loss;
- TAP: the device has the node's key-derived MAC; ARP for peers resolves to their MACs; a UDP
  datagram to 255.255.255.255 (and to the pool's broadcast address) from one TAP node reaches
  two TAP nodes and a TUN node; the per-sender broadcast cap holds;
- mixed: a userspace node's SOCKS5 proxy reaches a TUN node's kernel HTTP server; a TUN node's
  kernel reaches a userspace node's shared port; TAP <-> TUN ping;
- ``--only-shared`` admits shared ports, replies and ping, and nothing else;
- the interface's own address is never offered as a path candidate;
- privileges: without CAP_NET_ADMIN one ``error:`` line naming the command; with a persistent
  device from ``overlay setup-interface`` the node runs without it; stopping (or killing) a node
  removes what it added.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

import lab
import natlab
from lab_overlay import OVERLAY, PASSWORD, SERVER, OverlayLab, wait
from overlay.iface.ethernet import fmt_mac, node_mac
from overlay.node.dataplane import INNER_MTU
from overlay.node.peers import GROUP_BURST, GROUP_RATE

pytestmark = pytest.mark.netns

NET = "lan"
POOL_BROADCAST = "100.127.255.255"


@pytest.fixture(scope="module")
def world():
    lab.require_lab("nft", "ip", "ping", "curl", "iperf3")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    try:
        for site, nat in (("ta", "port_restricted"), ("tb", "full_cone"), ("pa", "port_restricted"),
                          ("pb", "port_restricted"), ("pc", "full_cone"), ("us", "port_restricted"),
                          ("os", "port_restricted"), ("pr", "port_restricted")):
            nl.add_site(site, nat)
        ol.start_server()
        w = World(nl, ol)
        w.tun1 = ol.start_node("ta1", "tun1", "--tun")
        w.tun2 = ol.start_node("tb1", "tun2", "--tun")
        w.tap1 = ol.start_node("pa1", "tap1", "--tap")
        w.tap2 = ol.start_node("pb1", "tap2", "--tap")
        w.tap3 = ol.start_node("pc1", "tap3", "--tap")
        # the userspace node runs with no capabilities at all: it needs no privileges, mixed or not
        w.user = ol.start_node("us1", "user1")
        w.user.stop()
        w.user.argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *w.user.argv]
        w.user.restart()
        w.guard = ol.start_node("os1", "guard", "--tun", "--only-shared")
        nodes = [w.tun1, w.tun2, w.tap1, w.tap2, w.tap3, w.user, w.guard]
        ol.pair(nodes[0], nodes[1], NET, *nodes[2:])
        for n in nodes:
            ol.wait(lambda n=n: len([p for p in n.status()["peers"] if p["online"]]) == len(nodes) - 1,
                    20, f"{n.name} sees everyone online")
        ok = True
        yield w
    finally:
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


class World:
    def __init__(self, nl: natlab.NatLab, ol: OverlayLab):
        self.nl, self.ol = nl, ol

    def vip(self, node) -> str:
        return node.status()["node"]["virtual_ip"]

    def run(self, node, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        r = self.nl.run(node.host, list(argv), check=False, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{node.host}: {' '.join(argv)} -> {r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def ping(self, src, dst_ip: str, count: int = 3) -> str:
        """Kernel ping from ``src``'s host; retried once (the first probe may start a handshake)."""
        r = self.run(src, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst_ip, check=False)
        if r.returncode != 0:
            r = self.run(src, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst_ip, check=False)
        assert r.returncode == 0, f"ping {dst_ip} from {src.name}: {r.stdout}{r.stderr}\n{self.ol.dump()}"
        return r.stdout

    def http_server(self, node, bind: str, port: int, directory: str):
        proc = self.nl.popen(node.host, ["python3", "-m", "http.server", str(port), "--bind", bind,
                                         "--directory", directory], label=self.ol.label(f"http-{node.name}"))
        wait(lambda: self.run(node, "ss", "-ltn", f"sport = :{port}").stdout.count("LISTEN"), 10,
             f"http.server on {node.name}")
        return proc


def test_tun_device_holds_the_address(world):
    w = world
    st = w.tun1.status()
    assert st["interface"] == {"kind": "tun", "name": "ovl0", "mtu": INNER_MTU, "mac": None}
    addr = json.loads(w.run(w.tun1, "ip", "-j", "addr", "show", "dev", "ovl0").stdout)[0]
    assert addr["mtu"] == INNER_MTU and "UP" in addr["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in addr["addr_info"] if a["family"] == "inet"]
    assert inet == [(st["node"]["virtual_ip"], 10)]
    routes = w.run(w.tun1, "ip", "route", "show", "dev", "ovl0").stdout
    assert "100.64.0.0/10" in routes and "255.255.255.255" in routes
    assert w.user.status()["interface"] is None
    caps = w.run(w.user, "grep", "CapEff", f"/proc/{w.user.proc.popen.pid}/status").stdout
    assert caps.split()[1] == "0000000000000000", caps   # the userspace node holds no capability
    # every member learns who has a kernel interface
    kinds = {p["name"]: p["iface"] for p in w.user.status()["peers"]}
    assert kinds == {"tun1": "tun", "tun2": "tun", "tap1": "tap", "tap2": "tap", "tap3": "tap", "guard": "tun"}


def test_tun_kernel_ping_both_ways(world):
    w = world
    assert "0% packet loss" in w.ping(w.tun1, w.vip(w.tun2))
    assert "0% packet loss" in w.ping(w.tun2, w.vip(w.tun1))


def test_tun_curl_and_iperf3(world, tmp_path):
    w = world
    (tmp_path / "hello.txt").write_text("hello through the tunnel\n")
    os.chmod(tmp_path, 0o755)
    vip2 = w.vip(w.tun2)
    srv = w.http_server(w.tun2, vip2, 8081, str(tmp_path))
    try:
        r = w.run(w.tun1, "curl", "-sS", "--max-time", "10", f"http://{vip2}:8081/hello.txt")
        assert r.stdout == "hello through the tunnel\n"
    finally:
        srv.stop()
    ip3 = w.nl.popen(w.tun2.host, ["iperf3", "-s", "-B", vip2, "-p", "5201", "-1"], label=w.ol.label("iperf3-s"))
    try:
        wait(lambda: w.run(w.tun2, "ss", "-ltn", "sport = :5201").stdout.count("LISTEN"), 10, "iperf3 server")
        r = w.run(w.tun1, "iperf3", "-c", vip2, "-p", "5201", "-t", "2", "-J", timeout=30)
        res = json.loads(r.stdout)
        received = res["end"]["sum_received"]["bytes"]
        print(f"iperf3 TUN -> TUN (lab, 2 s): {res['end']['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s")
        assert received > 1_000_000
    finally:
        ip3.stop()


def test_tun_50mb_through_loss(world):
    """50 MB from tun2's kernel to tun1's kernel with 5 % of the tunnel's UDP dropped at tun1's NAT."""
    w = world
    data = os.urandom(1 << 20) * 50
    want = hashlib.sha256(data).hexdigest()
    vip2 = w.vip(w.tun2)
    listener = w.nl.socket(w.tun2.host, type=socket.SOCK_STREAM)
    listener.bind((vip2, 9050))
    listener.listen(1)

    def serve():
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(data)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    w.nl.loss("ta", 5)
    try:
        conn = w.nl.socket(w.tun1.host, type=socket.SOCK_STREAM)
        conn.settimeout(20)
        conn.connect((vip2, 9050))
        h, n, end = hashlib.sha256(), 0, time.monotonic() + 120
        while time.monotonic() < end:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        conn.close()
    finally:
        w.nl.loss("ta", 0)
        listener.close()
    assert n == len(data) and h.hexdigest() == want


def test_tap_mac_and_arp(world):
    w = world
    st = w.tap1.status()
    mac = fmt_mac(node_mac(base64.b64decode(st["node"]["public_key"])))
    assert st["interface"] == {"kind": "tap", "name": "ovl0", "mtu": INNER_MTU, "mac": mac}
    link = json.loads(w.run(w.tap1, "ip", "-j", "link", "show", "dev", "ovl0").stdout)[0]
    assert link["address"] == mac
    text = w.tap1.ok("status")
    assert f"TAP device ovl0, MTU {INNER_MTU}, MAC {mac}" in text and "member (tun)" in text, text
    vip2 = w.vip(w.tap2)
    w.ping(w.tap1, vip2, 1)
    neigh = json.loads(w.run(w.tap1, "ip", "-j", "neigh", "show", vip2, "dev", "ovl0").stdout)
    assert neigh and neigh[0]["lladdr"] == w.tap2.status()["interface"]["mac"]
    # and a TUN peer (no Ethernet at all) is answered for too
    vip_tun = w.vip(w.tun1)
    w.ping(w.tap1, vip_tun, 1)
    neigh = json.loads(w.run(w.tap1, "ip", "-j", "neigh", "show", vip_tun, "dev", "ovl0").stdout)
    assert neigh and neigh[0]["lladdr"] == fmt_mac(node_mac(base64.b64decode(w.tun1.status()["node"]["public_key"])))


def test_tap_tun_ping(world):
    w = world
    w.ping(w.tap1, w.vip(w.tun2))
    w.ping(w.tun2, w.vip(w.tap1))


def _receivers(w, nodes, port):
    socks = []
    for n in nodes:
        s = w.nl.socket(n.host)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.settimeout(0.2)
        socks.append(s)
    return socks


def _drain(sock, until: float) -> list[tuple[bytes, tuple]]:
    got = []
    while time.monotonic() < until:
        try:
            got.append(sock.recvfrom(2048))
        except (socket.timeout, BlockingIOError):
            if got:
                break
    return got


@pytest.mark.parametrize("dest", ["255.255.255.255", POOL_BROADCAST])
def test_tap_broadcast_reaches_the_others(world, dest):
    """One datagram to the broadcast address from tap1 reaches tap2, tap3 and the TUN node tun1."""
    w = world
    port = 27960 if dest == "255.255.255.255" else 27961
    receivers = [w.tap2, w.tap3, w.tun1]
    socks = _receivers(w, receivers, port)
    sender = w.nl.socket(w.tap1.host)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    payload = b"\xff\xff\xff\xffgetinfo " + os.urandom(8).hex().encode()
    me = w.vip(w.tap1)
    try:
        for attempt in range(3):   # UDP: a first datagram may meet a handshake in progress
            sender.sendto(payload, (dest, port))
            results = [_drain(s, time.monotonic() + 2) for s in socks]
            if all(any(d == payload for d, _ in r) for r in results):
                break
        for n, r in zip(receivers, results):
            hits = [a for d, a in r if d == payload]
            assert hits, f"{n.name} did not receive the broadcast to {dest}"
            assert hits[0][0] == me
    finally:
        for s in socks + [sender]:
            s.close()


def test_group_rate_cap(world):
    """3,000 broadcasts at once from one node: a member receives about the burst, not all of them."""
    w = world
    port = 27990
    (recv,) = _receivers(w, [w.tap3], port)
    sender = w.nl.socket(w.tap2.host)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    n_sent = 3000
    t0 = time.monotonic()
    for i in range(n_sent):
        try:
            sender.sendto(i.to_bytes(4, "big") + b"x" * 60, ("255.255.255.255", port))
        except BlockingIOError:
            pass
    elapsed = time.monotonic() - t0
    got = _drain(recv, time.monotonic() + 3)
    recv.close()
    sender.close()
    allowed = GROUP_BURST + GROUP_RATE * (elapsed + 0.5)
    print(f"broadcast flood: sent {n_sent} in {elapsed:.2f} s, received {len(got)} (cap {allowed:.0f})")
    assert 50 <= len(got) <= allowed


def test_userspace_socks_reaches_tun_kernel(world, tmp_path):
    w = world
    (tmp_path / "k.txt").write_text("served by a kernel\n")
    os.chmod(tmp_path, 0o755)
    srv = w.http_server(w.tun2, "0.0.0.0", 8082, str(tmp_path))
    try:
        socks = next(p["address"] for p in w.user.status()["proxies"] if p["kind"] == "socks5")
        r = w.run(w.user, "curl", "-sS", "--max-time", "15", "--socks5-hostname", socks, "http://tun2:8082/k.txt")
        assert r.stdout == "served by a kernel\n"
    finally:
        srv.stop()


def test_tun_kernel_reaches_userspace_share(world, tmp_path):
    w = world
    (tmp_path / "u.txt").write_text("served behind a userspace node\n")
    os.chmod(tmp_path, 0o755)
    srv = w.http_server(w.user, "127.0.0.1", 8083, str(tmp_path))
    try:
        w.user.ok("share", "8083")
        r = w.run(w.tun1, "curl", "-sS", "--max-time", "15", f"http://{w.vip(w.user)}:8083/u.txt")
        assert r.stdout == "served behind a userspace node\n"
        # the TUN node's own SOCKS proxy dials through its kernel
        socks = next(p["address"] for p in w.tun1.status()["proxies"] if p["kind"] == "socks5")
        r = w.run(w.tun1, "curl", "-sS", "--max-time", "15", "--socks5-hostname", socks, "http://user1:8083/u.txt")
        assert r.stdout == "served behind a userspace node\n"
    finally:
        w.user.cli("unshare", "8083")
        srv.stop()


def _connects(w, node, ip: str, port: int, timeout: float = 3) -> bool:
    s = w.nl.socket(node.host, type=socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_only_shared(world):
    """guard runs --only-shared: its shared port is reachable, others are not; its own outbound
    connections and ping still work."""
    w = world
    gip = w.vip(w.guard)
    listeners = []
    for port in (7001, 7002):
        s = w.nl.socket(w.guard.host, type=socket.SOCK_STREAM)
        s.bind(("0.0.0.0", port))
        s.listen(4)
        listeners.append(s)
    for node, port in ((w.tun1, 7003), (w.tun2, 7002)):
        s = w.nl.socket(node.host, type=socket.SOCK_STREAM)
        s.bind((w.vip(node), port))
        s.listen(4)
        listeners.append(s)
    try:
        w.guard.ok("share", "7001")
        w.ping(w.tun1, gip, 1)
        assert _connects(w, w.tun1, gip, 7001)
        assert not _connects(w, w.tun1, gip, 7002)
        assert _connects(w, w.guard, w.vip(w.tun1), 7003)   # replies to its own connection come in
        assert _connects(w, w.tun1, w.vip(w.tun2), 7002)    # the same port on a node without the filter
    finally:
        w.guard.cli("unshare", "7001")
        for s in listeners:
            s.close()


def test_interface_address_is_no_candidate(world):
    w = world
    r = w.tun1.ok("netcheck", "--json", timeout=30)
    cands = [c["addr"] for c in json.loads(r)["candidates"]]
    assert cands and not any(c.startswith("100.") for c in cands), cands
    assert any(c.startswith("10.") for c in cands), cands   # the LAN address is still offered


# ---------------------------------------------------------------------------- privileges and cleanup
NO_NET_ADMIN = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
# nor CAP_NET_BIND_SERVICE: port 53 of the device's address is refused, DNS answers on the loopback
UNPRIVILEGED = ["setpriv", "--bounding-set=-net_admin,-net_bind_service",
                "--inh-caps=-net_admin,-net_bind_service", "--"]


def _up(w, host: str, home, name: str, *extra: str, prefix=()):
    argv = [*prefix, *OVERLAY, "up", "--server", SERVER, "--name", name, "--home", str(home),
            "--socks", "127.0.0.1:0", *extra]
    return w.nl.popen(host, argv, label=w.ol.label(f"node-{name}"))


def _connected(home) -> bool:
    from overlay.node import api
    try:
        return bool(api.call(home / "overlay.sock", "status", timeout=5)["server"]["connected"])
    except Exception:
        return False


def _dns_address(home) -> str:
    from overlay.node import api
    try:
        return (api.call(home / "overlay.sock", "status", timeout=5).get("dns") or {}).get("address") or ""
    except Exception:
        return ""


def _links(w, host: str) -> list[str]:
    return [link["ifname"] for link in json.loads(w.nl.run(host, ["ip", "-j", "link"]).stdout)]


def test_without_net_admin_one_error_line(world):
    lab.require_lab("setpriv")
    w = world
    home = w.ol.tmp / "noadmin"
    p = _up(w, "ta1", home, "noadmin", "--tun", "--dev", "ovlx0", prefix=NO_NET_ADMIN)
    rc = p.popen.wait(timeout=20)
    err = [line for line in p.stderr().splitlines() if "error:" in line]
    assert rc == 1 and len(err) == 1, p.stderr()
    assert "needs admin rights" in err[0] and "overlay setup-interface --tun --dev ovlx0 --user" in err[0], err[0]
    assert "ovlx0" not in _links(w, "ta1")


def test_persistent_device_runs_without_net_admin(world):
    """The admin's one-time setup-interface; then the node runs without CAP_NET_ADMIN. A device
    owned by another user is refused with the fix in the message."""
    lab.require_lab("setpriv")
    w = world
    host, dev = "pr1", "ovlp0"   # a host of its own: two overlay interfaces in one host would both route the pool
    w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "nobody"])
    home = w.ol.tmp / "persist"
    p = _up(w, host, home, "persist", "--tun", "--dev", dev, prefix=NO_NET_ADMIN)
    assert p.popen.wait(timeout=20) == 1
    assert "belongs to another user" in p.stderr(), p.stderr()
    w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "root"])
    p = _up(w, host, home, "persist", "--tun", "--dev", dev, prefix=NO_NET_ADMIN)
    # it runs; once it joins a network the server gives it its address, which it cannot set: the
    # one error line names the command
    w.ol.wait(lambda: _connected(home), 20, "unprivileged node connected")
    r = subprocess.run([*OVERLAY, "join", NET, "--password", PASSWORD, "--home", str(home)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert p.popen.wait(timeout=30) == 1
    m = re.search(r"--address (\S+)", p.stderr())
    assert m and "needs admin" in p.stderr(), p.stderr()
    w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "root", "--address", m.group(1)])
    p = _up(w, host, home, "persist", "--tun", "--dev", dev, prefix=UNPRIVILEGED)
    try:
        w.ol.wait(lambda: p.poll() is None and "holds" in p.stderr(), 20, "unprivileged node up", )
        vip = m.group(1).split("/")[0]
        # no right to bind port 53: DNS answers on the loopback, and status says where
        w.ol.wait(lambda: _dns_address(home).startswith("127.0.0.1:"), 20, "DNS on the loopback")
        r = subprocess.run([*OVERLAY, "status", "--home", str(home)], capture_output=True, text=True, timeout=30)
        assert f"DNS for peers on {_dns_address(home)}" in r.stdout, r.stdout + r.stderr
        assert f"port 53 of the device's address {vip} was refused" in r.stdout, r.stdout
        # the state the ping needs: the node back online at tun2 (presence, then a path), not luck
        w.ol.wait(lambda: (w.tun2.peer("persist") or {}).get("online"), 30, "tun2 sees the node back online")
        try:
            w.ol.wait(lambda: w.run(w.tun2, "ping", "-c", "1", "-W", "1", vip, check=False).returncode == 0,
                      30, f"ping {vip} from tun2 answered")
        except AssertionError as e:
            raise AssertionError(f"{e}\n----- the unprivileged node\n{p.stderr()[-3000:]}") from None
    finally:
        p.stop()
        w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "root", "--remove"])
    assert dev not in _links(w, host)


def test_stop_and_crash_leave_nothing(world):
    w = world
    host = "tb1"
    for how in ("stop", "kill"):
        home = w.ol.tmp / f"gone-{how}"
        p = _up(w, host, home, f"gone{how}", "--tap", "--dev", "ovlg0")
        w.ol.wait(lambda: "ovlg0" in _links(w, host) and "device ovlg0 created" in p.stderr(), 20, "device up")
        if how == "stop":
            p.stop()
        else:
            os.kill(p.popen.pid, 9)
            p.popen.wait(timeout=10)
        w.ol.wait(lambda: "ovlg0" not in _links(w, host), 10, f"device gone after {how}")
    # the next start works (nothing left that breaks it)
    p = _up(w, host, w.ol.tmp / "gone-kill", "gonekill", "--tap", "--dev", "ovlg0")
    try:
        w.ol.wait(lambda: "device ovlg0 created" in p.stderr(), 20, "restart after a crash")
    finally:
        p.stop()


def test_stop_removes_what_it_added_to_a_persistent_device(world):
    """On a device the node did not create, stopping removes exactly the address and route it added."""
    w = world
    host, dev = "pr1", "ovlq0"
    w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "root"])
    home = w.ol.tmp / "keeps"
    p = _up(w, host, home, "keeps", "--tun", "--dev", dev)
    try:
        w.ol.wait(lambda: _connected(home), 20, "node connected")
        r = subprocess.run([*OVERLAY, "join", NET, "--password", PASSWORD, "--home", str(home)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        w.ol.wait(lambda: "holds" in p.stderr(), 20, "address set")
        assert "inet 100." in w.nl.run(host, ["ip", "addr", "show", "dev", dev]).stdout
        assert "255.255.255.255" in w.nl.run(host, ["ip", "route", "show", "dev", dev]).stdout
        p.stop()
        assert dev in _links(w, host)                       # persistent: the device stays
        assert "inet " not in w.nl.run(host, ["ip", "addr", "show", "dev", dev]).stdout
        assert w.nl.run(host, ["ip", "route", "show", "dev", dev]).stdout.strip() == ""
    finally:
        p.stop()
        w.nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", dev, "--user", "root", "--remove"])


def test_interface_choice_is_remembered(world):
    """`overlay up` alone runs with the device (kind, --dev, --only-shared) the last run had, says so,
    and `--userspace` goes back to no device (and is remembered in turn)."""
    w = world
    host, home = "tb1", w.ol.tmp / "remembers"
    p = _up(w, host, home, "remembers", "--tap", "--dev", "ovlr0", "--only-shared")
    try:
        w.ol.wait(lambda: "device ovlr0 created" in p.stderr(), 20, "device up")
    finally:
        p.stop()
    assert json.loads((home / "prefs.json").read_text())["interface"] == {"kind": "tap", "dev": "ovlr0",
                                                                          "only_shared": True}
    p = _up(w, host, home, "remembers")
    try:
        w.ol.wait(lambda: "device ovlr0 created" in p.stderr(), 20, "device up again without the flags")
        assert "note: --tap --dev ovlr0 --only-shared as last time" in p.stderr()
        st = api_status(home)
        assert st["interface"]["kind"] == "tap" and st["interface"]["name"] == "ovlr0"
    finally:
        p.stop()
    p = _up(w, host, home, "remembers", "--userspace")
    try:
        w.ol.wait(lambda: _connected(home), 20, "userspace node connected")
        assert api_status(home)["interface"] is None and "ovlr0" not in _links(w, host)
    finally:
        p.stop()
    assert json.loads((home / "prefs.json").read_text())["interface"] is None
    p = _up(w, host, home, "remembers")
    try:
        w.ol.wait(lambda: _connected(home), 20, "node connected")
        assert api_status(home)["interface"] is None and "as last time" not in p.stderr()
    finally:
        p.stop()


def api_status(home) -> dict:
    from overlay.node import api
    return api.call(home / "overlay.sock", "status", timeout=5)

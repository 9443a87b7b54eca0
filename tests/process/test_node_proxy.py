"""Apps reach peers by name through real daemons: SOCKS5, HTTP proxy, forwards, shares.

Everything goes app -> proxy/forward on alice -> alice's userspace TCP/IP stack -> WireGuard ->
bob's stack -> bob's shared port -> a server on bob's 127.0.0.1. Clients are real: curl and
python-socks, plus a raw SOCKS5 UDP ASSOCIATE client.
"""

from __future__ import annotations

import http.server
import functools
import json
import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest
from python_socks.sync import Proxy

from cluster import OVERLAY, Cluster, free_port

pytestmark = pytest.mark.timeout(240)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    www = tmp / "www"
    www.mkdir()
    blob = os.urandom(1024 * 1024)
    (www / "blob.bin").write_bytes(blob)
    (www / "hello.txt").write_text("hello from bob\n")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))

    def echo_loop():
        while True:
            try:
                data, addr = echo.recvfrom(65536)
            except OSError:
                return
            echo.sendto(b"echo:" + data, addr)
    threading.Thread(target=echo_loop, daemon=True).start()

    with Cluster(tmp) as c:
        c.start_server()
        alice = c.start_node("alice", "--http-proxy", "127.0.0.1:0")
        bob = c.start_node("bob")
        alice.ok("create", "lan", "--password", "pw")
        bob.ok("join", "lan", "--password", "pw")
        c.wait(lambda: (alice.peer("bob") or {}).get("online"), what="alice sees bob")
        web, udp = httpd.server_address[1], echo.getsockname()[1]
        bob.ok("share", str(web))
        bob.ok("share", f"{udp}/udp")
        proxies = {p["kind"]: p["address"] for p in alice.status()["proxies"]}
        yield {"c": c, "alice": alice, "bob": bob, "web": web, "udp": udp, "blob": blob,
               "socks": proxies["socks5"], "http": proxies["http"]}
    httpd.shutdown()
    echo.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True, timeout=60)


def test_curl_socks5_by_name(net, tmp_path):
    out = tmp_path / "b"
    for host in ("bob", "bob.lan", "BOB"):
        r = curl("--socks5-hostname", net["socks"], "-o", str(out), f"http://{host}:{net['web']}/blob.bin")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == net["blob"]
    # by virtual IP too
    ip = net["alice"].peer("bob")["ip"]
    r = curl("--socks5", net["socks"], f"http://{ip}:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n"


def test_curl_http_proxy_plain_and_connect(net):
    r = curl("-x", f"http://{net['http']}", f"http://bob:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n", r.stderr
    r = curl("-p", "-x", f"http://{net['http']}", f"http://bob.lan:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n", r.stderr


def test_python_socks_client(net):
    s = Proxy.from_url(f"socks5://{net['socks']}", rdns=True).connect(dest_host="bob", dest_port=net["web"], timeout=20)
    with s:
        s.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: bob\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"hello from bob\n")


def test_unshared_port_is_named(net):
    port = free_port()
    r = curl("-x", f"http://{net['http']}", f"http://bob:{port}/")
    assert f"bob does not share port {port}".encode() in r.stdout
    r = curl("--socks5-hostname", net["socks"], f"http://bob:{port}/")
    assert r.returncode == 97  # SOCKS5 reply "connection refused"
    net["c"].wait(lambda: f"bob does not share port {port}" in net["alice"].proc.output(), what="log line")
    # and on bob's side the refusal is logged with the fix
    net["c"].wait(lambda: f"port {port}: not shared" in net["bob"].proc.output(), what="bob's log line")


def test_shared_port_with_nothing_listening_is_refused_and_named(net):
    a, b = net["alice"], net["bob"]
    port = free_port()
    r = b.run("share", str(port))
    assert r.returncode == 0 and f"warning: nothing listens on 127.0.0.1:{port} yet" in r.stderr, r.stderr
    try:
        r = curl("-x", f"http://{net['http']}", f"http://bob:{port}/")
        assert f"bob shares port {port} but nothing listens there".encode() in r.stdout, r.stdout
        r = curl("--socks5-hostname", net["socks"], f"http://bob:{port}/")
        assert r.returncode == 97  # SOCKS5 reply "connection refused", as for an unshared port
        local = free_port()
        a.ok("forward", str(local), f"bob:{port}")
        curl(f"http://127.0.0.1:{local}/")
        net["c"].wait(lambda: f"bob shares port {port} but nothing listens there" in a.proc.output(),
                      what="forward log")
        a.ok("unforward", str(local))
        net["c"].wait(lambda: f"shared port {port}: nothing listens on 127.0.0.1:{port}" in b.proc.output(),
                      what="bob's log line")
        # once something listens, the same share works, and sharing warns no more
        srv = socket.socket()
        srv.bind(("127.0.0.1", port))
        srv.listen()
        try:
            r = b.run("share", str(port))
            assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
            r = curl("--socks5-hostname", net["socks"], "--max-time", "2", f"http://bob:{port}/")
            assert r.returncode == 28  # connected; our listener never answers: curl's timeout
        finally:
            srv.close()
    finally:
        b.ok("unshare", str(port))


def test_non_overlay_destinations_refused(net):
    r = curl("-x", f"http://{net['http']}", "http://example.invalid/")
    assert b"is not an overlay address" in r.stdout
    r = curl("--socks5-hostname", net["socks"], "http://example.invalid/")
    assert r.returncode == 97


def test_tcp_forward_runtime(net):
    a = net["alice"]
    local = free_port()
    assert "forwarding tcp" in a.ok("forward", str(local), f"bob:{net['web']}")
    r = curl(f"http://127.0.0.1:{local}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n"
    fw = a.status()["forwards"]
    assert any((f["listen"], f["peer"], f["peer_port"], f["proto"]) == (f"127.0.0.1:{local}", "bob", net["web"], "tcp")
               for f in fw)
    a.ok("unforward", str(local))
    assert all(f["listen"] != f"127.0.0.1:{local}" for f in a.status()["forwards"])
    assert curl(f"http://127.0.0.1:{local}/hello.txt").returncode == 7
    assert "not forwarded" in a.fails("unforward", str(local))
    # a forward to a port bob does not share logs the reason
    port, local2 = free_port(), free_port()
    a.ok("forward", str(local2), f"bob:{port}")
    curl(f"http://127.0.0.1:{local2}/")
    net["c"].wait(lambda: f"bob does not share port {port}" in a.proc.output(), what="forward log")
    a.ok("unforward", str(local2))


def test_udp_forward_and_share(net):
    a = net["alice"]
    local = free_port()
    a.ok("forward", f"{local}/udp", f"bob:{net['udp']}")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        for i in range(10):  # the first datagrams may race the flow setup
            s.sendto(b"ping%d" % i, ("127.0.0.1", local))
            try:
                data, _ = s.recvfrom(65536)
                break
            except socket.timeout:
                continue
        else:
            pytest.fail("no UDP echo through the forward")
        assert data.startswith(b"echo:ping")
    finally:
        s.close()
        a.ok("unforward", f"{local}/udp")


def udp_round_trips(sock: socket.socket, dest, make, sizes, expect) -> None:
    """Send one datagram of each size (retrying while the flow is set up) and check its echo."""
    for size in sizes:
        for _ in range(10):
            sock.sendto(make(size), dest)
            try:
                data, _ = sock.recvfrom(65536)
                break
            except socket.timeout:
                continue
        else:
            pytest.fail(f"no UDP echo of a {size}-byte datagram")
        assert data == expect(size), f"{size}-byte datagram came back as {len(data)} bytes"


LARGE = [1353, 1400, 2000, 9000, 32768, 65507 - len("echo:")]


def test_udp_datagrams_larger_than_the_mtu_cross_a_forward_and_socks(net):
    """IP fragmentation and reassembly in the userspace stacks of both nodes (inner MTU 1380)."""
    a = net["alice"]
    local = free_port()
    a.ok("forward", f"{local}/udp", f"bob:{net['udp']}")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    payload = lambda n: bytes(range(256)) * (n // 256) + b"z" * (n % 256)  # noqa: E731
    try:
        udp_round_trips(s, ("127.0.0.1", local), payload, LARGE, lambda n: b"echo:" + payload(n))
        # a burst of iperf3-sized datagrams: no log line per datagram
        for _ in range(200):
            s.sendto(payload(32768), ("127.0.0.1", local))
    finally:
        s.close()
        a.ok("unforward", f"{local}/udp")
    host, port = net["socks"].rsplit(":", 1)
    ctl = socket.create_connection((host, int(port)), timeout=10)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    try:
        ctl.sendall(b"\x05\x01\x00")
        assert ctl.recv(2) == b"\x05\x00"
        ctl.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
        rep = ctl.recv(10)
        assert rep[1] == 0, rep
        relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
        hdr = b"\x00\x00\x00\x03\x03bob" + struct.pack("!H", net["udp"])
        # the reply carries a SOCKS header too, so it must stay within 65,507 bytes
        udp_round_trips(u, relay, lambda n: hdr + payload(n), [1400, 2000, 32768, 60000],
                        lambda n: hdr + b"echo:" + payload(n))
    finally:
        u.close()
        ctl.close()
    log = a.proc.output() + net["bob"].proc.output()
    assert "Traceback" not in log and "exceeds" not in log, log[-3000:]


def test_iperf3_udp_default_through_a_forward(net):
    """Default ``iperf3 -u``: 32 KB datagrams (25 IP fragments each over the tunnel) at 1 Mbit/s."""
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    a, b = net["alice"], net["bob"]
    port, local = free_port(), free_port()
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        b.ok("share", str(port))
        b.ok("share", f"{port}/udp")
        a.ok("forward", str(local), f"bob:{port}")
        a.ok("forward", f"{local}/udp", f"bob:{port}")
        net["c"].wait(lambda: _tcp_listening(port), what="iperf3 server")
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(local), "-u", "-t", "2", "-J"],
                           capture_output=True, text=True, timeout=60)
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
        assert result["start"]["test_start"]["blksize"] > 1380
        received = result["end"]["sum_received"]
        assert received["packets"] > 0 and received["lost_percent"] < 10, received
    finally:
        srv.kill()
        srv.wait()
        a.run("unforward", str(local))
        a.run("unforward", f"{local}/udp")
        b.run("unshare", str(port))
        b.run("unshare", f"{port}/udp")


def _tcp_listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (without connecting: iperf3 -1 takes one client)."""
    with open("/proc/net/tcp") as f:
        return any(int(cols[1].split(":")[1], 16) == port and cols[3] == "0A"
                   for cols in (line.split() for line in list(f)[1:]))


def test_socks5_udp_associate(net):
    host, port = net["socks"].rsplit(":", 1)
    ctl = socket.create_connection((host, int(port)), timeout=10)
    try:
        ctl.sendall(b"\x05\x01\x00")
        assert ctl.recv(2) == b"\x05\x00"
        ctl.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
        rep = ctl.recv(10)
        assert rep[1] == 0, rep
        relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(2)
        name = b"bob"
        hdr = b"\x00\x00\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", net["udp"])
        try:
            for _ in range(10):
                u.sendto(hdr + b"via socks", relay)
                try:
                    data, _ = u.recvfrom(65536)
                    break
                except socket.timeout:
                    continue
            else:
                pytest.fail("no UDP answer through SOCKS5 UDP ASSOCIATE")
            assert data.endswith(b"echo:via socks")
        finally:
            u.close()
    finally:
        ctl.close()


def test_proxy_address_errors(net, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        home = tmp_path / "h"
        r = subprocess.run([*OVERLAY, "up", "--server", net["c"].server_addr, "--name", "late", "--home", str(home),
                            "--socks", f"127.0.0.1:{busy.getsockname()[1]}"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "in use" in r.stderr and "--socks" in r.stderr, r.stderr
        r = subprocess.run([*OVERLAY, "up", "--server", net["c"].server_addr, "--name", "late", "--home", str(home),
                            "--socks", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "without authentication" in r.stderr and "--proxy-user" in r.stderr, r.stderr
    finally:
        busy.close()


def test_daemon_proxies_survive_garbage(net):
    """Malformed and random input to the daemon's SOCKS5 and HTTP ports: a reply or a clean close,
    and the daemon keeps serving real clients afterwards."""
    import random
    rng = random.Random(1234)
    samples = [b"", b"\x05", b"\x05\x01", b"\x05\xff" + b"\x00" * 255, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
               b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 255, b"GET / HTTP/1.1\r\n\r\n",
               b"CONNECT bob:99999 HTTP/1.1\r\n\r\n", b"GET http://bob:" + b"9" * 100 + b"/ HTTP/1.1\r\n\r\n",
               b"X" * 70000, b"GET / HTTP/1.1\r\n" + b"H: v\r\n" * 200 + b"\r\n"]
    samples += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    for addr in (net["socks"], net["http"]):
        host, port = addr.rsplit(":", 1)
        for data in samples:
            s = socket.create_connection((host, int(port)), timeout=5)
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(65536):  # a reply, then a close; never a hang
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                s.close()
    assert net["alice"].proc.alive()
    r = curl("--socks5-hostname", net["socks"], f"http://bob:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n"
    r = curl("-x", f"http://{net['http']}", f"http://bob:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n"
    assert "Traceback" not in net["alice"].proc.output()


def test_proxy_beyond_loopback_needs_users(net, tmp_path):
    """With --proxy-user the SOCKS5 proxy may listen on every address, and demands the password."""
    from cluster import Node
    c = net["c"]
    n = Node(c, "carol", tmp_path / "home-carol")
    n.start("--socks", "0.0.0.0:0", "--proxy-user", "u:secret")
    c.nodes.append(n)
    c.wait(n.connected, what="carol connected")
    n.ok("join", "lan", "--password", "pw")
    c.wait(lambda: (n.peer("bob") or {}).get("online"), what="carol sees bob")
    port = n.status()["proxies"][0]["address"].rsplit(":", 1)[1]
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://bob:{net['web']}/hello.txt")
    assert r.returncode == 97  # no credentials: refused
    r = curl("-x", f"socks5h://u:secret@127.0.0.1:{port}", f"http://bob:{net['web']}/hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello from bob\n", r.stderr


def _socks_reply(net, url: str) -> int:
    """The SOCKS5 reply code curl reports for a refused request ("... (N)"), exit code 97."""
    import re
    r = curl("--socks5-hostname", net["socks"], url)
    m = re.search(rb"\((\d)\)\s*$", r.stderr)
    assert r.returncode == 97 and m, r.stderr
    return int(m.group(1))


def test_socks5_reply_codes_name_the_class_of_error(net, tmp_path):
    """Through a real node, curl shows the class of each refusal (the table in the README): 0x05
    refused (not shared, nothing listens), 0x02 not allowed (not an overlay address), 0x04 host
    unreachable (offline), 0x06 TTL expired (no answer in time); the log has the full reason."""
    import signal
    c, a, b = net["c"], net["alice"], net["bob"]
    port = free_port()
    assert _socks_reply(net, f"http://bob:{port}/") == 5
    b.ok("share", str(port))
    try:
        assert _socks_reply(net, f"http://bob:{port}/") == 5
    finally:
        b.ok("unshare", str(port))
    assert _socks_reply(net, "http://192.0.2.1/") == 2
    assert _socks_reply(net, "http://example.invalid/") == 2
    # dave shares a port but stops answering (SIGSTOP): a time-out; then dave is offline
    dave = c.start_node("dave")
    a.ok("create", "side", "--password", "pw")
    dave.ok("join", "side", "--password", "pw")
    dave.ok("share", str(port))
    c.wait(lambda: (a.peer("dave") or {}).get("path"), what="alice has a path to dave")
    os.killpg(dave.proc.p.pid, signal.SIGSTOP)
    try:
        assert _socks_reply(net, f"http://dave:{port}/") == 6
    finally:
        os.killpg(dave.proc.p.pid, signal.SIGCONT)
    c.wait(lambda: f"connecting to dave:{port} timed out after 10 s (reply 0x06)" in a.proc.output(), what="log")
    dave.ok("down")
    c.wait(lambda: not (a.peer("dave") or {"online": True})["online"], what="dave offline")
    assert _socks_reply(net, f"http://dave:{port}/") == 4
    c.wait(lambda: "dave is unreachable: it is offline (reply 0x04)" in a.proc.output(), what="log")


def test_a_dial_that_found_no_path_says_so():
    """A time-out with no path to the peer is "unreachable" (0x04), not "timed out" (0x06)."""
    import asyncio
    from overlay.node.services import OverlayDialer
    from overlay.proxy.dialer import DialTimeout, PeerUnreachable

    class Stalls:
        async def open_connection(self, ip, port, timeout):
            raise TimeoutError

    from overlay.node.state import Peer
    key = bytes(range(32))
    peer = Peer("bob", key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "100.64.0.2", True)
    paths: dict[bytes, str | None] = {key: None}
    d = OverlayDialer(lambda h: peer if h == "bob" else None, Stalls, path=paths.get)
    with pytest.raises(PeerUnreachable) as e:
        asyncio.run(d.open_connection("bob", 22))
    assert e.value.socks_reply == 0x04 and "no path to it" in e.value.message
    paths[key] = "direct 192.0.2.5:41641"
    with pytest.raises(DialTimeout) as e:
        asyncio.run(d.open_connection("bob", 22))
    assert e.value.socks_reply == 0x06

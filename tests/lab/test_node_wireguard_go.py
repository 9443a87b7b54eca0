"""Conformance of the real node (`overlay up`) with Debian's stock wireguard-go, both ways.

    [ns wg]    wireguard-go, TUN 10.100.0.1/24, UDP 10.99.0.1:51820, Linux kernel TCP and ping
                 | veth
    [ns node]  overlay up --address 10.100.0.2 --wg-peer KEY,10.99.0.1:51820,10.100.0.1/32
               (userspace TCP/IP stack; no admin rights needed by the node itself)

The kernel's ping and curl on the wireguard-go side talk to our userspace stack through our
WireGuard; our port forward reaches a kernel TCP server behind wireguard-go.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from repo_paths import REPO
import lab
from polling import wait
from overlay import crypto
from overlay.node.home import Home

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

WG_UDP, NODE_UDP = ("10.99.0.1", 51820), ("10.99.0.2", 51821)
WG_INNER, NODE_INNER = "10.100.0.1", "10.100.0.2"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
def wg_node(tmp_path, request):
    extra = list(getattr(request, "param", []))   # more `overlay up` options (--tun)
    lab.require_lab("wireguard-go", "wg", "ping", "curl", "tun")
    wg_ns, node_ns = lab.Netns("wg"), lab.Netns("node")
    ifname = f"wgn{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    home = tmp_path / "home"
    try:
        lab.veth(wg_ns, "v0", f"{WG_UDP[0]}/24", node_ns, "v1", f"{NODE_UDP[0]}/24")
        node_pub = crypto.public_key(Home(home).private_key())
        wg_priv = crypto.generate_private_key()
        procs.append(wg_ns.popen("wireguard-go", "-f", ifname, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, WG_PROCESS_FOREGROUND="1")))
        wait(lambda: Path(f"/var/run/wireguard/{ifname}.sock").exists(), 10, "wireguard-go UAPI socket")
        keyfile = tmp_path / "wg.key"
        keyfile.write_text(b64(wg_priv) + "\n")
        keyfile.chmod(0o600)
        wg_ns.run("wg", "set", ifname, "private-key", str(keyfile), "listen-port", str(WG_UDP[1]),
                  "peer", b64(node_pub), "allowed-ips", f"{NODE_INNER}/32",
                  "endpoint", f"{NODE_UDP[0]}:{NODE_UDP[1]}")
        wg_ns.run("ip", "addr", "add", f"{WG_INNER}/24", "dev", ifname)
        wg_ns.run("ip", "link", "set", ifname, "up")
        log = open(tmp_path / "node.log", "wb")
        procs.append(node_ns.popen(
            sys.executable, "-m", "overlay", "up", "--name", "ovl", "--home", str(home), "--socks", "off",
            "--address", NODE_INNER, "--port", str(NODE_UDP[1]),
            "--wg-peer", f"{b64(crypto.public_key(wg_priv))},{WG_UDP[0]}:{WG_UDP[1]},{WG_INNER}/32", *extra,
            stdout=log, stderr=subprocess.STDOUT, env=env))
        wait(lambda: (home / "overlay.sock").exists(), 20, "the node's API socket")

        def overlay(*args):
            return subprocess.run([sys.executable, "-m", "overlay", *args, "--home", str(home)],
                                  capture_output=True, text=True, timeout=30, env=env)

        yield wg_ns, node_ns, ifname, overlay, procs
    except BaseException:
        if (tmp_path / "node.log").exists():
            print((tmp_path / "node.log").read_text()[-4000:])
        raise
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        wg_ns.close()
        node_ns.close()
        Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)


def test_wireguard_go_reaches_the_userspace_stack(wg_node, tmp_path):
    wg_ns, node_ns, ifname, overlay, procs = wg_node

    # ICMP echo from the kernel behind wireguard-go is answered by our userspace stack
    r = wg_ns.run("ping", "-c", "3", "-i", "0.3", "-W", "3", NODE_INNER, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = wg_ns.run("wg", "show", ifname, "latest-handshakes").stdout.split()
    assert len(out) == 2 and int(out[1]) > 0

    # kernel TCP (curl) -> wireguard-go -> our WireGuard -> our TCP stack -> shared port -> local server
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(3 * 1024 * 1024)
    (www / "blob.bin").write_bytes(blob)
    procs.append(node_ns.popen(sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1",
                               "--directory", str(www), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    assert overlay("share", "8000").returncode == 0
    got = tmp_path / "got.bin"
    r = wg_ns.run("curl", "-sS", "--retry", "5", "--retry-connrefused", "--max-time", "60", "-o", str(got),
                  f"http://{NODE_INNER}:8000/blob.bin", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()

    # a port the node does not share is refused with a reset: curl says "connection refused" (exit 7)
    r = wg_ns.run("curl", "-sS", "--max-time", "10", f"http://{NODE_INNER}:8001/", check=False, timeout=30)
    assert r.returncode == 7, (r.returncode, r.stderr)

    # and the other way: a port forward on the node reaches a kernel TCP server behind wireguard-go
    procs.append(wg_ns.popen(sys.executable, "-m", "http.server", "9000", "--bind", WG_INNER,
                             "--directory", str(www), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    fwd = overlay("forward", "19000", f"{WG_INNER}:9000")
    assert fwd.returncode == 0, fwd.stderr
    got2 = tmp_path / "got2.bin"
    r = node_ns.run("curl", "-sS", "--retry", "5", "--retry-connrefused", "--max-time", "60", "-o", str(got2),
                    "http://127.0.0.1:19000/blob.bin", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(got2.read_bytes()).digest() == hashlib.sha256(blob).digest()

    st = overlay("status", "--json")
    assert st.returncode == 0 and '"direct 10.99.0.1:51820 (static)"' in st.stdout


@pytest.mark.parametrize("wg_node", [["--tun", "--dev", "ovw0"]], indirect=True)
def test_wireguard_go_and_a_tun_node_kernel_to_kernel(wg_node, tmp_path):
    """A TUN node and stock wireguard-go: both kernels talk, plain IPv4 on the wire both ways."""
    wg_ns, node_ns, ifname, overlay, procs = wg_node
    wait(lambda: "ovw0" in node_ns.run("ip", "-br", "addr", "show", "dev", "ovw0", check=False).stdout
         and NODE_INNER in node_ns.run("ip", "-br", "addr", "show", "dev", "ovw0", check=False).stdout,
         20, "the node's TUN device holding its address")
    for ns, dst in ((wg_ns, NODE_INNER), (node_ns, WG_INNER)):
        r = ns.run("ping", "-c", "3", "-i", "0.3", "-W", "3", dst, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(2 * 1024 * 1024)
    (www / "blob.bin").write_bytes(blob)
    # the node's kernel serves; the kernel behind wireguard-go fetches (no share needed: a LAN)
    procs.append(node_ns.popen(sys.executable, "-m", "http.server", "8000", "--bind", NODE_INNER,
                               "--directory", str(www), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    got = tmp_path / "got.bin"
    r = wg_ns.run("curl", "-sS", "--retry", "5", "--retry-connrefused", "--max-time", "60", "-o", str(got),
                  f"http://{NODE_INNER}:8000/blob.bin", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()
    st = overlay("status", "--json")
    assert st.returncode == 0 and '"kind": "tun"' in st.stdout

"""Checksum-free inner packets (the ``no-inner-csum`` capability) with real kernels.

Two userspace nodes and two TUN nodes on one LAN behind a NAT, one server. The userspace nodes
state the capability; so does the TUN node with virtio_net_hdr (the default: it writes TCP to its
address as CHECKSUM_PARTIAL); the TUN node without it (``OVERLAY_TUN_OFFLOAD=off``) does not: its
kernel verifies every TCP checksum. What is proven:

- each node sees the others' capabilities as the server handed them on;
- userspace <-> userspace: a 2 MB transfer through a forward arrives intact while both stacks
  count packets sent without a computed checksum;
- userspace <-> each TUN node, both directions: the TUN node's kernel TCP serves a userspace
  node's SOCKS client and downloads from a userspace node's shared port, 2 MB each,
  sha256-equal. The userspace node sent the capable TUN node its segments checksum-free, and the
  other one none (its kernel would have dropped them, and the transfer stalled: checked by hand).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

import lab
import natlab
from lab_overlay import OverlayLab, tcp_listener, wait
from overlay.control.messages import CAP_NO_INNER_CHECKSUM as CAP

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

SIZE = 2_000_000


@pytest.fixture(scope="module")
def world():
    lab.require_lab("nft", "ip", "curl")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    try:
        nl.add_site("cs", "full_cone", hosts=4)
        ol.start_server()
        w = type("World", (), {})()
        w.nl, w.ol = nl, ol
        w.user = ol.start_node("cs1", "csuser")
        w.user2 = ol.start_node("cs2", "csuser2")
        w.tun = ol.start_node("cs3", "cstun", "--tun")
        w.plain = ol.start_node("cs4", "csplain", "--tun")
        w.plain.stop()
        w.plain.argv = ["env", "OVERLAY_TUN_OFFLOAD=off", *w.plain.argv]
        w.plain.restart()
        nodes = [w.user, w.user2, w.tun, w.plain]
        ol.pair(w.user, w.user2, "cs", w.tun, w.plain)
        for n in nodes:
            ol.wait(lambda n=n: len([p for p in n.status()["peers"] if p["online"]]) == 3, 30,
                    f"{n.name} sees the three others online")
        ok = True
        yield w
    finally:
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


def _blob() -> bytes:
    return hashlib.sha256(b"checksum-free").digest() * (SIZE // 32)


def _serve_blob(nl, host: str) -> tuple[socket.socket, threading.Thread]:
    """A TCP server on 127.0.0.1 in ``host`` that sends the blob to each client and closes."""
    srv = tcp_listener(nl, host)

    def run():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.sendall(_blob())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def _fetch(nl, host: str, ip: str, port: int) -> bytes | None:
    """Everything a connection from ``host`` to ``ip:port`` receives; None if it cannot connect
    (not there yet: the caller polls) or breaks."""
    s = nl.socket(host, type=socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect((ip, port))
        out = bytearray()
        while chunk := s.recv(1 << 16):
            out += chunk
        return bytes(out)
    except OSError:
        return None
    finally:
        s.close()


def _no_csum(node) -> int:
    return (node.status().get("netstack") or {}).get("tx_no_checksum", 0)


def test_capabilities_are_handed_on(world):
    w = world
    assert w.user.peer("csuser2")["caps"] == [CAP]
    assert w.user.peer("cstun")["caps"] == [CAP]       # TUN with virtio_net_hdr: partial checksums
    assert w.user.peer("csplain")["caps"] == []        # its kernel verifies: never stated
    assert w.tun.peer("csuser")["caps"] == [CAP] and w.plain.peer("csuser")["caps"] == [CAP]
    assert w.tun.status()["netstack"] is None


def test_userspace_pair_skips_checksums(world):
    w = world
    srv, _ = _serve_blob(w.nl, w.user2.host)
    port = srv.getsockname()[1]
    fwd = 15401
    try:
        w.user2.ok("share", str(port))
        w.user.ok("forward", str(fwd), f"csuser2:{port}")
        before = (_no_csum(w.user), _no_csum(w.user2))
        got = wait(lambda: _fetch(w.nl, w.user.host, "127.0.0.1", fwd), 30, "a transfer through the forward",
                   on_fail=w.ol.dump)
        assert hashlib.sha256(got).digest() == hashlib.sha256(_blob()).digest()
        after = (_no_csum(w.user), _no_csum(w.user2))
        # user2 sent the data (> 1,400 segments), user the ACKs: neither computed a TCP checksum
        assert after[1] - before[1] >= SIZE // 1400 and after[0] > before[0], (before, after)
    finally:
        w.user.cli("unforward", str(fwd))
        w.user2.cli("unshare", str(port))
        srv.close()


@pytest.mark.parametrize("which", ["tun", "plain"])
def test_userspace_and_tun_kernel_both_ways(world, tmp_path, which):
    w = world
    tun = getattr(w, which)
    free = which == "tun"                  # what the userspace node may send it without checksums
    before = _no_csum(w.user)
    tun_ip = tun.status()["node"]["virtual_ip"]
    user_ip = w.user.status()["node"]["virtual_ip"]
    # TUN kernel -> userspace share: the userspace node's 2 MB of data segments reach a kernel
    srv, _ = _serve_blob(w.nl, w.user.host)
    try:
        port = srv.getsockname()[1]
        w.user.ok("share", str(port))
        got = wait(lambda: _fetch(w.nl, tun.host, user_ip, port), 30, "the TUN kernel downloads from the share",
                   on_fail=w.ol.dump)
        assert hashlib.sha256(got).digest() == hashlib.sha256(_blob()).digest()
    finally:
        w.user.cli("unshare", str(port))
        srv.close()
    middle = _no_csum(w.user)
    assert (middle - before >= SIZE // 1400) if free else middle == before, (before, middle)
    # userspace SOCKS client -> the TUN node's kernel server: its ACKs and request reach a kernel
    (tmp_path / "blob").write_bytes(_blob())
    os.chmod(tmp_path, 0o755)
    http = w.nl.popen(tun.host, ["python3", "-m", "http.server", "8090", "--bind", tun_ip,
                                 "--directory", str(tmp_path)], label=w.ol.label(f"http-{tun.name}"))
    try:
        wait(lambda: "LISTEN" in w.nl.run(tun.host, ["ss", "-ltn", "sport = :8090"], check=False).stdout, 10,
             f"http.server on {tun.name}")
        socks = next(p["address"] for p in w.user.status()["proxies"] if p["kind"] == "socks5")
        r = w.nl.run(w.user.host, ["sh", "-c", f"curl -sS --max-time 60 --socks5-hostname {socks} "
                                               f"http://{tun.name}:8090/blob | sha256sum"], check=False, timeout=90)
        assert r.stdout.split()[0] == hashlib.sha256(_blob()).hexdigest(), r.stdout + r.stderr
    finally:
        http.stop()
    after = _no_csum(w.user)
    assert (after - middle > 10) if free else after == middle, (middle, after)   # ACKs (how many: TCP decides)

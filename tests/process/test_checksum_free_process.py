"""Two userspace nodes leave inner TCP/UDP checksums to the tunnel (``no-inner-csum``).

Real daemons on loopback: each states the capability in its hello, sees the other's, and sends
it TCP segments and UDP datagrams without a computed checksum (counted in ``status.netstack``);
a 1 MB TCP transfer and UDP echoes through forwards arrive intact. The mixed case (a TUN node
whose kernel verifies) is in tests/lab/test_checksum_free_lab.py.
"""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest

from cluster import Cluster, free_port
from overlay.control.messages import CAP_NO_INNER_CHECKSUM as CAP

pytestmark = pytest.mark.timeout(120)

BLOB = hashlib.sha256(b"blob").digest() * (1_000_000 // 32)


def _servers():
    """A TCP server sending BLOB to each client, and a UDP echo server, on 127.0.0.1."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))

    def serve_tcp():
        while True:
            try:
                c, _ = tcp.accept()
            except OSError:
                return
            with c:
                c.sendall(BLOB)

    def serve_udp():
        while True:
            try:
                data, addr = udp.recvfrom(65536)
                udp.sendto(data[::-1], addr)
            except OSError:
                return
    for f in (serve_tcp, serve_udp):
        threading.Thread(target=f, daemon=True).start()
    return tcp, udp


def _fetch(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            out = bytearray()
            while chunk := s.recv(1 << 16):
                out += chunk
            return bytes(out)
    except OSError:
        return None


def _udp_echo(port: int) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(b"checksum-free", ("127.0.0.1", port))
        try:
            return s.recv(100)
        except OSError:
            return None


def test_userspace_nodes_skip_inner_checksums(tmp_path):
    tcp, udp = _servers()
    try:
        with Cluster(tmp_path) as c:
            c.start_server()
            a = c.start_node("alice")
            b = c.start_node("bob")
            a.ok("create", "lan", "--password", "pw")
            b.ok("join", "lan", "--password", "pw")
            c.wait(lambda: (a.peer("bob") or {}).get("online") and (b.peer("alice") or {}).get("online"),
                   what="alice and bob see each other")
            c.wait(lambda: a.peer("bob")["caps"] == [CAP] and b.peer("alice")["caps"] == [CAP],
                   what="each sees the other's capability")
            tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
            b.ok("share", str(tport))
            b.ok("share", f"{uport}/udp")
            ftcp, fudp = free_port(), free_port()
            a.ok("forward", str(ftcp), f"bob:{tport}")
            a.ok("forward", f"{fudp}/udp", f"bob:{uport}")
            got = c.wait(lambda: _fetch(ftcp), 30, what="1 MB through the forward")
            assert got == BLOB
            assert c.wait(lambda: _udp_echo(fudp), 20, what="a UDP echo through the forward") == b"eerf-muskcehc"
            na, nb = a.status()["netstack"], b.status()["netstack"]
            # bob sent the data (> 700 segments) and a datagram, alice the ACKs and a datagram:
            # none with a computed checksum, and neither stack found anything malformed
            assert nb["tx_no_checksum"] >= len(BLOB) // 1400 + 1, nb
            assert na["tx_no_checksum"] >= 2, na
            assert na["malformed"] == nb["malformed"] == 0
    finally:
        tcp.close()
        udp.close()

"""A real daemon registers with the server's UDP port through the challenge. The server's UDP port in
process: tests/unit/server/test_server_udp.py."""

from __future__ import annotations



def test_real_node_registers_through_the_challenge(tmp_path):
    """A real daemon's first REGISTER is challenged; it answers with the nonce and its relay over
    UDP works (what `overlay netcheck` reports)."""
    import json

    from cluster import Cluster
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        c.wait(lambda: json.loads(a.ok("netcheck", "--json"))["udp"], timeout=20, what="relay over UDP")
        assert "relay registration acknowledged" in a.proc.output()

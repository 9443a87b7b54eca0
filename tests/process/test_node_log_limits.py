"""A peer's connection attempts to ports this node does not share cannot flood its log."""

from __future__ import annotations

import pytest
from python_socks import ProxyError
from python_socks.sync import Proxy

from cluster import Cluster, free_port

pytestmark = pytest.mark.timeout(120)


def test_refused_connections_are_logged_at_a_bounded_rate(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        c.wait(lambda: (b.peer("alice") or {}).get("online"), what="bob sees alice")
        socks = {p["kind"]: p["address"] for p in b.status()["proxies"]}["socks5"]
        port = free_port()
        refused = 0
        for _ in range(300):
            try:
                Proxy.from_url(f"socks5://{socks}", rdns=True).connect(dest_host="alice", dest_port=port,
                                                                       timeout=10).close()
            except ProxyError:
                refused += 1
        assert refused == 300
        c.wait(lambda: f"-> port {port}: not shared" in a.proc.output(), what="alice logs refusals")
        lines = [ln for ln in a.proc.output().splitlines() if f"-> port {port}: not shared" in ln]
        assert 1 <= len(lines) <= 40, len(lines)          # before: one line per attempt (300)

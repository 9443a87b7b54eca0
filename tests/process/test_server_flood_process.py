"""A connection flood does not lock real nodes out of a real server (issue 9.1). The admission and
log-limit cores: tests/unit/server/test_server_flood.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import pytest
from repo_paths import SUPPORT
from cluster import Cluster, Proc, _tcp_open


def _with_nofile(soft: int, hard: int) -> list[str]:
    """``python -m overlay`` with a descriptor limit of soft:hard."""
    return [sys.executable, "-c", "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "sys.argv[0] = 'overlay'; runpy.run_module('overlay', run_name='__main__')"]


def _flood(port: int, *args: str):
    flood = subprocess.Popen([sys.executable, str(SUPPORT / "floodtool.py"), "127.0.0.1", str(port), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stats: dict = {}

    def read_stats():
        for line in flood.stdout:
            stats.update(json.loads(line))
    threading.Thread(target=read_stats, daemon=True).start()
    return flood, stats


@pytest.mark.timeout(240)
def test_real_nodes_connect_during_a_connection_flood(tmp_path):
    """~1,000 connections from fresh keys against a server with 256 descriptors: real nodes
    still connect (a new one and a restarted member), the member keeps its network, and the log
    stays small."""
    with Cluster(tmp_path) as c:
        c.server = Proc([*_with_nofile(256, 256), "server", "--listen", c.server_addr,
                         "--data", str(tmp_path / "server")], tmp_path / "server.log")
        c.wait(lambda: _tcp_open(c.port), what="server listening")
        a = c.start_node("alice")
        a.ok("create", "lan", "--password", "pw")

        # one address alone gets at most --max-per-address (64) connections
        flood, stats = _flood(c.port, "--slots", "0", "--heavy", "150")
        try:
            c.wait(lambda: stats.get("heavy_up", 0) >= 64 and stats["closed"] >= 150, timeout=30,
                   what="one address fills its share")
            time.sleep(1)
            assert 64 <= stats["heavy_max"] <= 64 + 5, stats      # (a few may race their close)
        finally:
            flood.kill()
            flood.wait(10)

        flood, stats = _flood(c.port, "--slots", "1000", "--sources", "40")
        try:
            c.wait(lambda: stats.get("up", 0) >= 150, timeout=60, what="the flood fills the server")
            time.sleep(3)

            t0 = time.monotonic()
            b = c.start_node("bob", wait=False)
            c.wait(b.connected, timeout=60, what="a new node connects during the flood")
            t_new = time.monotonic() - t0
            b.ok("join", "lan", "--password", "pw")

            a.kill()
            t0 = time.monotonic()
            a.start()
            c.wait(a.connected, timeout=60, what="a member reconnects during the flood")
            t_member = time.monotonic() - t0
            c.wait(lambda: (a.peer("bob") or {}).get("online"), timeout=30, what="alice sees bob")
            time.sleep(5)       # the flood keeps going: both stay connected and members
            assert a.connected() and b.connected()
            assert {m["name"] for m in a.network("lan")["members"]} == {"alice", "bob"}
            print(f"\nduring the flood: new node connected in {t_new:.2f} s, restarted member in "
                  f"{t_member:.2f} s; flood {stats}")
        finally:
            flood.kill()
            flood.wait(10)
        assert c.server.alive()
        log = c.server.output()
        assert "Traceback" not in log
        assert len(log) < 300_000, f"server log grew to {len(log)} bytes"
        assert "similar lines suppressed" in log

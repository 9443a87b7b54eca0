"""A dial that fails shows as a failure to the application (issue 9.10).

Bob's daemon is stopped (SIGSTOP): alice's tunnel to him still exists, so her connection attempts
go unanswered until they time out or bob is declared offline. The forward's client must get a
reset, not a clean end-of-file, and the HTTP proxy must answer 504.
"""

from __future__ import annotations

import signal
import socket
import threading
import urllib.error
import urllib.request

import pytest

from cluster import Cluster, free_port

pytestmark = pytest.mark.timeout(120)


def test_failed_forward_dial_resets_the_client(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice", "--http-proxy", "127.0.0.1:0")
        b = c.start_node("bob")
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        c.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob")
        port = free_port()
        b.ok("share", str(port))
        local = free_port()
        a.ok("forward", str(local), f"bob:{port}")
        proxy = {p["kind"]: p["address"] for p in a.status()["proxies"]}["http"]
        a.ok("ping", "bob", "-c", "3")       # the tunnel is up before bob freezes

        b.kill(signal.SIGSTOP)
        try:
            results = {}

            def http_get():
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{proxy}"}))
                try:
                    opener.open(f"http://bob:{port}/", timeout=60)
                    results["http"] = 200
                except urllib.error.HTTPError as e:
                    results["http"] = e.code
                    results["body"] = e.read().decode(errors="replace")

            t = threading.Thread(target=http_get)
            t.start()
            # a reset, whether it comes during connect (a loaded machine) or on the first read
            with pytest.raises(ConnectionResetError):
                with socket.create_connection(("127.0.0.1", local), timeout=60) as s:
                    data = s.recv(1)            # before: b"" (a clean end-of-file after 0 bytes)
                    pytest.fail(f"the forward's client got {data!r} instead of a reset")
            t.join(60)
            assert results.get("http") == 504, results
            assert results["body"].startswith("bob is unreachable") or "timed out" in results["body"], results
            c.wait(lambda: f"WARNING forward tcp 127.0.0.1:{local} -> bob:{port}: " in a.proc.output(),
                   what="the forward logs the failure")
        finally:
            b.kill(signal.SIGCONT)

"""A member cannot make a real node probe an arbitrary address at will (issue 9.11). The PeerPath
budget alone: tests/unit/nat/test_nat_probe_bounds.py."""

from __future__ import annotations

from overlay import crypto
from overlay.nat import TraversalConfig


def test_real_node_bounds_probes_a_member_asks_for(tmp_path):
    """A raw member advertises 16 victim sockets on loopback as its candidates and asks the server
    to introduce it to alice's real daemon ten times a second for 10 s."""
    import asyncio
    import socket
    import time

    from cluster import Cluster
    from overlay.control.rawclient import RawClient

    victims = []
    for _ in range(16):
        v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        v.bind(("127.0.0.1", 0))
        v.setblocking(False)
        victims.append(v)

    def drain() -> int:
        n = 0
        for v in victims:
            try:
                while True:
                    v.recv(2048)
                    n += 1
            except BlockingIOError:
                pass
        return n

    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        a.ok("create", "lan", "--password", "pw")

        async def attack() -> int:
            m = await RawClient("mallory", crypto.generate_private_key()).connect("127.0.0.1", c.port)
            assert (await m.request({"t": "join", "network": "lan", "password": "pw"}))["t"] == "ok"
            cands = [{"addr": f"127.0.0.1:{v.getsockname()[1]}", "kind": "srflx"} for v in victims]
            assert (await m.request({"t": "endpoints", "candidates": cands}))["t"] == "ok"
            alice_key = a.status()["node"]["public_key"]
            got = 0
            end = time.monotonic() + 10.0
            while time.monotonic() < end:
                m.send({"t": "punch", "id": 0, "peer": alice_key})
                got += drain()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            m.close()
            return got + drain()

        got = asyncio.run(attack())
        print(f"\nprobes at the advertised addresses in 10 s: {got}")
        cfg = TraversalConfig()
        assert 0 < got <= cfg.probe_burst + cfg.probe_rate * 11, got
    for v in victims:
        v.close()

"""A real node answers pings during a flood of handshake initiations (issue 9.8). The device's
budgets alone: tests/unit/wire/test_wire_flood.py."""

from __future__ import annotations

import os
from repo_paths import SUPPORT


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_real_node_answers_pings_during_an_initiation_flood(tmp_path):
    import json
    import subprocess
    import sys
    import time

    from cluster import Cluster

    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        c.wait(lambda: (b.peer("alice") or {}).get("path", "").startswith("direct"), timeout=30,
               what="a direct path")
        b.ok("ping", "alice", "-c", "2", "--no-until-direct")     # the WireGuard session is up
        st = a.status()
        # from 127.0.0.2: another host than bob (127.0.0.1), as the attacker would be
        flood = subprocess.Popen([sys.executable, str(SUPPORT / "floodwg.py"), "127.0.0.1",
                                  str(st["udp"]["port"]), st["node"]["public_key"], "30", "127.0.0.2"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            cpu0, t0 = _cpu_seconds(a.proc.p.pid), time.monotonic()
            r = b.run("ping", "alice", "-c", "10", "--no-until-direct", "--json", timeout=60)
            cpu = (_cpu_seconds(a.proc.p.pid) - cpu0) / (time.monotonic() - t0)
            assert flood.poll() is None, "the flood ended before the pings"
            flood.terminate()               # SIGTERM: floodwg prints what it sent
            sent, rate = flood.communicate(timeout=30)[0].split()
        finally:
            flood.kill()
        answered = sum(1 for line in r.stdout.splitlines() if json.loads(line)["rtt_ms"] is not None)
        stats = a.status()
        print(f"\nflood of {int(float(rate)):,} initiations/s ({sent} sent): {answered}/10 pings answered, "
              f"alice's CPU {cpu:.0%}")
        # before: 1 of 10 (0 while the flood lasted); 8-10 here, fewer on a machine busy elsewhere
        assert answered >= 6, (answered, r.stdout)
        assert a.proc.alive() and "udp" in stats

#!/usr/bin/env python3
"""DNS for peers: queries per second the node answers, and the daemon's memory.

    python benchmarks/bench_dns.py [--seconds 3] [--sources 16]

1. The sans-I/O core alone (overlay/node/dns.py): parse + answer of an A query, in process.
2. A real `overlay server` and two `overlay up` daemons on loopback in one network; a client
   asks the first node's DNS address (UDP) for the peer's name, as fast as it answers:
   - from one source address: the per-source token bucket (dns.RATE a second) is the limit;
   - from ``--sources`` loopback addresses (127.0.0.2...), one query in flight on each: the
     daemon's own capacity.
   The daemon's RSS before and after, and its counters.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import dns.message  # noqa: E402

from cluster import Cluster, free_port  # noqa: E402
from overlay.node import api  # noqa: E402
from overlay.node.dns import Names, answer, parse_query  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def core(n: int = 50000) -> float:
    peers = [{"name": f"peer{i}", "ip": f"100.64.{i // 250}.{i % 250 + 1}", "online": True, "networks": ["net"]}
             for i in range(200)]
    names = Names.build(peers, None, ["net"])
    q = dns.message.make_query("peer7.net", "A").to_wire()
    t0 = time.perf_counter()
    for _ in range(n):
        answer(parse_query(q), names)
    return n / (time.perf_counter() - t0)


def flood(host: str, port: int, sources: list[str], seconds: float) -> tuple[float, int]:
    """(answers per second, queries lost) with one query in flight per source address."""
    socks = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.connect((host, port))
        s.settimeout(0.02)
        socks.append(s)
    q = dns.message.make_query("bob.benchnet", "A").to_wire()
    answered = lost = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        for s in socks:
            s.send(q)
        for s in socks:
            try:
                s.recv(2048)
                answered += 1
            except socket.timeout:
                lost += 1
    rate = answered / (time.perf_counter() - t0)
    for s in socks:
        s.close()
    return rate, lost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sources", type=int, default=64)
    a = ap.parse_args()
    print(f"core (parse + answer, 200 peers): {core():9.0f} queries/s")
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as c:
        c.start_server()
        port = free_port()
        alice = c.start_node("alice", "--dns", f"127.0.0.1:{port}")
        bob = c.start_node("bob", "--dns", "off")
        alice.ok("create", "benchnet", "--password", "pw")
        bob.ok("join", "benchnet", "--password", "pw")
        c.wait(lambda: (p := alice.peer("bob")) is not None and p["online"], what="bob online")
        pid = alice.proc.p.pid
        print(f"daemon RSS before:                {rss_mib(pid):9.1f} MiB")
        rate, lost = flood("127.0.0.1", port, ["127.0.0.1"], a.seconds)
        print(f"one source (rate limited):        {rate:9.0f} answers/s ({lost} unanswered)")
        time.sleep(1)
        rate, lost = flood("127.0.0.1", port, [f"127.0.0.{i + 2}" for i in range(a.sources)], a.seconds)
        print(f"{a.sources} sources, 1 in flight each:  {rate:9.0f} answers/s ({lost} unanswered)")
        print(f"daemon RSS after:                 {rss_mib(pid):9.1f} MiB")
        print(f"daemon counters:                  {api.call(alice.home / 'overlay.sock', 'status')['dns']['stats']}")


if __name__ == "__main__":
    main()

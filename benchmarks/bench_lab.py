"""Real processes in the real-kernel NAT lab: time to a direct path per NAT pair, and relay throughput.

    sudo python benchmarks/bench_lab.py [--runs 3] [--mb 32]

Builds the NAT lab (tests/support/natlab.py: network namespaces + nftables NATs), one ``overlay server`` and
one pair of ``overlay up`` nodes per NAT pair, all started through the CLI (tests/support/lab_overlay.py).

- per NAT pair: share of runs direct, median time to direct, birthday probes and NAT mappings.
  Both nodes of every pair are started fresh (routers' conntrack flushed, b first, then a, whose
  arrival makes the server introduce them); the clock runs from "both connected" (status) to "both
  show a direct path"; "relay" when no direct path came within the window. Probes: both nodes'
  birthday-punching pings (median); mappings: UDP conntrack entries on both routers toward the
  other side at the end of the window (median).
- throughput of one TCP stream through ``overlay forward`` -> ``overlay share``: over the relay
  (two random-symmetric nodes), with the server's default per-node relay cap and uncapped, and over
  a direct path (port-restricted pair) for comparison.
- ``--scenarios``: the two sequential-NAT scenarios of tests/lab/test_traversal_lab.py, timed
  (that test checks that they end direct within a bound): three nodes behind sequential symmetric
  NATs in one network (seconds from the pairing to all three pairs direct), and an easy <->
  sequential pair after a missed prediction (seconds from the pairing to direct).

Needs root (network namespaces); prints the reason and exits 0 elsewhere, like the lab tests skip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

import lab  # noqa: E402
import natlab  # noqa: E402
from lab_overlay import (LabNode, OverlayLab, birthday, fetch, sequential, serve_once,  # noqa: E402
                         tcp_connect, tcp_listener, time_to_direct, udp_mappings)

PAIRS = [
    ("none", "none"),
    ("port_restricted", "port_restricted"),
    ("full_cone", "port_restricted"),
    ("symmetric_sequential", "port_restricted"),
    ("port_restricted", "symmetric_sequential"),
    ("symmetric_sequential", "full_cone"),
    ("symmetric_sequential", "restricted"),
    ("symmetric_sequential", "none"),
    ("symmetric_sequential", "symmetric_sequential"),   # both windows predicted at once (nat.seqpunch)
    ("symmetric_sequential", "symmetric_random"),       # hard <-> hard: the relay
    ("symmetric_random", "symmetric_random"),
    ("symmetric_random", "port_restricted"),
    ("port_restricted", "symmetric_random"),
    ("symmetric_random", "restricted"),
    ("symmetric_random", "full_cone"),
    ("symmetric_random", "none"),
]
SHORT = {"none": "n", "full_cone": "fc", "restricted": "rc", "port_restricted": "pr",
         "symmetric_sequential": "ss", "symmetric_random": "sr"}
WINDOW = 20.0  # seconds to wait for a direct path after both are online
UNCAPPED = 1 << 20  # --relay-rate in KiB/s: far above what one stream reaches


def one_run(ol: OverlayLab, pairs: list[tuple[LabNode, LabNode]], sites: list[tuple[natlab.Site, natlab.Site]]
            ) -> list[tuple[float | None, int, int]]:
    """One fresh run of every pair at once (NAT mappings flushed first): per pair, seconds from both
    online to both direct (None: not within WINDOW), birthday probes both nodes sent (pings from
    extra sockets plus pings to guessed ports) and UDP conntrack entries on both routers toward
    the other side (the NAT mappings the pair cost its routers)."""
    times = time_to_direct(ol, pairs, WINDOW, [s for ab in sites for s in ab])
    out = []
    for t, (a, b), (sa, sb) in zip(times, pairs, sites):
        probes = sum(birthday(n).get("probes", 0) + sequential(n).get("probes", 0) for n in (a, b))
        mappings = udp_mappings(sa, sb.wan_ip) + udp_mappings(sb, sa.wan_ip)
        out.append((t, probes, mappings))
    return out


def stream_mbps(nl: natlab.NatLab, a: LabNode, b: LabNode, megabytes: int, port: int) -> float:
    """MB/s of one TCP stream b -> a through ``overlay forward PORT b:APP`` (sha256 checked)."""
    listener = tcp_listener(nl, b.host)
    b.ok("share", str(listener.getsockname()[1]))
    a.ok("forward", str(port), f"{b.name}:{listener.getsockname()[1]}")
    data = os.urandom(megabytes << 20)
    serve_once(listener, data, timeout=300)
    t0 = time.monotonic()
    with tcp_connect(nl, a.host, port, timeout=60) as conn:
        n, digest = fetch(conn, deadline=300)
    elapsed = time.monotonic() - t0
    listener.close()
    if (n, digest) != (len(data), hashlib.sha256(data).hexdigest()):
        raise RuntimeError(f"stream corrupted: {n} of {len(data)} bytes")
    return n / elapsed / 1e6


def scenarios(nl: natlab.NatLab, ol: OverlayLab, runs: int) -> None:
    """Seconds to direct in the sequential-NAT scenarios of tests/lab/test_traversal_lab.py (fresh
    sites and nodes each run)."""
    def wait_direct(a: LabNode, b: LabNode, timeout: float) -> None:
        ol.wait(lambda: a.path_to(b.name, direct=True) and b.path_to(a.name, direct=True), timeout,
                f"{a.name} <-> {b.name} direct")

    triangle, easy = [], []
    for r in range(runs):
        sites = [nl.add_site(f"tri{r}{i}", "symmetric_sequential") for i in range(3)]
        nodes = [ol.start_node(s.hosts[0].name, f"tri{r}{i}") for i, s in enumerate(sites)]
        try:
            ol.pair(nodes[0], nodes[1], f"trinet{r}", nodes[2])
            t0 = time.monotonic()
            for i, j in ((0, 1), (0, 2), (1, 2)):
                wait_direct(nodes[i], nodes[j], 120)
            triangle.append(time.monotonic() - t0)
        finally:
            ol.stop_nodes(*nodes)
        sa, sb = nl.add_site(f"rx{r}a", "symmetric_sequential"), nl.add_site(f"rx{r}b", "symmetric_sequential")
        se = nl.add_site(f"rx{r}e", "port_restricted")
        a, b, e = (ol.start_node(s.hosts[0].name, s.name) for s in (sa, sb, se))
        try:
            ol.wait_connected(a, b, e)
            ol.wait(lambda: a.status()["udp"]["nat"].get("sequential"), 20, "a classified sequential")
            sock = nl.socket(sa.hosts[0].name)
            for port in range(20000, 20040):      # 40 new flows: a's published prediction is stale
                sock.sendto(b"x", (natlab.SERVER_IPS[0], port))
            t0 = time.monotonic()
            ol.pair(a, b, f"rxnet{r}", e)
            wait_direct(e, a, 180)
            easy.append(time.monotonic() - t0)
        finally:
            ol.stop_nodes(a, b, e)
    for label, times in (("three sequential nodes, all pairs direct", triangle),
                         ("easy <-> sequential after a missed prediction", easy)):
        print(f"  {label:<47} median {statistics.median(times):6.2f} s   "
              f"[{', '.join(f'{t:.2f}' for t in times)}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="time-to-direct runs per pair (median)")
    ap.add_argument("--no-stream", action="store_true", help="only the per-pair table, no throughput")
    ap.add_argument("--mb", type=int, default=32, help="megabytes per throughput stream")
    ap.add_argument("--log-dir", default=None, help="keep every process's log in this directory")
    ap.add_argument("--pairs", default="", help="only these pairs, by short name, comma separated (e.g. ss-ss,sr-pr)")
    ap.add_argument("--scenarios", action="store_true",
                    help="only the sequential-NAT scenarios (triangle; easy <-> sequential after a miss)")
    args = ap.parse_args()
    global PAIRS
    if args.pairs:
        wanted = set(args.pairs.split(","))
        PAIRS = [p for p in PAIRS if f"{SHORT[p[0]]}-{SHORT[p[1]]}" in wanted]
        if not PAIRS:
            ap.error(f"no such pair in {args.pairs!r}")
        args.no_stream = True
    reason = lab.lab_skip_reason("conntrack")
    if reason:
        print(f"bench_lab skipped: {reason}")
        return 0
    with natlab.NatLab(args.log_dir) as nl:
        ol = OverlayLab(nl)
        try:
            ol.start_server("--relay-rate", str(UNCAPPED))
            if args.scenarios:
                print(f"sequential-NAT scenarios over {args.runs} fresh runs (seconds from the pairing to direct):")
                scenarios(nl, ol, args.runs)
                return 0
            pairs, sites = [], []
            for i, (x, y) in enumerate(PAIRS):
                sa, sb = nl.add_site(f"t{i}a", x), nl.add_site(f"t{i}b", y)
                sites.append((sa, sb))
                pairs.append((ol.start_node(sa.hosts[0].name, f"t{i}a"), ol.start_node(sb.hosts[0].name, f"t{i}b")))
            for i, (a, b) in enumerate(pairs):
                ol.pair(a, b, f"tnet{i}")
            runs = [one_run(ol, pairs, sites) for _ in range(args.runs)]
            print(f"per NAT pair over {args.runs} fresh runs (window {WINDOW:.0f} s; time from both nodes online "
                  f"to both direct; birthday probes of both nodes; UDP conntrack entries toward the peer on both "
                  f"routers, a run's NAT mappings):")
            print(f"  {'pair':<5} {'a':>20} / {'b':<20} {'direct':>7} {'median':>8} {'probes':>7} {'mappings':>9}   times")
            for i, (x, y) in enumerate(PAIRS):
                got = [r[i] for r in runs]
                done = [t for t, _, _ in got if t is not None]
                med = f"{statistics.median(done):6.2f} s" if done else "   relay"
                probes = statistics.median(p for _, p, _ in got)
                mappings = statistics.median(m for _, _, m in got)
                shown = ", ".join("relay" if t is None else f"{t:.2f}" for t, _, _ in got)
                print(f"  {SHORT[x] + '-' + SHORT[y]:<5} {x:>20} / {y:<20} {len(done):>3}/{len(got):<3} {med:>8} "
                      f"{probes:>7.0f} {mappings:>9.0f}   [{shown}]")

            if args.no_stream:
                return 0
            sr = next(p for p, xy in zip(pairs, PAIRS) if xy == ("symmetric_random", "symmetric_random"))
            pr = next(p for p, xy in zip(pairs, PAIRS) if xy == ("port_restricted", "port_restricted"))
            ol.wait(lambda: sr[0].path_to(sr[1].name) == "relay", 20, "sr pair on the relay")
            ol.wait(lambda: pr[0].path_to(pr[1].name, direct=True), 20, "pr pair direct")
            print(f"one TCP stream through overlay forward, {args.mb} MB:")
            print(f"  relay (sr-sr), uncapped server:        {stream_mbps(nl, *sr, args.mb, 18080):7.2f} MB/s")
            print(f"  direct (pr-pr):                        {stream_mbps(nl, *pr, args.mb, 18080):7.2f} MB/s")
            ol.stop_server()
            ol.start_server()  # default --relay-rate (2048 KiB/s per node)
            ol.wait(lambda: all(n.connected() for n in sr), 60, "sr pair reconnected")
            ol.wait(lambda: sr[0].status()["udp"]["server_udp"] and sr[1].status()["udp"]["server_udp"], 30,
                    "relay registrations")
            capped_mb = max(4, args.mb // 4)
            print(f"  relay (sr-sr), default cap, {capped_mb} MB:     {stream_mbps(nl, *sr, capped_mb, 18081):7.2f} MB/s")
        finally:
            ol.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relayed throughput through coturn (TURN) against the built-in relay, in the real-kernel NAT lab.

    sudo python benchmarks/bench_turn.py [--runs 3] [--mb 20]

Two ``overlay up`` nodes behind random-port symmetric NATs (no direct path), Debian's coturn on a
public lab host (tests/support/coturn.py). Twice: the mediation server with ``--turn`` (the pair
relays through coturn: path ``turn HOST:PORT``), then without (the built-in relay, its per-node cap
raised so that the figure is the relay's own). Each run: one TCP stream of ``--mb`` MB through
``overlay forward`` -> ``overlay share``, checked by hash; prints Mbit/s (median of the runs) and
the CPU seconds per GB relayed of the process that relays (coturn, or the mediation server).

Needs root and coturn; prints the reason and exits 0 elsewhere, like the lab tests skip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

import coturn  # noqa: E402
import lab  # noqa: E402
import natlab  # noqa: E402
from lab_overlay import OverlayLab, fetch, serve_once, tcp_connect, tcp_listener  # noqa: E402

FORWARD = 18091


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(nl: natlab.NatLab, ol: OverlayLab, tag: str, relay_pid, want: str, runs: int, size: int) -> str:
    sa, sb = nl.add_site(f"{tag}a", "symmetric_random"), nl.add_site(f"{tag}b", "symmetric_random")
    a, b = ol.start_node(sa.hosts[0].name, f"{tag}a"), ol.start_node(sb.hosts[0].name, f"{tag}b")
    ol.pair(a, b, f"{tag}net")
    ol.wait(lambda: a.path_to(b.name) == want and b.path_to(a.name) == want, 60, f"both on {want}", 0.3)
    listener = tcp_listener(nl, b.host)
    b.ok("share", str(listener.getsockname()[1]))
    a.ok("forward", str(FORWARD), f"{b.name}:{listener.getsockname()[1]}")
    rates, cpu = [], 0.0
    for _ in range(runs):
        data = os.urandom(size)
        serve_once(listener, data, timeout=300)
        c0, t0 = cpu_seconds(relay_pid()), time.monotonic()
        with tcp_connect(nl, a.host, FORWARD) as conn:
            got = fetch(conn, deadline=300)
        took = time.monotonic() - t0
        cpu += cpu_seconds(relay_pid()) - c0
        assert got == (size, hashlib.sha256(data).hexdigest()), "corrupt transfer"
        rates.append(size * 8 / took / 1e6)
    ol.stop_nodes(a, b)
    return (f"{statistics.median(rates):6.0f} Mbit/s (runs: {', '.join(f'{r:.0f}' for r in rates)}); "
            f"relay CPU {cpu / (runs * size / 1e9):.1f} s per GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=20)
    args = ap.parse_args()
    try:
        lab.require_lab("conntrack")
    except Exception as e:      # pytest's Skipped outside pytest: say why and stop
        print(f"bench_turn: skipped ({e})")
        return
    if shutil.which("turnserver") is None:
        print("bench_turn: skipped (coturn's turnserver is not installed)")
        return
    size = args.mb * 1_000_000
    with natlab.NatLab() as nl, tempfile.TemporaryDirectory() as work:
        host = nl.add_site("turn", "none").hosts[0]
        proc = coturn.start(nl, host, work)
        ol = OverlayLab(nl)
        try:
            ol.start_server("--turn", f"turn:{host.ip}:{coturn.PORT}", "--turn-secret", coturn.SECRET)
            line = measure(nl, ol, "bt", lambda: proc.pid, f"turn {host.ip}:{coturn.PORT}", args.runs, size)
            print(f"through coturn:             {line}", flush=True)
            ol.stop_server()
            ol.start_server("--relay-rate", str(1 << 20))
            line = measure(nl, ol, "bb", lambda: ol.server.pid, "relay", args.runs, size)
            print(f"through the built-in relay: {line}", flush=True)
        finally:
            ol.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Start-up cost of the CLI and memory of an idle node.

    python benchmarks/bench_startup.py [--runs 20]

A real `overlay server` and one `overlay up` daemon on loopback (a member of one network). Prints
the median wall time of `overlay status`, `overlay status --json` and `overlay --version` (each
a fresh process, as a user or a script runs it), and the daemon's RSS once idle.
Targets (issue 8): status under 100 ms, idle node under 40 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from cluster import Cluster  # noqa: E402

OVERLAY = [sys.executable, "-m", "overlay"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wall(args: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(args, capture_output=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{args} failed: {r.stderr.decode()}")
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as c:
        c.start_server()
        node = c.start_node("bench")
        node.ok("create", "benchnet", "--password", "pw")
        time.sleep(2)  # let it settle (first probes, NAT checks)
        home = ["--home", str(node.home)]
        print(f"python -c pass:          {wall([sys.executable, '-c', 'pass'], a.runs):6.1f} ms (interpreter floor)")
        print(f"overlay --version:       {wall([*OVERLAY, '--version'], a.runs):6.1f} ms")
        print(f"overlay status:          {wall([*OVERLAY, 'status', *home], a.runs):6.1f} ms (target < 100)")
        print(f"overlay status --json:   {wall([*OVERLAY, 'status', '--json', *home], a.runs):6.1f} ms")
        print(f"idle node RSS:           {rss_mib(node.proc.p.pid):6.1f} MiB (target < 40)")


if __name__ == "__main__":
    main()

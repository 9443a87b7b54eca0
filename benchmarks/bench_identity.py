"""What a new identity costs: the proof of work on a node's key (overlay/control/identity_proof.py).

    python benchmarks/bench_identity.py [--bits N] [--identities K] [--checks C]

- one try: one 8 MiB scrypt, what the server pays to check a proof (CPU seconds, median)
- one identity: solving a proof of N bits for K fresh keys, CPU seconds each (mean, median, p90,
  max: the number of tries is geometric, 2**N on average)
- a flood: K identities cost K times the mean, printed for 1,000 and 100,000 identities on one
  core of this machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.control import identity_proof  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=identity_proof.DEFAULT_BITS)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--checks", type=int, default=30)
    args = ap.parse_args()

    key = os.urandom(32)
    proof = identity_proof.solve(key, 0)
    checks = []
    for _ in range(args.checks):
        t = time.process_time()
        identity_proof.work(key, proof)
        checks.append(time.process_time() - t)
    print(f"one try / the server's check: {statistics.median(checks) * 1000:.1f} ms CPU (median of {args.checks})")

    costs = []
    t_wall = time.monotonic()
    for _ in range(args.identities):
        k = os.urandom(32)
        t = time.process_time()
        p = identity_proof.solve(k, args.bits)
        costs.append(time.process_time() - t)
        assert identity_proof.check(k, p, args.bits)
    wall = time.monotonic() - t_wall
    costs.sort()
    mean = statistics.mean(costs)
    print(f"one identity at {args.bits} bits ({2 ** args.bits} tries on average), {args.identities} keys: "
          f"mean {mean:.2f} s, median {statistics.median(costs):.2f} s, "
          f"p90 {costs[int(0.9 * (len(costs) - 1))]:.2f} s, max {costs[-1]:.2f} s CPU "
          f"({wall:.1f} s wall for all)")
    print(f"a flood: 1,000 identities ~ {1000 * mean / 60:.1f} CPU minutes, 100,000 ~ {100_000 * mean / 3600:.1f} "
          f"CPU hours on one core; the server checks each in {statistics.median(checks) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

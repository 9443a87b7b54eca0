"""Time to a direct path per NAT pair in the RFC 4787 simulator (tests/support/natsim.py).

    python benchmarks/bench_nat_sim.py [--seeds N] [--loss P]

Every pair of simulated NAT types (the matrix of tests/unit/nat/test_nat_sim.py, which checks
that each pair ends direct or relayed as it must): simulated seconds from the common punch start
to the first direct path on both sides, "relay" when none came within 20 simulated seconds. Median
and maximum over N seeds. Simulated time, so the figures do not depend on this machine's load.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

import natsim  # noqa: E402


def time_to_direct(type_a: str, type_b: str, seed: int, loss: float, duration: float = 20.0) -> float | None:
    net = natsim.Network(seed=seed, loss=loss)
    servers = natsim.stun_servers(net)
    a, _ = natsim.node_behind(net, type_a, 0, servers)
    b, _ = natsim.node_behind(net, type_b, 1, servers)
    _, at = natsim.connect(net, a, b)
    net.run_until(at + duration)
    if b.public_key not in a.first_direct or a.public_key not in b.first_direct:
        return None
    return max(a.first_direct[b.public_key], b.first_direct[a.public_key]) - at


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="runs per pair, one seed each (median, max)")
    ap.add_argument("--loss", type=float, default=0.0, help="loss on the internet leg, 0..1")
    args = ap.parse_args()
    print(f"simulated time to the first direct path after the common punch start (s), {args.seeds} seeds, "
          f"loss {args.loss:.0%}:")
    print(f"  {'a':17}     {'b':17} {'median':>8} {'max':>8}")
    for x, y in itertools.combinations_with_replacement(natsim.NAT_TYPES, 2):
        times = [time_to_direct(x, y, seed, args.loss) for seed in range(1, args.seeds + 1)]
        done = [t for t in times if t is not None]
        if len(done) < len(times):
            shown = "relay" if not done else f"relay in {len(times) - len(done)} of {len(times)}"
            print(f"  {x:17} <-> {y:17} {shown:>17}")
        else:
            print(f"  {x:17} <-> {y:17} {statistics.median(done):8.3f} {max(done):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

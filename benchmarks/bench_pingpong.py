"""Round trip (1-byte TCP ping-pong) through an overlay port forward, beside wireguard-go and,
optionally, beside the overlay of another checkout, in alternating rounds of the same run.

    python benchmarks/bench_pingpong.py [--rounds 5] [--count 2000] [--iperf 0] [--baseline DIR]

Needs root (network namespaces), wireguard-go, wg and /dev/net/tun iperf3 and ping;
otherwise it says why and exits 0. It reuses bench_forward.py's ``Lab`` (same namespaces, nodes,
echo server and wireguard-go pair). ``--baseline DIR`` starts a second pair of overlay nodes
running the code of checkout DIR (say ``git worktree add /tmp/before main``) in namespaces of
their own, so a change is compared with the code before it on the same machine in the same
minutes: this shared machine's figures drift by 2x between runs, but much less within one.

Each round runs, one after the other: the plain veth, wireguard-go, the overlay forward (and the
baseline's forward), ``--count`` round trips each (after 50 warm-up) on one connection with
TCP_NODELAY. Printed per path: the median over rounds of each round's median, p90, and the
added round trip (median minus the same round's veth median), and the CPU time the tunnel
processes spent per round trip over all rounds (the work a round trip costs them: on a loaded
machine the times mostly measure waiting for a CPU, this does not). With ``--iperf SECONDS`` each
round also runs one iperf3 transfer each way per path (receiver-side Gbit/s, medians, ratio to
wireguard-go, and the CPU seconds both tunnel processes spent per GB: steadier than the rates when
other jobs load the machine; the CPU clock ticks at 100 Hz, so use a few seconds per transfer). The load average before and after is printed: other jobs on the machine move
every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import ECHO_PORT, FWD_ECHO, FWD_IPERF, IPERF_PLAIN, OV_B, WG_B, Lab, cpu_seconds, guarded  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> None:
    labs: dict[str, Lab] = {"overlay": Lab()}
    if args.baseline:
        labs["baseline"] = Lab(Path(args.baseline).resolve())
    main = labs["overlay"]
    try:
        t0 = time.monotonic()
        for lb in labs.values():
            lb.start_overlay()
        main.start_wireguard()
        print(f"{os.cpu_count()} CPUs, Linux {os.uname().release}, Python {sys.version.split()[0]}; "
              f"setup {time.monotonic() - t0:.1f} s; load average {load()}", flush=True)
        if args.baseline:
            print(f"baseline: the overlay of {Path(args.baseline).resolve()}")
        # name -> (lab, namespace, host, echo port, iperf port)
        paths = {"veth": (main, "ovA", OV_B, ECHO_PORT, IPERF_PLAIN),
                 "wireguard-go": (main, "wgA", WG_B, ECHO_PORT, IPERF_PLAIN)}
        for name, lb in labs.items():
            paths[f"{name} forward"] = (lb, "ovA", "127.0.0.1", FWD_ECHO, FWD_IPERF)
        rtt: dict[str, list[dict]] = {n: [] for n in paths}
        added: dict[str, list[float]] = {n: [] for n in paths}
        gbps: dict[tuple[str, bool], list[float]] = {(n, r): [] for n in paths for r in (False, True)}
        cpu_gb: dict[tuple[str, bool], list[float]] = {(n, r): [] for n in paths for r in (False, True)}
        pids = {n: (list(lb.node_pids.values()) if n.endswith("forward") else main.wg_pids if n == "wireguard-go" else [])
                for n, (lb, *_rest) in paths.items()}
        rtt_cpu = dict.fromkeys(paths, 0.0)  # CPU seconds of the tunnel processes over all ping-pongs
        for i in range(args.rounds):
            for name, (lb, tag, host, port, _) in paths.items():
                before = sum(cpu_seconds(p) for p in pids[name])
                rtt[name].append(lb.ping_pong(tag, host, port, args.count))
                rtt_cpu[name] += sum(cpu_seconds(p) for p in pids[name]) - before
            base = rtt["veth"][-1]["median_us"]
            for name in paths:
                added[name].append(rtt[name][-1]["median_us"] - base)
            if args.iperf:
                for name, (lb, tag, host, _, iport) in paths.items():
                    for reverse in (False, True):
                        before = sum(cpu_seconds(p) for p in pids[name])
                        g = lb.iperf(tag, host, iport, args.iperf, reverse)["gbps"]
                        gbps[(name, reverse)].append(g)
                        if pids[name]:  # CPU seconds of both tunnel processes per GB received (steadier than rates)
                            cpu_gb[(name, reverse)].append((sum(cpu_seconds(p) for p in pids[name]) - before)
                                                           / (g * args.iperf / 8))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{n} +{added[n][-1]:.0f} us" for n in paths if n != "veth") + f"; load {load()}", flush=True)

        med = statistics.median
        print(f"\n1-byte TCP ping-pong, {args.rounds} rounds of {args.count} round trips; medians over rounds")
        for name in paths:
            extra = "" if name == "veth" else (
                f"   added {med(added[name]):7.1f} us (rounds: {', '.join(f'{a:.0f}' for a in added[name])})")
            print(f"  {name:18s} median {med(r['median_us'] for r in rtt[name]):7.1f} us"
                  f"   p90 {med(r['p90_us'] for r in rtt[name]):7.1f} us{extra}")
        trips = args.rounds * (args.count + 50)
        print(f"  CPU of both tunnel processes per round trip (all rounds, {trips} round trips each; steady under "
              "load, where the times are not):")
        for name in paths:
            if pids[name]:
                print(f"    {name:18s} {rtt_cpu[name] / trips * 1e6:7.1f} us")
        wg = med(added["wireguard-go"])
        for name in labs:
            print(f"  {name} forward added round trip / wireguard-go's: {med(added[f'{name} forward']) / wg:.2f}x")
        if args.iperf:
            print(f"\nOne TCP stream, iperf3 -t {args.iperf}, receiver-side Gbit/s, medians over rounds")
            for reverse in (False, True):
                d = "B->A" if reverse else "A->B"
                wgr = med(gbps[("wireguard-go", reverse)])
                for name in paths:
                    g = gbps[(name, reverse)]
                    c = cpu_gb[(name, reverse)]
                    print(f"  {name + ' ' + d:26s} {med(g):6.3f}   {med(g) / wgr:5.2f}x wireguard-go"
                          + (f"   {med(c):5.1f} CPU s/GB" if c else "")
                          + f"   (runs: {', '.join(f'{x:.3f}' for x in g)})")
        print(f"\nload average at the end {load()}; total time {time.monotonic() - t0:.0f} s")
    finally:
        for lb in labs.values():
            lb.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over all paths")
    ap.add_argument("--count", type=int, default=2000, help="round trips per path and round")
    ap.add_argument("--iperf", type=int, default=0, metavar="SECONDS", help="also one iperf3 transfer each way per round")
    ap.add_argument("--baseline", metavar="DIR", help="another checkout whose overlay runs beside this one")
    ap.add_argument("--deadline", type=float, default=600, help="abort (and clean up) after this many seconds")
    args = ap.parse_args()
    return guarded("bench_pingpong", args.deadline, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

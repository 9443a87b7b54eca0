"""Many short TCP connections through an overlay port forward, beside wireguard-go (a browser
through SOCKS does this: a new connection for every few requests).

    python benchmarks/bench_shortconn.py [--rounds 10] [--round-size 1000] [--clients 10]
    python benchmarks/bench_shortconn.py --long        # 100,000 connections, RSS of both daemons

Needs root (network namespaces), wireguard-go, wg and /dev/net/tun; otherwise it says why and
exits 0. The namespaces, nodes and wireguard-go pair are bench_forward.py's (its ``Lab``):

    [ovA] alpha: overlay forward 15401 bravo:5401    [ovB] bravo: overlay share 5401, server :5401
    [wgA] wireguard-go 10.78.0.1                     [wgB] wireguard-go 10.78.0.2, server :5401

The server and client are tests/support/shortconn_tools.py's. The server is threaded: it reads 1 byte,
answers 100 bytes and closes (so the share's node, not the dialling one, closes first and holds
TIME-WAIT). ``--clients`` threads each loop: connect, send 1 byte, read the 100 bytes to EOF,
close. Per round of ``--round-size`` connections it
prints the rate (connections/s over the round's wall time), p50/p99 of the whole connection
time, the slowest connect() (for the forward that is only the local kernel handshake), how many
connections took 1 s or more (a SYN inside the tunnel waiting out a retransmission timeout) and
failures. wireguard-go runs first, then the overlay,
in the same run. With ``--long`` the RSS of both overlay daemons is printed after every round
(it must stay flat once TIME-WAIT tables are full).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import WG_B, BenchError, Lab, guarded  # noqa: E402

SHORT_PORT, FWD_SHORT = 5401, 15401

TOOLS = str(Path(__file__).resolve().parent.parent / "tests" / "support" / "shortconn_tools.py")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rounds_of(lb: Lab, tag: str, host: str, port: int, args, rss_pids: dict[str, int] | None) -> list[dict]:
    """Run the client in namespace ``tag``; one dict per round, printed as it arrives."""
    argv = [*lb.ns[tag].prefix(), sys.executable, TOOLS, "client", host, str(port), str(args.rounds),
            str(args.round_size), str(args.clients)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    assert p.stdout is not None
    for line in p.stdout:
        r = json.loads(line)
        out.append(r)
        mem = ""
        if rss_pids:
            r["rss_mib"] = {n: rss_kib(pid) / 1024 for n, pid in rss_pids.items()}
            mem = "   RSS " + ", ".join(f"{n} {v:.1f} MiB" for n, v in r["rss_mib"].items())
        print(f"    round {len(out):3d}: {r['rate']:7.0f} conn/s   p50 {r['p50_ms']:7.1f} ms   "
              f"p99 {r['p99_ms']:7.1f} ms   slowest connect() {r['max_connect_ms']:6.1f} ms   "
              f"taking >= 1 s {r['slow']:4d}   failed {r['failed']}{mem}", flush=True)
    p.wait(30)
    if p.returncode != 0 or len(out) != args.rounds:
        raise BenchError(f"client to {host}:{port} in {tag} exited {p.returncode}: {p.stderr.read()[-500:]}")
    return out


def summary(name: str, res: list[dict]) -> str:
    rates = [r["rate"] for r in res]
    return (f"  {name:16s} first round {rates[0]:6.0f}/s, last {rates[-1]:6.0f}/s "
            f"(last/first {rates[-1] / rates[0]:.2f}), median {statistics.median(rates):6.0f}/s; "
            f"worst p99 {max(r['p99_ms'] for r in res):7.1f} ms; connections taking >= 1 s "
            f"{sum(r['slow'] for r in res)}; failed {sum(r['failed'] for r in res)}")


def run(args: argparse.Namespace) -> None:
    lb = Lab()
    try:
        t0 = time.monotonic()
        lb.start_overlay()
        lb.start_wireguard()
        lb.spawn("ovB", "short-ov", sys.executable, TOOLS, "server", "0.0.0.0", str(SHORT_PORT))
        lb.spawn("wgB", "short-wg", sys.executable, TOOLS, "server", "0.0.0.0", str(SHORT_PORT))
        lb.overlay_cli("bravo", "share", str(SHORT_PORT))
        lb.overlay_cli("alpha", "forward", str(FWD_SHORT), f"bravo:{SHORT_PORT}")
        total = args.rounds * args.round_size
        print(f"{os.cpu_count()} CPUs, Linux {os.uname().release}, Python {sys.version.split()[0]}; setup "
              f"{time.monotonic() - t0:.1f} s; {total} connections per path in rounds of {args.round_size}, "
              f"{args.clients} concurrent clients (connect, 1 byte, 100 bytes back, close)", flush=True)
        results = {}
        if not args.skip_wireguard:
            print("  wireguard-go (kernel TCP through TUN):", flush=True)
            results["wireguard-go"] = rounds_of(lb, "wgA", WG_B, SHORT_PORT, args, None)
        print("  overlay forward (127.0.0.1:%d on alpha -> bravo:%d):" % (FWD_SHORT, SHORT_PORT), flush=True)
        rss = lb.node_pids if args.long else None
        if rss:
            print("    RSS before: " + ", ".join(f"{n} {rss_kib(p) / 1024:.1f} MiB" for n, p in rss.items()))
        results["overlay forward"] = rounds_of(lb, "ovA", "127.0.0.1", FWD_SHORT, args, rss)
        print("\nSummary")
        for name, res in results.items():
            print(summary(name, res))
        if "wireguard-go" in results:
            ov = statistics.median(r["rate"] for r in results["overlay forward"])
            wg = statistics.median(r["rate"] for r in results["wireguard-go"])
            print(f"  overlay / wireguard-go connection rate (medians): {ov / wg:.2f}x")
        print(f"\ntotal time {time.monotonic() - t0:.0f} s")
    except BaseException:
        for label, p in lb.procs:
            if p.poll() is not None and p.returncode not in (0, -15):
                print(f"----- {label} exited {p.returncode}\n{lb.log_tail(label)}", file=sys.stderr)
        raise
    finally:
        lb.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--round-size", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=10, help="concurrent client threads")
    ap.add_argument("--long", action="store_true", help="100 rounds (100,000 connections) with daemon RSS")
    ap.add_argument("--skip-wireguard", action="store_true", help="only the overlay forward")
    ap.add_argument("--deadline", type=float, default=None, help="abort (and clean up) after this many seconds")
    args = ap.parse_args()
    if args.long:
        args.rounds = max(args.rounds, 100)
    deadline = args.deadline or (3000 if args.long else 900)
    return guarded("bench_shortconn", deadline, lambda: run(args), needs=("wireguard-go", "wg", "tun"))


if __name__ == "__main__":
    sys.exit(main())

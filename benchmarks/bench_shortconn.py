"""Many short TCP connections through an overlay port forward, beside wireguard-go (a browser
through SOCKS does this: a new connection for every few requests).

    python benchmarks/bench_shortconn.py [--rounds 10] [--round-size 1000] [--clients 10]
    python benchmarks/bench_shortconn.py --long        # 100,000 connections, RSS of both daemons
    python benchmarks/bench_shortconn.py --skip-wireguard --profile DIR   # where the daemons spend it

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
failures, and the CPU time each tunnel process (the two overlay daemons, the two wireguard-go)
spent per connection: on a machine shared with other jobs the rate follows their load, the CPU
per connection much less; and, in the summary, the packets each path sent through its tunnel
per connection. wireguard-go runs first, then the overlay, in the same run. With
``--long`` the RSS of both overlay daemons is printed after every round (it must stay flat once
TIME-WAIT tables are full). With ``--profile DIR``, py-spy (``pip install py-spy``) samples both
daemons during the overlay rounds: the share of time idle in epoll, then the functions with the
most busy samples (idle thread-pool workers left out); the raw stacks stay in DIR.
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

from bench_forward import WG_B, BenchError, Lab, Profile, cpu_seconds, guarded  # noqa: E402

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


def netstack_packets(lb: Lab, node: str) -> int:
    """Packets a node's userspace stack sent plus received (its status counters)."""
    ns = lb.status(node).get("netstack") or {}
    return int(ns.get("tx_packets", 0)) + int(ns.get("rx_packets", 0))


def veth_packets(lb: Lab, tag: str, ifname: str) -> int:
    """Packets sent plus received on a namespace's veth (the tunnel's UDP datagrams; a GSO
    batch of datagrams counts once, so only for senders without GSO: wireguard-go here)."""
    try:
        st = json.loads(lb.ns[tag].run("ip", "-j", "-s", "link", "show", "dev", ifname).stdout)[0]["stats64"]
        return int(st["tx"]["packets"]) + int(st["rx"]["packets"])
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError):
        return 0


def rounds_of(lb: Lab, tag: str, host: str, port: int, args, rss_pids: dict[str, int] | None,
              cpu_pids: dict[str, int]) -> list[dict]:
    """Run the client in namespace ``tag``; one dict per round, printed as it arrives (with the CPU
    time each of ``cpu_pids`` spent per connection in the round)."""
    cpu = {n: cpu_seconds(pid) for n, pid in cpu_pids.items()}
    argv = [*lb.ns[tag].prefix(), sys.executable, TOOLS, "client", host, str(port), str(args.rounds),
            str(args.round_size), str(args.clients)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    assert p.stdout is not None
    for line in p.stdout:
        r = json.loads(line)
        out.append(r)
        now = {n: cpu_seconds(pid) for n, pid in cpu_pids.items()}
        r["cpu_ms"] = {n: 1e3 * (now[n] - cpu[n]) / r["n"] for n in now}
        cpu = now
        mem = "   CPU/conn " + ", ".join(f"{n} {v:.2f} ms" for n, v in r["cpu_ms"].items()) if cpu_pids else ""
        if rss_pids:
            r["rss_mib"] = {n: rss_kib(pid) / 1024 for n, pid in rss_pids.items()}
            mem += "   RSS " + ", ".join(f"{n} {v:.1f} MiB" for n, v in r["rss_mib"].items())
        print(f"    round {len(out):3d}: {r['rate']:7.0f} conn/s   p50 {r['p50_ms']:7.1f} ms   "
              f"p99 {r['p99_ms']:7.1f} ms   slowest connect() {r['max_connect_ms']:6.1f} ms   "
              f"taking >= 1 s {r['slow']:4d}   failed {r['failed']}{mem}", flush=True)
    p.wait(30)
    if p.returncode != 0 or len(out) != args.rounds:
        raise BenchError(f"client to {host}:{port} in {tag} exited {p.returncode}: {p.stderr.read()[-500:]}")
    return out


def start_profile(lb: Lab, keep: Path) -> list[subprocess.Popen]:
    """py-spy attached to both daemons for the overlay rounds (raw stacks into ``keep``)."""
    keep.mkdir(parents=True, exist_ok=True)
    venv_spy = Path(sys.executable).parent / "py-spy"
    spy = str(venv_spy) if venv_spy.exists() else "py-spy"
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--idle",
                              "--format", "raw", "--output", str(keep / f"pyspy-{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in lb.node_pids.items()]


def stop_profile(spies: list[subprocess.Popen]) -> None:
    for s in spies:
        if s.poll() is None:
            s.send_signal(2)  # py-spy writes its output on SIGINT
    for s in spies:
        try:
            s.wait(30)
        except subprocess.TimeoutExpired:
            s.kill()
            s.wait(5)


IDLE_WORKER = "_worker (concurrent/futures/thread.py"   # a pool thread waiting for work


def _main_thread(text: str) -> str:
    """The raw stacks without idle thread-pool workers (py-spy's ``--idle`` counts them as busy)."""
    return "\n".join(line for line in text.splitlines()
                     if not line.rpartition(" ")[0].rpartition(";")[2].startswith(IDLE_WORKER))


def profile_report(lb: Lab, keep: Path, top: int = 25) -> list[str]:
    lines = []
    for name in lb.node_pids:
        try:
            prof = Profile(_main_thread((keep / f"pyspy-{name}.txt").read_text()))
        except OSError:
            lines.append(f"  node {name}: no py-spy output")
            continue
        if not prof.total:
            lines.append(f"  node {name}: no samples")
            continue
        role = "forward, dialling" if name == "alpha" else "share, serving"
        lines.append(f"  node {name} ({role}): {prof.total} samples, "
                     f"{100 * prof.idle / prof.total:.0f}% idle (waiting in epoll), {prof.busy} busy")
        lines += prof.report(top)
    return lines


def summary(name: str, res: list[dict]) -> str:
    rates = [r["rate"] for r in res]
    cpu = ", ".join(f"{n} {statistics.median(r['cpu_ms'][n] for r in res):.2f}" for n in res[0]["cpu_ms"])
    return (f"  {name:16s} first round {rates[0]:6.0f}/s, last {rates[-1]:6.0f}/s "
            f"(last/first {rates[-1] / rates[0]:.2f}), median {statistics.median(rates):6.0f}/s; "
            f"worst p99 {max(r['p99_ms'] for r in res):7.1f} ms; connections taking >= 1 s "
            f"{sum(r['slow'] for r in res)}; failed {sum(r['failed'] for r in res)}; "
            f"p50 {statistics.median(r['p50_ms'] for r in res):.1f} ms (median of rounds); "
            f"CPU ms per connection (medians) {cpu}")


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
        packets: dict[str, float] = {}  # tunnel datagrams per connection, both ways (the veth's count)
        if not args.skip_wireguard:
            print("  wireguard-go (kernel TCP through TUN):", flush=True)
            before = veth_packets(lb, "wgA", "wa")
            results["wireguard-go"] = rounds_of(lb, "wgA", WG_B, SHORT_PORT, args, None,
                                                dict(zip(("wg-a", "wg-b"), lb.wg_pids)))
            packets["wireguard-go"] = (veth_packets(lb, "wgA", "wa") - before) / total
        print("  overlay forward (127.0.0.1:%d on alpha -> bravo:%d):" % (FWD_SHORT, SHORT_PORT), flush=True)
        rss = lb.node_pids if args.long else None
        if rss:
            print("    RSS before: " + ", ".join(f"{n} {rss_kib(p) / 1024:.1f} MiB" for n, p in rss.items()))
        spies = start_profile(lb, args.profile) if args.profile else []
        before = netstack_packets(lb, "alpha")
        try:
            results["overlay forward"] = rounds_of(lb, "ovA", "127.0.0.1", FWD_SHORT, args, rss, lb.node_pids)
        finally:
            stop_profile(spies)
        packets["overlay forward"] = (netstack_packets(lb, "alpha") - before) / total
        if args.profile:
            print("\n".join(profile_report(lb, args.profile)))
        print("\nSummary")
        for name, res in results.items():
            print(summary(name, res))
        print("  packets through the tunnel per connection, both ways (wireguard-go: its veth's count, "
              "with a few keepalives; overlay: alpha's userspace stack): "
              + ", ".join(f"{name} {n:.2f}" for name, n in packets.items()))
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
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy both daemons during the overlay rounds; raw stacks kept in DIR, top functions printed")
    ap.add_argument("--deadline", type=float, default=None, help="abort (and clean up) after this many seconds")
    args = ap.parse_args()
    if args.long:
        args.rounds = max(args.rounds, 100)
    deadline = args.deadline or (3000 if args.long else 900)
    return guarded("bench_shortconn", deadline, lambda: run(args), needs=("wireguard-go", "wg", "tun"))


if __name__ == "__main__":
    sys.exit(main())

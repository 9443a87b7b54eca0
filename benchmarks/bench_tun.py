"""Kernel TCP through `overlay up --tun` / `--tap`, beside wireguard-go over TUN, in one run.

    python benchmarks/bench_tun.py [--runs 3] [--time 5] [--pings 50] [--rtt-count 1000]
                                   [--profile] [--keep-profiles DIR] [--deadline 240]

Needs root (network namespaces), iperf3, ping, wireguard-go, wg and /dev/net/tun; otherwise it
says why and exits 0 (so ``make bench`` runs everywhere). Everything runs in namespaces it
creates; every process is started here and stopped, and every namespace deleted, on exit (also on
a failure, a timeout, Ctrl-C or SIGTERM):

    [tunA] 10.81.0.1 ── veth ── [tunB] 10.81.0.2   overlay server 10.81.0.1:7777 (idle once direct)
      overlay up --tun (ovl0, 100.64.x.a)   overlay up --tun (ovl0, 100.64.x.b); iperf3 -s; echo
    [tapA] 10.82.0.1 ── veth ── [tapB] 10.82.0.2   the same with --tap (a server of their own)
    [wgA]  10.79.0.1 ── veth ── [wgB]  10.79.0.2   wireguard-go, TUN 10.78.0.1 / .2 (MTU 1420)

The wireguard-go pair is bench_forward.py's (imported, not copied). Each tunnel has a namespace
pair of its own, with identical veths, so that no node ever sees another tunnel's address as a
path candidate (a tunnel inside a tunnel) and the TUN and TAP nodes can both hold ovl0 and a
route for the pool; all share this machine's CPUs, and the runs are interleaved round-robin.

Measured:

- throughput: one kernel TCP stream, ``iperf3 -c VIP -t TIME -J`` from A to B's tunnel address;
  "A->B" is the client sending, "B->A" is ``-R``; iperf3's receiver-side rate; ``--runs``
  interleaved rounds over (TUN, TAP, wireguard-go) x (A->B, B->A); medians, and the ratio
  overlay / wireguard-go of the medians of this run.
- CPU: user + system seconds (``/proc/PID/stat`` utime + stime, all threads) used by the two
  tunnel processes (the two overlay daemons / the two wireguard-go) during each transfer, the
  kernel's (system) share of it, and the same per GB delivered (what the tunnel costs,
  independent of the rate it reached: on a shared machine the rate moves more than the cost).
- latency: ``ping -c PINGS -i 0.01`` (after a warm-up) to B's tunnel address and to B's veth
  address (the plain path), in 3 interleaved rounds, median and p90 of all replies; and a 1-byte
  TCP ping-pong (TCP_NODELAY, ``--rtt-count`` round trips). "added" = median - veth median.
- ``--profile`` (needs ``pip install py-spy``): one more transfer per direction through the TUN
  pair with py-spy attached to both daemons (bench_forward.py's report: idle share, then the
  functions with the most busy samples; the event loop's thread only). py-spy samples wall
  time: a line making a syscall also collects the time the process waits for a CPU after it.

The nodes inherit this process's environment: ``OVERLAY_TUN_OFFLOAD=0 python
benchmarks/bench_tun.py`` measures them without TUN/TAP offloads (IFF_VNET_HDR), for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_forward as bf  # noqa: E402  (puts the repo and tests/support on sys.path)
import lab  # noqa: E402
from bench_forward import CLK_TCK, OVERLAY, BenchError, wait  # noqa: E402
from overlay.node import api  # noqa: E402

PAIRS = {"tun": "10.81.0", "tap": "10.82.0"}    # underlay /24 of each overlay namespace pair
SERVER_PORT = 7777
IPERF_PORT = 5201
ECHO_PORT = 5301
PING_RE = re.compile(r"time=([\d.]+) ms")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all threads (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class MainThreadProfile(bf.Profile):
    """bench_forward's profile summary, over the event loop's thread only: a TUN/TAP node also has
    a netlink worker thread (pyroute2), idle in queue.get, which py-spy --idle would count as busy."""

    def __init__(self, text: str):
        super().__init__("\n".join(line for line in text.splitlines()
                                    if "(threading.py:" not in line.split(";", 1)[0]))


class TunLab(bf.Lab):
    """bench_forward's Lab (processes, namespaces, cleanup, wireguard-go pair) plus TUN/TAP pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: dict[str, dict] = {}

    def start_pair(self, kind: str, setup_timeout: float = 45) -> None:
        """Two namespaces joined by a veth, a server in A, ``overlay up --KIND`` in A and B on a
        direct path; iperf3 -s and a TCP echo server in B."""
        net = PAIRS[kind]
        ta, tb = f"{kind}A", f"{kind}B"
        a, b = self.netns(ta), self.netns(tb)
        ip_a, ip_b = f"{net}.1", f"{net}.2"
        lab.veth(a, "va", f"{ip_a}/24", b, "vb", f"{ip_b}/24")
        server = f"{ip_a}:{SERVER_PORT}"
        self.spawn(ta, f"server-{kind}", *OVERLAY, "server", "--listen", server,
                   "--data", str(self.tmp / f"server-{kind}"), "--log-level", "warning")
        homes = {ta: f"{kind}-alpha", tb: f"{kind}-bravo"}
        pids = []
        for tag, home in homes.items():
            p = self.spawn(tag, home, *OVERLAY, "up", f"--{kind}", "--server", server,
                           "--name", home.split("-")[1], "--home", str(self.tmp / home),
                           "--socks", "off", "--log-level", "warning")
            pids.append(p.pid)  # `ip netns exec` execs: this is the daemon's pid
        ha, hb = homes[ta], homes[tb]
        for home in (ha, hb):
            wait(lambda: self.status(home).get("server", {}).get("connected"), setup_timeout,
                 f"{home} to connect")
        self.overlay_cli(ha, "create", "bench", "--password", "bench-password")
        self.overlay_cli(hb, "join", "bench", "--password", "bench-password")

        def direct() -> bool:
            peers = {p["name"]: p for p in self.status(ha).get("peers", [])}
            return ((peers.get("bravo") or {}).get("path") or "").startswith(f"direct {ip_b}:")
        wait(direct, setup_timeout, f"a direct {kind} path from alpha to bravo over the veth")
        st_a, st_b = self.status(ha), self.status(hb)
        vip_a, vip_b = st_a["node"]["virtual_ip"], st_b["node"]["virtual_ip"]
        if not vip_a or not vip_b:
            raise BenchError(f"{kind} nodes have no virtual IP: {vip_a}, {vip_b}")
        self.spawn(tb, f"iperf3-{kind}", "iperf3", "-s", "-p", str(IPERF_PORT))
        self.spawn(tb, f"echo-{kind}", sys.executable, "-c", bf.ECHO_SERVER, "0.0.0.0", str(ECHO_PORT))
        wait(lambda: a.run("ping", "-c", "1", "-W", "1", vip_b, check=False).returncode == 0, setup_timeout,
             f"a ping through the {kind} tunnel")
        self.pairs[kind] = {"a": ta, "b": tb, "vip_a": vip_a, "vip_b": vip_b, "veth_b": ip_b, "pids": pids,
                            "mtu": (st_a.get("interface") or {}).get("mtu")}

    def status(self, node: str) -> dict:
        """The daemon's status straight from its API socket (what `overlay status --json` prints),
        without starting a Python process per poll on a machine with few cores."""
        try:
            return api.call(self.tmp / node / "overlay.sock", "status", timeout=5)
        except (api.DaemonNotRunning, api.ApiError, OSError, ValueError):
            return {}

    def ping(self, tag: str, host: str, count: int) -> tuple[list[float], int]:
        """``ping -c COUNT -i 0.01``: the round-trip times in us, and how many got no reply."""
        r = self.ns[tag].run("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", host, check=False,
                             timeout=count * 0.01 + 20)
        times = [float(t) * 1000 for t in PING_RE.findall(r.stdout)]
        if not times:
            raise BenchError(f"ping {host} in {tag}: no reply\n{r.stdout[-500:]}{r.stderr[-300:]}")
        return times, count - len(times)


# ---------------------------------------------------------------------------- output helpers
def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        wg = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True, timeout=5).stdout
        wg = wg.split()[1] if len(wg.split()) > 1 else "?"
    except (OSError, subprocess.SubprocessError):
        wg = "?"
    if re.fullmatch(r"v0\.0\.\d{8}", wg) and wg < "v0.0.20230223":
        wg += " (older than its TUN offloads of v0.0.20230223)"
    try:
        rev = subprocess.run(["git", "-C", str(bf.REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    offload = os.environ.get("OVERLAY_TUN_OFFLOAD")
    return (f"machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}, wireguard-go {wg}; {loadavg()}\n"
            f"code: {bf.REPO} at {rev}" + (f", OVERLAY_TUN_OFFLOAD={offload}" if offload is not None else ""))


def loadavg() -> str:
    """Other work on the machine skews every figure: say how busy it was."""
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average ?"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  " + "  ".join("-" * w for w in widths), *map(fmt, rows)]


# ---------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> None:
    lb = TunLab()
    try:
        t0 = time.monotonic()
        print(machine(), flush=True)
        lb.start_pair("tun")
        lb.start_pair("tap")
        lb.start_wireguard()
        tun, tap = lb.pairs["tun"], lb.pairs["tap"]
        print(f"setup {time.monotonic() - t0:.1f} s: 2 overlay servers, 2 TUN + 2 TAP nodes on direct paths "
              f"(inner MTU {tun['mtu']}), 2 wireguard-go (TUN MTU 1420)", flush=True)
        # name -> (client namespace, tunnel address of B, iperf3 port, tunnel pids)
        paths = {
            "overlay TUN": (tun["a"], tun["vip_b"], IPERF_PORT, tun["pids"]),
            "overlay TAP": (tap["a"], tap["vip_b"], IPERF_PORT, tap["pids"]),
            "wireguard-go": ("wgA", bf.WG_B, bf.IPERF_PLAIN, lb.wg_pids),
        }
        gbps: dict[tuple, list[float]] = collections.defaultdict(list)
        cpu: dict[tuple, list[tuple[float, float]]] = collections.defaultdict(list)   # per run: (A, B)
        sys_share: dict[tuple, list[float]] = collections.defaultdict(list)
        gbytes: dict[tuple, list[float]] = collections.defaultdict(list)
        retrans: dict[tuple, list] = collections.defaultdict(list)
        for i in range(args.runs):
            for name, (tag, host, port, pids) in paths.items():
                for reverse in (False, True):
                    before = [cpu_times(p) for p in pids]
                    res = lb.iperf(tag, host, port, args.time, reverse)
                    after = [cpu_times(p) for p in pids]
                    used = tuple(sum(a) - sum(b) for a, b in zip(after, before))
                    system = sum(a[1] - b[1] for a, b in zip(after, before))
                    cpu[(name, reverse)].append(used)
                    sys_share[(name, reverse)].append(100 * system / max(sum(used), 1e-9))
                    gbps[(name, reverse)].append(res["gbps"])
                    gbytes[(name, reverse)].append(res["gbps"] * args.time / 8)
                    retrans[(name, reverse)].append(res["retransmits"])
            print(f"throughput round {i + 1}/{args.runs} done ({time.monotonic() - t0:.0f} s)", flush=True)

        # latency: ICMP ping (interleaved rounds) and a 1-byte TCP ping-pong
        lat_paths = {
            "veth (no tunnel)": (tun["a"], tun["veth_b"], ECHO_PORT),
            "overlay TUN": (tun["a"], tun["vip_b"], ECHO_PORT),
            "overlay TAP": (tap["a"], tap["vip_b"], ECHO_PORT),
            "wireguard-go": ("wgA", bf.WG_B, bf.ECHO_PORT),
        }
        icmp: dict[str, list[float]] = collections.defaultdict(list)
        lost: dict[str, int] = collections.Counter()
        for tag, host, _ in lat_paths.values():
            lb.ping(tag, host, 3)  # warm-up: ARP, sessions, caches
        for _round in range(3):
            for name, (tag, host, _) in lat_paths.items():
                times, n_lost = lb.ping(tag, host, args.pings)
                icmp[name] += times
                lost[name] += n_lost
        tcp = {name: lb.ping_pong(tag, host, port, args.rtt_count) for name, (tag, host, port) in lat_paths.items()}

        # ------------------------------------------------------------------ report
        print(f"\nOne TCP stream (iperf3 -t {args.time}, receiver-side rate), median of {args.runs} interleaved "
              f"runs;\nCPU s = user+sys seconds of the two tunnel processes during each {args.time} s run (A + B), "
              f"sys% = the kernel's share of it, CPU s/GB = per GB delivered")
        rows = []
        for reverse in (False, True):
            wg = med(gbps[("wireguard-go", reverse)])
            for name in paths:
                key = (name, reverse)
                g = med(gbps[key])
                tot = [a + b for a, b in cpu[key]]
                per_gb = [c / max(gb, 1e-9) for c, gb in zip(tot, gbytes[key])]
                rows.append([name, "B->A (-R)" if reverse else "A->B", f"{g:.3f}",
                             " ".join(f"{v:.3f}" for v in gbps[key]),
                             "1.00x" if name == "wireguard-go" else f"{g / wg:.2f}x",
                             f"{med(tot):.2f}",
                             f"{med([a for a, _ in cpu[key]]):.2f} + {med([b for _, b in cpu[key]]):.2f}",
                             f"{med(sys_share[key]):.0f}%", f"{med(per_gb):.2f}",
                             " ".join(str(r) for r in retrans[key])])
        for line in table(["path", "direction", "Gbit/s", "runs", "/wg-go", "CPU s", "A + B", "sys%", "CPU s/GB",
                           "retransmits"], rows):
            print(line)

        base_icmp = med(icmp["veth (no tunnel)"])
        base_tcp = tcp["veth (no tunnel)"]["median_us"]
        print(f"\nRound-trip latency: ping -c {args.pings} -i 0.01 x 3 interleaved rounds (after warm-up); "
              f"1-byte TCP ping-pong x {args.rtt_count} (TCP_NODELAY); microseconds")
        rows = []
        for name in lat_paths:
            m, t = med(icmp[name]), tcp[name]["median_us"]
            veth = name.startswith("veth")
            rows.append([name, f"{m:.0f}", f"{pct(icmp[name], 0.9):.0f}", "-" if veth else f"{m - base_icmp:.0f}",
                         str(lost[name]), f"{t:.0f}", f"{tcp[name]['p90_us']:.0f}",
                         "-" if veth else f"{t - base_tcp:.0f}"])
        for line in table(["path", "ping med", "p90", "added", "lost", "tcp med", "p90", "added"], rows):
            print(line)

        if args.profile:
            if shutil.which("py-spy") is None:
                print("\nprofile skipped: py-spy not installed (pip install py-spy)")
            else:
                # bench_forward's profile() drives lb.node_pids through iperf on ("ovA", 127.0.0.1:FWD):
                # point it at the TUN pair instead.
                lb.node_pids = {"alpha": tun["pids"][0], "bravo": tun["pids"][1]}
                lb.iperf = _iperf_to(lb, tun["a"], tun["vip_b"], IPERF_PORT)
                bf.Profile = MainThreadProfile
                print(f"\nProfile of the TUN nodes (py-spy, 250 Hz, --nonblocking, {args.time} s transfer)")
                for reverse in (False, True):
                    for line in bf.profile(lb, args.time, reverse, args.top, args.keep_profiles):
                        print(line)
        print(f"\ntotal time {time.monotonic() - t0:.0f} s; {loadavg()}")
    except BaseException:
        for label, p in lb.procs:
            if p.poll() is not None and p.returncode not in (0, -15):
                print(f"----- {label} exited {p.returncode}\n{lb.log_tail(label)}", file=sys.stderr)
        raise
    finally:
        lb.close()


def _iperf_to(lb: TunLab, tag: str, host: str, port: int):
    orig = bf.Lab.iperf

    def iperf(_tag, _host, _port, seconds, reverse):
        return orig(lb, tag, host, port, seconds, reverse)
    return iperf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="interleaved iperf3 runs per path and direction")
    ap.add_argument("--time", type=int, default=5, help="seconds per iperf3 transfer")
    ap.add_argument("--pings", type=int, default=50, help="ICMP echoes per path and round (3 rounds)")
    ap.add_argument("--rtt-count", type=int, default=1000, help="round trips in the TCP ping-pong")
    ap.add_argument("--profile", action="store_true", help="also profile the TUN nodes with py-spy")
    ap.add_argument("--top", type=int, default=12, help="functions per node in the profile")
    ap.add_argument("--keep-profiles", type=Path, metavar="DIR", help="copy py-spy's raw stacks here")
    ap.add_argument("--deadline", type=float, default=240, help="abort (and clean up) after this many seconds")
    args = ap.parse_args()
    return bf.guarded("bench_tun", args.deadline, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

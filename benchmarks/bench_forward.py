"""One TCP stream through an overlay port forward, beside wireguard-go over TUN and plain veth.

    python benchmarks/bench_forward.py [--runs 3] [--time 5] [--rtt-count 2000] [--no-profile]

Needs root (network namespaces), iperf3, wireguard-go, wg and /dev/net/tun; otherwise it says
why and exits 0 (so ``make bench`` runs everywhere). Everything runs in namespaces it creates:

    [ovA] 10.77.0.1  ── veth ──  [ovB] 10.77.0.2        overlay (and the plain-veth baseline)
      overlay server 10.77.0.1:7777 (idle once the path is direct)
      overlay up --name alpha           overlay up --name bravo
      overlay forward 15201 bravo:5201  overlay share 5201; iperf3 -s -B 127.0.0.1 -p 5201
      overlay forward 15301 bravo:5301  overlay share 5301; 1-byte TCP echo on 0.0.0.0:5301
    [wgA] 10.79.0.1  ── veth ──  [wgB] 10.79.0.2        wireguard-go (stock Go WireGuard, TUN)
      TUN 10.78.0.1/24 (MTU 1420)       TUN 10.78.0.2/24; iperf3 -s -p 5202; echo on :5301

wireguard-go lives in namespaces of its own so the overlay nodes never see its TUN address as a
path candidate (the overlay would otherwise tunnel inside wireguard-go).

What is measured, each in one run of this script on this machine:

- throughput: ``iperf3 -c ... -t TIME -J`` from A (client) to B (server): "A->B" is the client
  sending, "B->A" is ``-R``. The figure is iperf3's receiver-side ``sum_received`` bit rate. Paths
  and directions are interleaved round-robin, ``--runs`` rounds; medians are printed with every run.
  For the overlay the stream is: iperf3 -> 127.0.0.1:15201 (kernel TCP) -> node alpha (forward,
  userspace TCP/IP, WireGuard, UDP) -> veth -> node bravo (UDP, WireGuard, userspace TCP/IP,
  share) -> 127.0.0.1:5201 (kernel TCP) -> iperf3.
- CPU: user+system CPU of the two tunnel processes (overlay daemons / wireguard-go instances)
  over each transfer, in % of one core (this machine may have few cores; iperf3 competes too).
- latency: a 1-byte TCP ping-pong (TCP_NODELAY, one connection, warm-up excluded) from A to B,
  ``--rtt-count`` round trips; median and 90th percentile. "added" is the median minus the veth
  median: the cost per round trip of the tunnel (both nodes traversed twice).
- profile (unless ``--no-profile``; needs ``pip install py-spy``): one extra transfer per
  direction with ``py-spy record --nonblocking --idle`` attached to both daemons; prints, per
  node, the share of samples idle in epoll (nothing to do), then the functions with the most busy
  samples: self (the function's own code on top of the stack; a C call such as the AEAD or a
  syscall counts for the Python line that made it) and total (anywhere in a loop callback).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

import lab  # noqa: E402
from overlay import crypto  # noqa: E402

OV_A, OV_B = "10.77.0.1", "10.77.0.2"
WG_UDP_A, WG_UDP_B = "10.79.0.1", "10.79.0.2"
WG_A, WG_B = "10.78.0.1", "10.78.0.2"
WG_PORT = 51820
SERVER_PORT = 7777
IPERF_OV, IPERF_PLAIN = 5201, 5202
FWD_IPERF = 15201
ECHO_PORT, FWD_ECHO = 5301, 15301
OVERLAY = [sys.executable, "-m", "overlay"]
CLK_TCK = os.sysconf("SC_CLK_TCK")

ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
print("ready", flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while d := c.recv(4096):
            c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

PING_PONG = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
clock = time.perf_counter_ns
rtts = []
for i in range(n + 50):
    t0 = clock()
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("echo connection closed")
    if i >= 50:
        rtts.append(clock() - t0)
s.close()
rtts.sort()
print(json.dumps({"median_us": rtts[len(rtts) // 2] / 1e3, "p90_us": rtts[len(rtts) * 9 // 10] / 1e3,
                  "min_us": rtts[0] / 1e3, "n": len(rtts)}))
"""


class BenchError(Exception):
    pass


def wait(cond, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; 0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Lab:
    """The namespaces and processes of one benchmark run; ``close()`` removes all of them."""

    def __init__(self, repo: Path = REPO) -> None:
        self.repo = repo  # the checkout whose overlay code the daemons run (another one: a baseline)
        self.tmp = Path(tempfile.mkdtemp(prefix="ovbench-"))  # short: Unix socket paths are limited
        self.ns: dict[str, lab.Netns] = {}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.wg_ifaces: list[str] = []
        self.node_pids: dict[str, int] = {}
        self.wg_pids: list[int] = []

    # ------------------------------------------------------------------ plumbing
    def netns(self, tag: str) -> lab.Netns:
        ns = self.ns[tag] = lab.Netns(tag)
        return ns

    def spawn(self, tag: str, label: str, *argv: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{label}.log", "wb")
        # cwd: ``python -m overlay`` imports from the current directory before PYTHONPATH
        p = self.ns[tag].popen(*argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env or dict(os.environ, PYTHONPATH=str(self.repo)), cwd=str(self.repo))
        log.close()
        self.procs.append((label, p))
        return p

    def log_tail(self, label: str, n: int = 3000) -> str:
        try:
            return (self.tmp / f"{label}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns in self.ns.values():
            ns.close()
        for ifname in self.wg_ifaces:
            Path(f"/var/run/wireguard/{ifname}.sock").unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ the overlay side
    def overlay_cli(self, node: str, *args: str) -> str:
        r = subprocess.run([*OVERLAY, *args, "--home", str(self.tmp / node)], capture_output=True, text=True,
                           timeout=30, env=dict(os.environ, PYTHONPATH=str(self.repo)), cwd=str(self.repo))
        if r.returncode != 0:
            raise BenchError(f"overlay {' '.join(args)} on {node} failed: {r.stdout}{r.stderr}")
        return r.stdout

    def status(self, node: str) -> dict:
        try:
            return json.loads(self.overlay_cli(node, "status", "--json"))
        except (BenchError, ValueError):
            return {}

    def start_overlay(self) -> None:
        a, b = self.netns("ovA"), self.netns("ovB")
        lab.veth(a, "va", f"{OV_A}/24", b, "vb", f"{OV_B}/24")
        server = f"{OV_A}:{SERVER_PORT}"
        self.spawn("ovA", "server", *OVERLAY, "server", "--listen", server, "--data", str(self.tmp / "server"),
                   "--log-level", "warning")
        for tag, name in (("ovA", "alpha"), ("ovB", "bravo")):
            p = self.spawn(tag, name, *OVERLAY, "up", "--server", server, "--name", name,
                           "--home", str(self.tmp / name), "--socks", "off", "--log-level", "warning")
            self.node_pids[name] = p.pid  # `ip netns exec` execs: this is the daemon's pid
        for name in ("alpha", "bravo"):
            wait(lambda: self.status(name).get("server", {}).get("connected"), 30, f"{name} to connect")
        self.overlay_cli("alpha", "create", "bench", "--password", "bench-password")
        self.overlay_cli("bravo", "join", "bench", "--password", "bench-password")

        def direct() -> bool:
            peers = {p["name"]: p for p in self.status("alpha").get("peers", [])}
            path = (peers.get("bravo") or {}).get("path") or ""
            return path.startswith(f"direct {OV_B}:")
        wait(direct, 30, "a direct path from alpha to bravo over the veth")
        self.spawn("ovB", "iperf3-ov", "iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_OV))
        self.spawn("ovB", "iperf3-plain", "iperf3", "-s", "-p", str(IPERF_PLAIN))
        self.spawn("ovB", "echo-ov", sys.executable, "-c", ECHO_SERVER, "0.0.0.0", str(ECHO_PORT))
        self.overlay_cli("bravo", "share", str(IPERF_OV))
        self.overlay_cli("bravo", "share", str(ECHO_PORT))
        self.overlay_cli("alpha", "forward", str(FWD_IPERF), f"bravo:{IPERF_OV}")
        self.overlay_cli("alpha", "forward", str(FWD_ECHO), f"bravo:{ECHO_PORT}")

    # ------------------------------------------------------------------ the wireguard-go side
    def start_wireguard(self) -> None:
        a, b = self.netns("wgA"), self.netns("wgB")
        lab.veth(a, "wa", f"{WG_UDP_A}/24", b, "wb", f"{WG_UDP_B}/24")
        keys = {"wgA": crypto.generate_private_key(), "wgB": crypto.generate_private_key()}
        ends = {"wgA": (WG_UDP_A, WG_A), "wgB": (WG_UDP_B, WG_B)}
        for tag, other in (("wgA", "wgB"), ("wgB", "wgA")):
            ifname = f"wgb{uuid.uuid4().hex[:8]}"
            self.wg_ifaces.append(ifname)
            p = self.spawn(tag, f"wireguard-go-{tag}", "wireguard-go", "-f", ifname,
                           env=dict(os.environ, WG_PROCESS_FOREGROUND="1"))
            self.wg_pids.append(p.pid)
            wait(lambda: Path(f"/var/run/wireguard/{ifname}.sock").exists(), 10, "wireguard-go's UAPI socket")
            keyfile = self.tmp / f"{tag}.key"
            keyfile.write_text(base64.b64encode(keys[tag]).decode() + "\n")
            keyfile.chmod(0o600)
            peer_pub = base64.b64encode(crypto.public_key(keys[other])).decode()
            self.ns[tag].run("wg", "set", ifname, "private-key", str(keyfile), "listen-port", str(WG_PORT),
                             "peer", peer_pub, "allowed-ips", f"{ends[other][1]}/32",
                             "endpoint", f"{ends[other][0]}:{WG_PORT}")
            self.ns[tag].run("ip", "addr", "add", f"{ends[tag][1]}/24", "dev", ifname)
            self.ns[tag].run("ip", "link", "set", ifname, "up")
        self.spawn("wgB", "iperf3-wg", "iperf3", "-s", "-p", str(IPERF_PLAIN))
        self.spawn("wgB", "echo-wg", sys.executable, "-c", ECHO_SERVER, "0.0.0.0", str(ECHO_PORT))
        r = a.run("ping", "-c", "3", "-i", "0.2", "-W", "3", WG_B, check=False)
        if r.returncode != 0:
            raise BenchError(f"no ping across wireguard-go: {r.stdout}{r.stderr}")

    # ------------------------------------------------------------------ measurements
    def iperf(self, tag: str, host: str, port: int, seconds: int, reverse: bool) -> dict:
        """One iperf3 transfer from namespace ``tag``; receiver-side Gbit/s and the retransmits."""
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
        if reverse:
            argv.append("-R")
        last = ""
        for _attempt in range(3):  # the server may still be tearing down the previous test
            r = self.ns[tag].run(*argv, check=False, timeout=seconds + 30)
            try:
                out = json.loads(r.stdout)
            except ValueError:
                out = {"error": r.stdout[-300:] + r.stderr[-300:]}
            if "error" not in out:
                end = out["end"]
                return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                        "bytes": end["sum_received"].get("bytes", 0),
                        "retransmits": end.get("sum_sent", {}).get("retransmits")}
            last = out["error"]
            time.sleep(1)
        raise BenchError(f"iperf3 {' '.join(argv[1:])} in {tag} failed: {last}")

    def ping_pong(self, tag: str, host: str, port: int, count: int) -> dict:
        r = self.ns[tag].run(sys.executable, "-c", PING_PONG, host, str(port), str(count), check=False,
                             timeout=120)
        if r.returncode != 0:
            raise BenchError(f"ping-pong to {host}:{port} in {tag} failed: {r.stdout}{r.stderr}")
        return json.loads(r.stdout)


# ---------------------------------------------------------------------------- profile
IDLE_FRAME = "EpollSelector.select (selectors.py"   # the loop waiting in epoll: no work to do
DISPATCH_FRAME = "Handle._run (asyncio/events.py"     # below it: the callback doing the work


class Profile:
    """py-spy's raw output (collapsed stacks ``root;...;leaf COUNT``, frames ``name (file:line)``)
    summed per function: busy samples exclude the loop's idle wait in epoll."""

    def __init__(self, text: str):
        self.total = self.idle = 0
        self.own: collections.Counter = collections.Counter()       # function at the top of the stack
        self.inside: collections.Counter = collections.Counter()    # function anywhere in a callback
        self.lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in text.splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            count, frames = int(n), stack.split(";")
            self.total += count
            if frames[-1].startswith(IDLE_FRAME):
                self.idle += count
                continue
            leaf, lineno = _function(frames[-1])
            self.own[leaf] += count
            self.lines[leaf][lineno] += count
            start = next((i + 1 for i, f in enumerate(frames) if f.startswith(DISPATCH_FRAME)), 0)
            for f in {_function(f)[0] for f in frames[start:]}:
                self.inside[f] += count

    @property
    def busy(self) -> int:
        return self.total - self.idle

    def report(self, top: int) -> list[str]:
        busy = max(1, self.busy)
        out = ["    self% of busy  function (hottest line)"]
        for f, c in self.own.most_common(top):
            line, _ = self.lines[f].most_common(1)[0]
            out.append(f"    {100 * c / busy:5.1f}          {f.removesuffix(')')}:{line})")
        out.append("    total% of busy  function (anywhere on the stack below the event loop's dispatch)")
        for f, c in self.inside.most_common(top):
            out.append(f"    {100 * c / busy:5.1f}           {f}")
        return out


def _function(frame: str) -> tuple[str, str]:
    """``name (path/file.py:123)`` -> (``name (path/file.py)``, ``123``): a function's lines together."""
    head, sep, tail = frame.rpartition(":")
    if sep and tail.endswith(")") and tail[:-1].isdigit():
        return f"{head})", tail[:-1]
    return frame, "?"


def profile(lb: Lab, seconds: int, reverse: bool, top: int, keep: Path | None) -> list[str]:
    """One transfer with py-spy attached to both daemons; a few report lines per node (raw stacks
    copied to ``keep`` if given, e.g. for a flame graph)."""
    d = "rev" if reverse else "fwd"
    outs = {name: lb.tmp / f"pyspy-{name}-{d}.txt" for name in lb.node_pids}
    spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, seconds - 1)),
                               "--rate", "250", "--nonblocking", "--idle", "--format", "raw",
                               "--output", str(outs[name])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, pid in lb.node_pids.items()]
    try:
        res = lb.iperf("ovA", "127.0.0.1", FWD_IPERF, seconds, reverse)
        for s in spies:
            s.wait(30)
    finally:
        for s in spies:
            if s.poll() is None:
                s.kill()
                s.wait(5)
    lines = [f"  transfer {'B->A' if reverse else 'A->B'} under py-spy: {res['gbps']:.3f} Gbit/s"]
    for name, path in outs.items():
        sender = (name == "alpha") != reverse
        try:
            prof = Profile(path.read_text())
        except OSError:
            lines.append(f"  node {name}: no py-spy output")
            continue
        if not prof.total:
            lines.append(f"  node {name}: no samples")
            continue
        lines.append(f"  node {name} (data {'sender' if sender else 'receiver'}): {prof.total} samples, "
                     f"{100 * prof.idle / prof.total:.0f}% idle (waiting in epoll), {prof.busy} busy")
        lines += prof.report(top)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, keep / path.name)
    return lines


# ---------------------------------------------------------------------------- main
def median_line(label: str, values: list[float], unit: str, fmt: str = "{:.3f}") -> str:
    runs = ", ".join(fmt.format(v) for v in values)
    return f"  {label:32s} {fmt.format(statistics.median(values)):>8s} {unit}   (runs: {runs})"


def run(args: argparse.Namespace) -> None:
    lb = Lab()
    try:
        t0 = time.monotonic()
        lb.start_overlay()
        lb.start_wireguard()
        print(f"{os.cpu_count()} CPUs, Linux {os.uname().release}, Python {sys.version.split()[0]}; setup "
              f"{time.monotonic() - t0:.1f} s (overlay server + 2 nodes on a direct path; 2 wireguard-go)", flush=True)
        # path -> (namespace of the client, host, port, tunnel pids)
        paths = {
            "veth": ("ovA", OV_B, IPERF_PLAIN, []),
            "wireguard-go": ("wgA", WG_B, IPERF_PLAIN, lb.wg_pids),
            "overlay forward": ("ovA", "127.0.0.1", FWD_IPERF, list(lb.node_pids.values())),
        }
        gbps: dict[tuple[str, bool], list[float]] = collections.defaultdict(list)
        cpu: dict[tuple[str, bool], list[list[float]]] = collections.defaultdict(list)
        retrans: dict[tuple[str, bool], list] = collections.defaultdict(list)
        cpu_per_gb: dict[tuple[str, bool], list[float]] = collections.defaultdict(list)
        for i in range(args.runs):
            for name, (tag, host, port, pids) in paths.items():
                for reverse in (False, True):
                    before, t = [cpu_seconds(p) for p in pids], time.monotonic()
                    res = lb.iperf(tag, host, port, args.time, reverse)
                    dt = time.monotonic() - t
                    spent = [cpu_seconds(p) - b for p, b in zip(pids, before)]
                    cpu[(name, reverse)].append([100 * c / dt for c in spent])
                    if pids and res["bytes"]:
                        cpu_per_gb[(name, reverse)].append(sum(spent) / (res["bytes"] / 1e9))
                    gbps[(name, reverse)].append(res["gbps"])
                    retrans[(name, reverse)].append(res["retransmits"])
            print(f"throughput round {i + 1}/{args.runs} done ({time.monotonic() - t0:.0f} s)", flush=True)

        print(f"\nOne TCP stream, iperf3 -t {args.time}, receiver-side rate, median of {args.runs} interleaved runs")
        for reverse in (False, True):
            d = "B->A (-R)" if reverse else "A->B"
            for name in paths:
                print(median_line(f"{name} {d}", gbps[(name, reverse)], "Gbit/s"))
        print("\nTunnel processes' CPU during the transfers (median, % of one core; A, B)")
        for reverse in (False, True):
            d = "B->A" if reverse else "A->B"
            for name in ("wireguard-go", "overlay forward"):
                per_proc = list(zip(*cpu[(name, reverse)]))
                print(f"  {name + ' ' + d:32s} " + ", ".join(f"{statistics.median(c):.0f}%" for c in per_proc))
        print("\niperf3 sender retransmits per run")
        for reverse in (False, True):
            d = "B->A" if reverse else "A->B"
            for name in paths:
                print(f"  {name + ' ' + d:32s} {retrans[(name, reverse)]}")
        print("\nRatio overlay forward / wireguard-go (medians)")
        for reverse in (False, True):
            d = "B->A" if reverse else "A->B"
            ov = statistics.median(gbps[("overlay forward", reverse)])
            wg = statistics.median(gbps[("wireguard-go", reverse)])
            print(f"  {d:32s} {ov / wg:8.2f}x   ({ov:.3f} / {wg:.3f} Gbit/s)")

        print(f"\n1-byte TCP ping-pong, {args.rtt_count} round trips after 50 warm-up, one connection, TCP_NODELAY")
        rtt = {
            "veth": lb.ping_pong("ovA", OV_B, ECHO_PORT, args.rtt_count),
            "wireguard-go": lb.ping_pong("wgA", WG_B, ECHO_PORT, args.rtt_count),
            "overlay forward": lb.ping_pong("ovA", "127.0.0.1", FWD_ECHO, args.rtt_count),
        }
        base = rtt["veth"]["median_us"]
        for name, r in rtt.items():
            added = "" if name == "veth" else f"   added per round trip {r['median_us'] - base:8.1f} us"
            print(f"  {name:18s} median {r['median_us']:8.1f} us   p90 {r['p90_us']:8.1f} us   "
                  f"min {r['min_us']:7.1f} us{added}")

        print("\nSummary (medians): overlay forward against wireguard-go in this run")
        print("  direction   forward Gbit/s  wg-go Gbit/s  ratio   CPU s/GB both tunnel processes (forward / wg-go)")
        for reverse in (False, True):
            d = "B->A" if reverse else "A->B"
            ov = statistics.median(gbps[("overlay forward", reverse)])
            wg = statistics.median(gbps[("wireguard-go", reverse)])
            cg = [statistics.median(cpu_per_gb[(n, reverse)]) if cpu_per_gb[(n, reverse)] else float("nan")
                  for n in ("overlay forward", "wireguard-go")]
            print(f"  {d:10s} {ov:15.3f} {wg:13.3f} {ov / wg:6.2f}x   {cg[0]:.1f} / {cg[1]:.1f}")
        add_ov = rtt["overlay forward"]["median_us"] - base
        add_wg = rtt["wireguard-go"]["median_us"] - base
        print(f"  added round trip (1-byte ping-pong): {add_ov:.0f} us / {add_wg:.0f} us = "
              f"{add_ov / add_wg if add_wg > 0 else float('nan'):.2f}x wireguard-go's")

        if args.profile:
            if shutil.which("py-spy") is None:
                print("\nprofile skipped: py-spy not installed (pip install py-spy)")
            else:
                print(f"\nProfile of the overlay daemons (py-spy, 250 Hz, --nonblocking, {args.time} s transfer)")
                for reverse in (False, True):
                    for line in profile(lb, args.time, reverse, args.top, args.keep_profiles):
                        print(line)
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
    ap.add_argument("--runs", type=int, default=3, help="interleaved iperf3 runs per path and direction")
    ap.add_argument("--time", type=int, default=5, help="seconds per iperf3 transfer")
    ap.add_argument("--rtt-count", type=int, default=2000, help="round trips in the latency ping-pong")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy profile")
    ap.add_argument("--top", type=int, default=12, help="functions per node in the profile")
    ap.add_argument("--keep-profiles", type=Path, metavar="DIR", help="copy py-spy's raw stacks here")
    ap.add_argument("--deadline", type=float, default=290, help="abort (and clean up) after this many seconds")
    args = ap.parse_args()
    return guarded("bench_forward", args.deadline, lambda: run(args))


def guarded(name: str, deadline: float, body,
            needs: tuple[str, ...] = ("iperf3", "wireguard-go", "wg", "ping", "tun")) -> int:
    """Run a namespace benchmark's ``body``: skipped (0) without the tools it ``needs``, aborted
    with cleanup after ``deadline`` seconds or on SIGTERM, a failure (BenchError, a failed check)
    as one line and status 1."""
    reason = lab.lab_skip_reason(*needs)
    if reason:
        print(f"{name} skipped: {reason}")
        return 0

    def too_long(signum, frame):
        raise BenchError(f"over the {deadline:.0f} s deadline")
    signal.signal(signal.SIGALRM, too_long)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(1))  # run the cleanup when killed
    signal.alarm(int(deadline))
    try:
        body()
    except (BenchError, AssertionError) as e:
        print(f"{name} failed: {e}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput through a gateway member to a LAN host: userspace gateway beside a TUN gateway, one run.

    python benchmarks/bench_gateway.py [--rounds 3] [--size-mib 32]

Needs root (network namespaces), nft, conntrack, curl and /dev/net/tun; otherwise it says why and
exits 0 (so ``make bench`` runs everywhere). Everything runs in the real-kernel NAT lab of the
tests (``tests/support/natlab.py``), in namespaces it creates:

    site a (NAT), LAN 10.0.1.0/24:  a1 userspace gateway (--advertise-routes a3/32)
                                    a2 TUN gateway (--tun --advertise-routes a4/32)
                                    a3, a4: python -m http.server with the same file, no overlay
    site b (NAT):                   b1 TUN member (kernel curl), b2 userspace member (curl via SOCKS5)

Both routes are approved in one network; every pair is on a direct path before measuring. Each
round downloads the file once per (member, gateway) pair, interleaved, so both gateways see the
same machine load; the medians per pair are printed with every run. The figure is curl's
``size_download / time_total`` (the whole transfer, connection set-up included), and the CPU
time (user + system, from /proc) the gateway's process spent per GB downloaded, which a busy
shared machine disturbs less than the rate (a TUN gateway's forwarding itself is kernel work
outside any process, not counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_forward  # noqa: E402  (puts the repo and tests/support on sys.path)
from bench_forward import BenchError  # noqa: E402

WEB_PORT = 8080


def run(rounds: int, size_mib: int) -> None:
    import natlab
    from lab_overlay import OverlayLab
    www = Path(tempfile.mkdtemp(prefix="ovbench-www-"))
    (www / "big.bin").write_bytes(os.urandom(size_mib << 20))
    size = size_mib << 20
    with natlab.NatLab() as nl:
        a = nl.add_site("a", "port_restricted", hosts=4)
        nl.add_site("b", "port_restricted", hosts=2)
        user_web, tun_web = a.hosts[2].ip, a.hosts[3].ip
        for host, ip in (("a3", user_web), ("a4", tun_web)):
            nl.popen(host, ["python3", "-m", "http.server", str(WEB_PORT), "--bind", ip], cwd=www, label=f"web-{host}")
        ol = OverlayLab(nl, log_level="warning")
        try:
            ol.start_server()
            ugw = ol.start_node("a1", "ugw", "--advertise-routes", f"{user_web}/32")
            tgw = ol.start_node("a2", "tgw", "--tun", "--advertise-routes", f"{tun_web}/32")
            tm = ol.start_node("b1", "tunmember", "--tun")
            um = ol.start_node("b2", "member")
            ol.pair(ugw, tgw, "home", tm, um)
            ugw.ok("admin", "routes", "home", "approve", "ugw", f"{user_web}/32")
            ugw.ok("admin", "routes", "home", "approve", "tgw", f"{tun_web}/32")
            for m in (tm, um):
                for g in ("ugw", "tgw"):
                    ol.wait(lambda m=m, g=g: len((m.peer(g) or {}).get("routes") or []) == 1, 20, f"{m.name}: {g} route")
                    m.ping(g, count=10, until_direct=True)
                    ol.wait(lambda m=m, g=g: m.path_to(g, direct=True), 30, f"{m.name} direct to {g}")
            ol.wait(lambda: tgw.status()["gateway"]["stats"].get("forwarding"), 10, "TUN gateway forwarding")
            ol.wait(lambda: tun_web in nl.run("b1", ["ip", "route", "show", "dev", "ovl0"]).stdout, 10, "kernel route")
            socks = next(p["address"] for p in um.status()["proxies"] if p["kind"] == "socks5")

            def cpu(node) -> float:
                fields = Path(f"/proc/{node.proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

            def fetch(member, ip: str) -> float:
                args = ["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
                if member is um:
                    args += ["--socks5-hostname", socks]
                r = nl.run(member.host, [*args, f"http://{ip}:{WEB_PORT}/big.bin"], check=False, timeout=150)
                got, secs = (r.stdout.split() + ["0", "0"])[:2]
                if r.returncode != 0 or int(got) != size:
                    raise BenchError(f"{member.name} -> {ip}: curl {r.returncode} {r.stdout} {r.stderr.strip()}")
                return size * 8 / float(secs) / 1e6

            pairs = [("TUN member, kernel curl", tm), ("userspace member, SOCKS5", um)]
            results: dict[tuple[str, str], list[float]] = {}
            cpus: dict[tuple[str, str], list[float]] = {}
            for _ in range(rounds):
                for label, member in pairs:
                    for gw_label, gw, ip in (("userspace gateway", ugw, user_web), ("TUN gateway", tgw, tun_web)):
                        c0 = cpu(gw)
                        results.setdefault((label, gw_label), []).append(fetch(member, ip))
                        cpus.setdefault((label, gw_label), []).append((cpu(gw) - c0) / (size / 1e9))
            print(f"gateway throughput, {size_mib} MiB per download, {rounds} rounds (Mbit/s, median and runs):")
            for label, _ in pairs:
                u = results[(label, "userspace gateway")]
                t = results[(label, "TUN gateway")]
                print(f"  {label:26} userspace gateway {statistics.median(u):6.0f}  "
                      f"({', '.join(f'{x:.0f}' for x in u)})   TUN gateway {statistics.median(t):6.0f}  "
                      f"({', '.join(f'{x:.0f}' for x in t)})   ratio {statistics.median(t) / statistics.median(u):.2f}x")
                print(f"  {'':26} gateway process CPU s/GB: userspace {statistics.median(cpus[(label, 'userspace gateway')]):.1f}"
                      f", TUN {statistics.median(cpus[(label, 'TUN gateway')]):.1f}")
        finally:
            ol.close()
            for f in www.iterdir():
                f.unlink()
            www.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=32)
    args = ap.parse_args()
    return bench_forward.guarded("bench_gateway", 600, lambda: run(args.rounds, args.size_mib),
                                 needs=("conntrack", "curl", "tun"))

if __name__ == "__main__":
    sys.exit(main())

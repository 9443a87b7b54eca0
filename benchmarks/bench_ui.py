#!/usr/bin/env python3
"""`overlay ui` figures: what the web page costs the daemon, and how fast it shows.

    python benchmarks/bench_ui.py [--runs 3]

1. The daemon's RSS (a real `overlay up` with a static WireGuard peer, no server) with the page
   off (`--ui off`), on with no page open, and with a page open in headless chromium; its CPU
   time over 10 s idle with no page open (on) must not move.
2. Page weight: the bytes of index.html, app.js and app.css.
3. Time to first render: from navigation start (the secret URL, its redirect included) to the
   first status drawn (the page's `first-status` mark), median of --runs, in headless chromium
   (skipped without chromium, chromium-driver and selenium).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlay import crypto  # noqa: E402

OVERLAY = [sys.executable, "-m", "overlay"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_ticks(pid: int) -> int:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def start(home: Path, ui: str) -> subprocess.Popen:
    key = base64.b64encode(crypto.public_key(os.urandom(32))).decode()
    p = subprocess.Popen([*OVERLAY, "up", "--home", str(home), "--address", "10.9.0.1", "--socks", "off",
                          "--wg-peer", f"{key},127.0.0.1:9,10.9.0.2/32", "--ui", ui],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (home / "overlay.sock").exists():
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.05)
    time.sleep(2)   # settle
    return p


def url(home: Path) -> str:
    return subprocess.run([*OVERLAY, "ui", "--no-open", "--home", str(home)], env=ENV, capture_output=True,
                          text=True, check=True).stdout.strip()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    have_browser = bool(shutil.which("chromium") and shutil.which("chromedriver"))
    try:
        import selenium  # noqa: F401
    except ImportError:
        have_browser = False
    static = ROOT / "overlay" / "ui" / "static"
    sizes = {f.name: f.stat().st_size for f in sorted(static.iterdir())}
    print(f"page weight: {sum(sizes.values())} bytes ({', '.join(f'{k} {v}' for k, v in sizes.items())})")
    off, on, open_ = [], [], []
    renders = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            p = start(Path(tmp) / "off", "off")
            off.append(rss_kb(p.pid))
            p.send_signal(signal.SIGTERM)
            p.wait(10)
            home = Path(tmp) / "on"
            p = start(home, "127.0.0.1:0")
            on.append(rss_kb(p.pid))
            t0 = cpu_ticks(p.pid)
            time.sleep(10)
            idle = cpu_ticks(p.pid) - t0
            if have_browser:
                d = browser()
                try:
                    d.get(url(home))
                    deadline = time.monotonic() + 20
                    mark = None
                    while mark is None and time.monotonic() < deadline:
                        mark = d.execute_script(
                            "const m = performance.getEntriesByName('first-status'); return m.length ? m[0].startTime : null")
                        time.sleep(0.05)
                    renders.append(mark)
                    time.sleep(5)
                    open_.append(rss_kb(p.pid))
                finally:
                    d.quit()
            p.send_signal(signal.SIGTERM)
            p.wait(10)
            print(f"run: RSS off {off[-1]} kB, on {on[-1]} kB, page open {open_[-1] if open_ else '-'} kB; "
                  f"CPU ticks in 10 s idle with the UI on and no page: {idle}; first render "
                  f"{renders[-1] if renders else '-'} ms")
    med = statistics.median
    print(f"daemon RSS, median of {args.runs}: UI off {med(off)} kB, on (no page) {med(on)} kB "
          f"(+{med(on) - med(off)} kB)" + (f", a page open {med(open_)} kB" if open_ else ""))
    if renders:
        print(f"time to first render (navigation start -> first status drawn): median {med(renders):.0f} ms")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Control-plane figures: server memory with N connected nodes, and presence latency.

    python benchmarks/bench_control.py [--nodes 1000] [--runs 5]

1. A real `overlay server` process; N simulated nodes (in this process) connect over the real
   encrypted control channel, say hello, and stay connected as members of N/100 networks of 100
   (memberships are written to the server's database before it starts, so the figure is about
   connections, not Argon2id joins). Prints the server's RSS before and with all N connected.
2. Presence: a watcher member; a real `overlay up` daemon starts for a peer in the same network.
   Prints the time from starting the process to the watcher's "online" event, from its kill -9
   to "offline", median of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay import crypto  # noqa: E402
from overlay.control import passwords  # noqa: E402
from overlay.control.rawclient import RawClient  # noqa: E402
from overlay.server.store import Store  # noqa: E402

OVERLAY = [sys.executable, "-m", "overlay"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def prepare_db(data: Path, keys: list[bytes], per_net: int, watcher: bytes, peer_key: bytes) -> None:
    data.mkdir(parents=True)
    store = Store(data / "overlay.db")
    h = passwords.hash_password("bench")
    now = time.time()
    allk = keys + [watcher, peer_key]
    for i, k in enumerate(allk):
        store.add_node(k, f"n{i}", f"100.64.{i // 250}.{i % 250 + 1}", now)
    for n in range(0, len(keys), per_net):
        owner = keys[n]
        store.add_network(f"net{n // per_net}", h, owner, False, 0, now)
        for k in keys[n + 1:n + per_net]:
            store.add_member(f"net{n // per_net}", k, now)
    store.add_network("watch", h, watcher, False, 0, now)
    store.add_member("watch", peer_key, now)
    store.close()


async def main_async(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="overlay-bench-"))
    keys = [crypto.generate_private_key() for _ in range(args.nodes)]
    pubs = [crypto.public_key(k) for k in keys]
    watcher_key = crypto.generate_private_key()
    peer_home = tmp / "peer"
    peer_home.mkdir()
    from overlay.node.home import Home
    peer_priv = Home(peer_home).private_key()
    prepare_db(tmp / "server", pubs, 100, crypto.public_key(watcher_key), crypto.public_key(peer_priv))
    # the peer's name must match what the DB says: n{index}
    peer_name = f"n{args.nodes + 1}"

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen([*OVERLAY, "server", "--listen", f"127.0.0.1:{port}", "--data", str(tmp / "server"),
                               "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        idle = rss_kib(server.pid)
        nodes = [RawClient(f"n{i}", k) for i, k in enumerate(keys)]
        t0 = time.monotonic()
        for i in range(0, len(nodes), 50):
            await asyncio.gather(*(n.connect("127.0.0.1", port) for n in nodes[i:i + 50]))
        t_connect = time.monotonic() - t0
        await asyncio.sleep(1.0)
        loaded = rss_kib(server.pid)
        print(f"server RSS idle: {idle / 1024:.1f} MiB; with {len(nodes)} connected nodes: "
              f"{loaded / 1024:.1f} MiB ({(loaded - idle) / len(nodes):.1f} KiB per node); "
              f"connect+hello of all: {t_connect:.1f} s")

        watcher = RawClient(f"n{args.nodes}", watcher_key)
        await watcher.connect("127.0.0.1", port)
        peer_b64 = __import__("base64").b64encode(crypto.public_key(peer_priv)).decode()

        def presence(online: bool):
            return lambda m: m.get("t") == "members" and any(
                x["key"] == peer_b64 and x["online"] is online for x in m["members"])

        ups, downs = [], []
        for _ in range(args.runs):
            t_start = time.monotonic()
            fut = watcher.expect(presence(True))
            p = subprocess.Popen([*OVERLAY, "up", "--server", f"127.0.0.1:{port}", "--name", peer_name,
                                  "--home", str(peer_home), "--log-level", "warning"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.wait_for(fut, 60)
            ups.append(time.monotonic() - t_start)
            await asyncio.sleep(0.3)
            fut = watcher.expect(presence(False))
            t_kill = time.monotonic()
            p.send_signal(signal.SIGKILL)
            p.wait()
            await asyncio.wait_for(fut, 60)
            downs.append(time.monotonic() - t_kill)
            await asyncio.sleep(0.2)
        print(f"presence online: process start -> watcher sees it: median {statistics.median(ups) * 1000:.0f} ms "
              f"(min {min(ups) * 1000:.0f}, max {max(ups) * 1000:.0f}; includes Python start-up)")
        print(f"presence offline: kill -9 -> watcher sees it: median {statistics.median(downs) * 1000:.1f} ms "
              f"(max {max(downs) * 1000:.1f})")
        for n in nodes:
            n.close()
        watcher.close()
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.nodes + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

"""What one short connection through a forward costs in Python, in one process, no root needed.

    python benchmarks/bench_shortconn_cost.py [--connections 3000] [--clients 10]

The path of ``bench_shortconn.py`` without the tunnel: a client connects to a ``Forward`` (kernel
TCP on loopback), whose dialer opens a connection on userspace stack A; A's packets go straight to
stack B (a loop callback per batch: no WireGuard, no UDP), where ``Shares`` carries it to a local
asyncio service that reads 1 byte, answers 100 bytes and closes. Everything runs on one event
loop, so the figures are the per-connection costs of the forward, the stacks, the share and the
relays (plus the asyncio client and service, the same for every version):

- CPU time per connection (the whole process) and the wall-clock rate (which follows the
  machine's load; the CPU per connection much less);
- packets per connection each way;
- tasks and timers created per connection (counted in a second, shorter run: counting costs);
- garbage collections during the run and the CPU time they took, and the objects per connection
  only the collector frees (reference cycles), from a third run with the collector off.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import ipaddress
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.netstack import Stack  # noqa: E402
from overlay.netstack.asyncio_glue import StackDriver  # noqa: E402
from overlay.node.services import OverlayDialer, Shares  # noqa: E402
from overlay.node.state import Peer  # noqa: E402
from overlay.proxy.forward import Forward  # noqa: E402

A_IP, B_IP = "100.64.0.1", "100.64.0.2"
ANSWER = b"x" * 100


async def run(n: int, clients: int, mode: str) -> dict:
    loop = asyncio.get_running_loop()
    drivers: dict[str, StackDriver] = {}

    def to(name: str):
        def send(packets: list[bytes]) -> None:
            loop.call_soon(drivers[name].receive_packets, list(packets))
        return send

    a = drivers["a"] = StackDriver(Stack(A_IP, now=loop.time()), lambda p: None, send_packets=to("b"))
    b = drivers["b"] = StackDriver(Stack(B_IP, now=loop.time()), lambda p: None, send_packets=to("a"))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1):
            writer.write(ANSWER)
        writer.close()

    service = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    pool = ipaddress.ip_network("100.64.0.0/10")  # one object, as the daemon's pool (a new one empties the source memo)
    shares = Shares(pool=lambda: pool)
    shares.attach(b)
    shares.add(port, udp=False)
    peer = Peer("bravo", b"k" * 32, "azMy", B_IP, True)
    fwd = Forward(OverlayDialer(lambda h: peer if h in ("bravo", B_IP) else None, lambda: a), 0, "bravo", port)
    await fwd.start()
    fport = fwd.address[1]
    left = [0]
    times: list[float] = []

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", fport)
            writer.write(b"q")
            if await reader.read() != ANSWER:
                raise RuntimeError("wrong answer")
            writer.close()
            await writer.wait_closed()
            times.append(time.perf_counter() - t0)

    left[0] = min(200, n)   # warm-up
    await asyncio.gather(*(client() for _ in range(clients)))
    times.clear()
    left[0] = n
    made: collections.Counter = collections.Counter()
    collections_: dict[int, list] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            c = collections_[info["generation"]]
            c[0] += 1
            c[1] += time.thread_time() - started[0]

    if mode == "count":
        def factory(loop, coro, **kw):
            made["task " + getattr(coro, "__qualname__", type(coro).__name__)] += 1
            return asyncio.Task(coro, loop=loop, **kw)
        loop.set_task_factory(factory)
        real_call_at = loop.call_at

        def call_at(when, callback, *args, **kw):
            made["timer " + getattr(callback, "__qualname__", type(callback).__name__)] += 1
            return real_call_at(when, callback, *args, **kw)
        loop.call_at = call_at  # type: ignore[method-assign]
    elif mode == "garbage":
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
    else:
        gc.callbacks.append(on_gc)
    tx0 = {k: d.stack.stats["tx_packets"] for k, d in drivers.items()}
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        c1, t1 = time.process_time(), time.perf_counter()
        if mode == "count":
            loop.set_task_factory(None)
            del loop.call_at
        elif mode == "garbage":
            gc.collect()
            garbage = collections.Counter(type(o).__name__ for o in gc.garbage)
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        else:
            gc.callbacks.remove(on_gc)
        fwd.close()
        service.close()
    times.sort()
    out = {
        "rate": n / (t1 - t0), "cpu_us": 1e6 * (c1 - c0) / n,
        "p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[len(times) * 99 // 100],
        "packets": {k: (d.stack.stats["tx_packets"] - tx0[k]) / n for k, d in drivers.items()},
        "made": made, "gc": collections_,
    }
    if mode == "garbage":
        out["garbage"] = garbage
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()
    n = args.connections
    r = asyncio.run(run(n, args.clients, "time"))
    print(f"{n} short connections through a forward and a share, {args.clients} at a time, one process "
          f"(Python {sys.version.split()[0]}):")
    print(f"  CPU {r['cpu_us']:.0f} us per connection; {r['rate']:.0f} connections/s; "
          f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    print(f"  packets per connection: dialling stack {r['packets']['a']:.2f}, serving stack {r['packets']['b']:.2f}")
    gcs = "; ".join(f"generation {g}: {c} in {1e3 * t:.0f} ms" for g, (c, t) in r["gc"].items())
    gc_us = 1e6 * sum(t for _, t in r["gc"].values()) / n
    print(f"  garbage collections: {gcs} ({gc_us:.0f} us CPU per connection)")
    m = min(n, 1000)
    counted = asyncio.run(run(m, args.clients, "count"))["made"]
    print("  per connection: " + ", ".join(f"{v / m:.2f} {k}" for k, v in counted.most_common()))
    garbage = asyncio.run(run(m, args.clients, "garbage"))["garbage"]
    total = sum(garbage.values())
    print(f"  objects per connection only the collector frees: {total / m:.1f} ("
          + ", ".join(f"{v / m:.1f} {k}" for k, v in garbage.most_common(8)) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Python time per small packet on the WireGuard data path, in memory: prints medians in us.

    python benchmarks/bench_smallpkt.py [--quick] [--profile]

A 1-byte TCP segment is a 41-byte IPv4 packet; a round trip through a forward moves one each way
per node. Two levels, each a ping-pong (A sends, B receives, B answers, A receives):

- device: two ``wire.Device`` with a session: ``send`` + ``datagrams_to_send`` (tx) and
  ``receive`` + ``next_event`` (rx);
- dataplane: two ``node.DataPlane`` (static peers of each other, no server) whose UDP socket is
  replaced by a list: ``send_packets`` through the fake ``send_batch`` (tx: route, encrypt, flush,
  timer) and ``_on_datagram`` + the flush the socket calls after a batch, to the inner sink (rx:
  classify, decrypt, cryptokey routing, timer), as the socket's reader callback drives them;
  and again with ``--idle-peers`` more peers that have no traffic.

Each phase is timed on its own (perf_counter around it); the loop's own cost is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay import crypto  # noqa: E402
from overlay.node.dataplane import DataPlane  # noqa: E402
from overlay.wire import Device  # noqa: E402

A_IP, B_IP = b"\n\0\0\1", b"\n\0\0\2"
A_ADDR, B_ADDR = ("127.0.0.1", 40001), ("127.0.0.1", 40002)


def tcp_packet(src: bytes, dst: bytes, payload: bytes = b"x") -> bytes:
    """A 20-byte IPv4 header + 20-byte TCP header + payload (41 bytes for one byte)."""
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
    tcp = struct.pack(">HHIIBBHHH", 40000, 5000, 1, 1, 0x50, 0x18, 65535, 0, 0)
    return ip + tcp + payload


def bench_device(n: int) -> tuple[float, float]:
    """(tx us, rx us) per packet, medians over both directions of a device-level ping-pong."""
    a, b = Device(crypto.generate_private_key()), Device(crypto.generate_private_key())
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    a.initiate_handshake(b.public_key, 0.0)
    moved = True
    while moved:
        moved = False
        for src, dst, addr in ((a, b, A_ADDR), (b, a, B_ADDR)):
            for data, _ in src.datagrams_to_send():
                moved = True
                dst.receive(data, addr, 0.0)
    for d in (a, b):
        while d.next_event() is not None:
            pass
    ping, pong = tcp_packet(A_IP, B_IP), tcp_packet(B_IP, A_IP)
    pc = time.perf_counter
    tx = rx = 0.0
    now = 1.0
    for i in range(n):
        now += 1e-5
        for src, dst, dst_key, pkt, addr in ((a, b, b.public_key, ping, A_ADDR), (b, a, a.public_key, pong, B_ADDR)):
            t0 = pc()
            src.send(dst_key, pkt, now)
            out = src.datagrams_to_send()
            t1 = pc()
            dst.receive(out[0][0], addr, now)
            ev = dst.next_event()
            t2 = pc()
            tx += t1 - t0
            rx += t2 - t1
            assert ev is not None
    return tx / (2 * n) * 1e6, rx / (2 * n) * 1e6


async def _dataplane(n: int, idle_peers: int = 0) -> tuple[float, float]:
    a, b = DataPlane(crypto.generate_private_key()), DataPlane(crypto.generate_private_key())
    a.start()
    b.start()
    wire: list = []
    try:
        # the fake socket: datagrams land in a list, with their source address
        a.udp.send_batch = lambda items: wire.extend([(d, to, A_ADDR) for d, to in items])
        b.udp.send_batch = lambda items: wire.extend([(d, to, B_ADDR) for d, to in items])
        got: list = []
        a.inner_sink = got.extend
        b.inner_sink = got.extend
        a.add_static_peer(b.public_key, name="b", endpoint=B_ADDR, allowed_ips=["10.0.0.2/32"])
        b.add_static_peer(a.public_key, name="a", endpoint=A_ADDR, allowed_ips=["10.0.0.1/32"])
        for i in range(idle_peers):     # more peers, no traffic: what a scan of them all costs
            for dp in (a, b):
                key = crypto.public_key(crypto.generate_private_key())
                dp.add_static_peer(key, name=f"idle{i}", endpoint=("127.0.0.1", 50000 + i),
                                   allowed_ips=[f"10.1.{i // 250}.{i % 250 + 1}/32"])
        by_addr = {A_ADDR: a, B_ADDR: b}
        # handshake (and the staged packet) through the fake wire
        a.send_packets([tcp_packet(A_IP, B_IP)])
        # what the socket calls after a batch of datagrams
        on_batch = {dp: getattr(dp, "_flush_wire", dp._flush) for dp in (a, b)}
        while wire:
            data, to, frm = wire.pop(0)
            by_addr[to]._on_datagram(memoryview(data), frm)
            on_batch[by_addr[to]]()
        assert got, "no session"
        got.clear()
        ping, pong = tcp_packet(A_IP, B_IP), tcp_packet(B_IP, A_IP)
        pc = time.perf_counter
        tx = rx = 0.0
        for i in range(n):
            for src, dst, pkt, addr in ((a, b, ping, A_ADDR), (b, a, pong, B_ADDR)):
                t0 = pc()
                src.send_packets([pkt])
                t1 = pc()
                data = wire[0][0]
                wire.clear()
                t2 = pc()
                dst._on_datagram(memoryview(data), addr)
                on_batch[dst]()
                t3 = pc()
                tx += t1 - t0
                rx += t3 - t2
            if i % 256 == 0:
                await asyncio.sleep(0)    # let the loop run the timers as a node's would
                wire.clear()              # keepalives they caused
        assert len(got) >= 2 * n, len(got)
        return tx / (2 * n) * 1e6, rx / (2 * n) * 1e6
    finally:
        a.close()
        b.close()


def bench_dataplane(n: int, idle_peers: int = 0) -> tuple[float, float]:
    return asyncio.run(_dataplane(n, idle_peers))


def median_of(runs: int, fn, *args) -> tuple[float, ...]:
    results = [fn(*args) for _ in range(runs)]
    return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--runs", type=int, default=0, help="runs per figure (default 5, 3 with --quick)")
    parser.add_argument("--profile", action="store_true", help="cProfile the dataplane ping-pong instead")
    parser.add_argument("--idle-peers", type=int, default=100,
                        help="peers without traffic for the last figure (default 100)")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    n = 5000 if args.quick else 20000
    if args.profile:
        import cProfile
        import pstats
        cProfile.runctx("bench_dataplane(n)", globals(), {"n": n}, "/tmp/bench_smallpkt.prof")
        pstats.Stats("/tmp/bench_smallpkt.prof").sort_stats("tottime").print_stats(25)
        return
    import overlay
    from overlay import compiled_hotpath
    hot = f"{len(compiled_hotpath.active)} modules compiled" if compiled_hotpath.active else "pure Python"
    print(f"overlay from {Path(overlay.__file__).parent.parent} ({hot}), {runs} runs of {n} round trips")
    tx, rx = median_of(runs, bench_device, n)
    print(f"device     41-byte packet: tx {tx:5.2f} us  rx {rx:5.2f} us  (send+drain / receive+event)")
    tx, rx = median_of(runs, bench_dataplane, n)
    print(f"dataplane  41-byte packet: tx {tx:5.2f} us  rx {rx:5.2f} us  (send_packets / datagram+flush)")
    if args.idle_peers:
        tx, rx = median_of(runs, bench_dataplane, n, args.idle_peers)
        print(f"dataplane  41-byte packet: tx {tx:5.2f} us  rx {rx:5.2f} us  with {args.idle_peers} more peers, idle")


if __name__ == "__main__":
    main()

"""Throughput of the userspace TCP stack: in memory (pure CPU cost) and against Linux over TUN.

    python benchmarks/bench_netstack.py [--size-mb 50] [--runs 5] [--loss 0.0]

The TUN part needs root (a network namespace holding the TUN device; kernel 10.99.0.1, our
stack 10.99.0.2, MTU 1400); it is skipped otherwise. Prints the median MB/s of the runs for
kernel -> stack and stack -> kernel, and for two stacks linked in memory; then, for two stacks with
the node's settings (MTU 1380, 4 MiB buffers) whose segments arrive in batches of 1, 8 and 64 (what
one read of the UDP socket yields), the receiver's ACKs per 100 data segments and the CPU seconds
per 100 MB (process time: steady on a busy machine, unlike the rates).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import statistics
import struct
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from overlay.netstack import DataReceived, IncomingConnection, Stack, TcpConfig  # noqa: E402
from overlay.netstack.asyncio_glue import StackDriver  # noqa: E402

KERNEL_IP, STACK_IP, MTU = "10.99.0.1", "10.99.0.2", 1400

SENDER = r"""
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
left, chunk = int(sys.argv[3]), os.urandom(1 << 20)
while left:
    n = min(left, len(chunk)); s.sendall(chunk[:n]); left -= n
s.shutdown(socket.SHUT_WR); s.recv(1)
"""

RECEIVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1); print("ready", flush=True)
c, _ = srv.accept(); n = 0
while d := c.recv(1 << 20): n += len(d)
print(n, flush=True)
"""


def in_memory(size: int, mode: str = "plain", clock=time.perf_counter) -> float:
    """MB/s moving ``size`` bytes between two stacks in one thread (no I/O at all). ``mode``:
    "plain" (checksums computed and verified, as toward any TCP peer), "unverified" (computed,
    not verified: overlay nodes whose peer does not state no-inner-csum), "overlay" (neither:
    two overlay nodes that both state it). ``clock``: time.process_time gives MB per CPU second,
    which a loaded machine disturbs far less than the wall clock."""
    now = 0.0
    verify = mode == "plain"
    a = Stack("10.0.0.1", now=now, verify_checksums=verify,
              checksum_free={bytes([10, 0, 0, 2])} if mode == "overlay" else frozenset())
    b = Stack("10.0.0.2", now=now, verify_checksums=verify,
              checksum_free={bytes([10, 0, 0, 1])} if mode == "overlay" else frozenset())
    b.listen(80)
    ca = a.connect("10.0.0.2", 80, now)
    data = os.urandom(1 << 20)
    sent = got = 0
    cb = None
    t0 = clock()
    while got < size:
        if sent < size and ca.state.name == "ESTABLISHED":
            sent += ca.send(memoryview(data)[: min(len(data), size - sent)])
        for p in a.packets_to_send(now):
            b.receive_packet(p, now)
        for p in b.packets_to_send(now):
            a.receive_packet(p, now)
        while (e := b.next_event()) is not None:
            if isinstance(e, IncomingConnection):
                cb = e.conn
            elif isinstance(e, DataReceived):
                got += len(e.conn.recv(1 << 22))
        while a.next_event() is not None:
            pass
        now += 0.0001
        for s in (a, b):
            t = s.get_timer()
            if t is not None and t <= now:
                s.handle_timer(now)
    assert cb is not None
    return size / (clock() - t0) / 1e6


def ack_economy(size: int, batch: int) -> tuple[float, float]:
    """(ACKs per 100 data segments, CPU s per 100 MB) moving ``size`` bytes A -> B, B taking A's
    segments ``batch`` at a time and answering after each batch."""
    now = 0.0
    cfg = TcpConfig(send_buffer=4 << 20, recv_buffer=4 << 20)
    a = Stack("10.0.0.1", now=now, mtu=1380, tcp=cfg, verify_checksums=False)
    b = Stack("10.0.0.2", now=now, mtu=1380, tcp=cfg, verify_checksums=False)
    b.listen(80)
    ca = a.connect("10.0.0.2", 80, now)
    data = os.urandom(1 << 20)
    sent = got = segs = acks = 0
    t0 = time.process_time()
    while got < size:
        if sent < size and ca.state.name == "ESTABLISHED":
            sent += ca.send(memoryview(data)[: min(len(data), size - sent)])
        out = a.packets_to_send(now)
        segs += len(out)
        for i in range(0, len(out), batch):
            for p in out[i:i + batch]:
                b.receive_packet(p, now)
            while (e := b.next_event()) is not None:
                if isinstance(e, DataReceived):
                    got += len(e.conn.recv(1 << 22))
            answers = b.packets_to_send(now)
            acks += len(answers)
            for p in answers:
                a.receive_packet(p, now)
        while a.next_event() is not None:
            pass
        now += 0.0002
        for st in (a, b):
            t = st.get_timer()
            if t is not None and t <= now:
                st.handle_timer(now)
    return 100 * acks / segs, (time.process_time() - t0) * 100e6 / size


class TunBench:
    def __init__(self) -> None:
        self.ns = f"ovbench-{uuid.uuid4().hex[:6]}"
        self.ifname = f"ovb{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(self.fd, 0x400454CA, struct.pack("16sH", self.ifname.encode(), 0x0001 | 0x1000))
        for cmd in (
            ["ip", "link", "set", self.ifname, "netns", self.ns],
            ["ip", "-n", self.ns, "addr", "add", f"{KERNEL_IP}/24", "dev", self.ifname],
            ["ip", "-n", self.ns, "link", "set", self.ifname, "mtu", str(MTU), "up"],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True)

    def close(self) -> None:
        os.close(self.fd)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)

    async def run(self, direction: str, size: int, loss: float) -> float:
        loop = asyncio.get_running_loop()
        rng = random.Random()
        fd = self.fd

        def send(p: bytes) -> None:
            if loss and rng.random() < loss:
                return
            try:
                os.write(fd, p)
            except BlockingIOError:
                pass

        driver = StackDriver(Stack(STACK_IP, mtu=MTU, now=loop.time()), send)

        def readable() -> None:
            batch = []
            for _ in range(512):
                try:
                    p = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not (loss and rng.random() < loss):
                    batch.append(p)
            driver.receive_packets(batch)

        loop.add_reader(fd, readable)
        prefix = ["ip", "netns", "exec", self.ns, sys.executable, "-c"]
        try:
            if direction == "kernel->stack":
                done = loop.create_future()

                async def sink(reader, writer):
                    n = 0
                    while d := await reader.read(1 << 18):
                        n += len(d)
                    writer.close()
                    done.set_result(n)

                driver.listen(5001, sink)
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(*prefix, SENDER, STACK_IP, "5001", str(size))
                assert await asyncio.wait_for(done, 300) == size
                elapsed = time.perf_counter() - t0
                await proc.wait()
            else:
                proc = await asyncio.create_subprocess_exec(*prefix, RECEIVER, KERNEL_IP, "5002", stdout=asyncio.subprocess.PIPE)
                assert (await proc.stdout.readline()).strip() == b"ready"
                t0 = time.perf_counter()
                reader, writer = await driver.open_connection(KERNEL_IP, 5002)
                chunk = os.urandom(1 << 18)
                left = size
                while left:
                    n = min(left, len(chunk))
                    writer.write(chunk[:n])
                    await writer.drain()
                    left -= n
                writer.write_eof()
                assert int((await asyncio.wait_for(proc.stdout.readline(), 300)).strip()) == size
                elapsed = time.perf_counter() - t0
                await proc.wait()
            return size / elapsed / 1e6
        finally:
            loop.remove_reader(fd)
            driver.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loss", type=float, default=0.0, help="random drop probability each way (TUN runs)")
    args = ap.parse_args()
    size = int(args.size_mb * 1e6)
    mem = [in_memory(size) for _ in range(args.runs)]
    print(f"in-memory stack->stack     : {statistics.median(mem):7.1f} MB/s (median of {args.runs}, {args.size_mb:g} MB)")
    # what checksums cost the stacks, interleaved, per CPU second of this process
    modes = ("plain", "unverified", "overlay")
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for m in modes:
            cpu[m].append(in_memory(size, m, time.process_time))
    med = {m: statistics.median(cpu[m]) for m in modes}
    print(f"  per CPU second, medians of {args.runs} interleaved: checksums computed and verified "
          f"{med['plain']:.1f} MB/s; computed, not verified (overlay nodes before no-inner-csum) "
          f"{med['unverified']:.1f} MB/s; neither (overlay peers stating no-inner-csum) {med['overlay']:.1f} MB/s: "
          f"{med['overlay'] / med['unverified']:.2f}x")
    for batch in (1, 8, 64):
        runs = [ack_economy(min(size, 20_000_000), batch) for _ in range(3)]
        print(f"segments in batches of {batch:2d}: {statistics.median(r[0] for r in runs):5.1f} ACKs per 100 segments, "
              f"{statistics.median(r[1] for r in runs):5.2f} CPU s per 100 MB (median of 3, 20 MB)")
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        print("TUN runs skipped: need root and /dev/net/tun")
        return
    for direction in ("kernel->stack", "stack->kernel"):
        rates = []
        for _ in range(args.runs):
            bench = TunBench()
            try:
                rates.append(asyncio.run(bench.run(direction, size, args.loss)))
            finally:
                bench.close()
        print(f"{direction:15s} over TUN  : {statistics.median(rates):7.1f} MB/s (median of {args.runs}, "
              f"{args.size_mb:g} MB, loss {args.loss:g}; runs {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()

"""WireGuard core and UDP glue throughput: prints medians of several runs.

    python benchmarks/bench_wire.py [--quick]

- handshakes/s: full initiation + response + confirming keepalive between two in-memory Devices
- transport: Device.send -> datagrams_to_send -> Device.receive -> next_event at 1380 bytes,
  encrypted and unencrypted (authenticated only), with the gain in the same run
- tunnel: both Devices and UdpSockets in one process, real loopback UDP in between
- UDP over loopback: UdpSocket send_batch -> UdpSocket receive, with and without GSO/GRO
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
from overlay.io.udp import UdpSocket, bind_udp  # noqa: E402
from overlay.wire import Device  # noqa: E402

PACKET_SIZE = 1380
A_ADDR, B_ADDR = ("10.0.0.1", 1), ("10.0.0.2", 2)


def ipv4_packet(size: int) -> bytes:
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2") + bytes(size - 20)


def pair() -> tuple[Device, Device]:
    a, b = Device(crypto.generate_private_key()), Device(crypto.generate_private_key())
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    return a, b


def pump(a: Device, b: Device, now: float) -> None:
    moved = True
    while moved:
        moved = False
        for src, dst, addr in ((a, b, A_ADDR), (b, a, B_ADDR)):
            for data, _ in src.datagrams_to_send():
                moved = True
                dst.receive(data, addr, now)


def bench_handshakes(n: int) -> float:
    pairs = [pair() for _ in range(n)]
    start = time.perf_counter()
    for a, b in pairs:
        a.initiate_handshake(b.public_key, 0.0)
        pump(a, b, 0.0)
    elapsed = time.perf_counter() - start
    assert all(a.stats["handshakes_completed"] == 1 for a, _ in pairs)
    return n / elapsed


def bench_transport(n: int, plaintext: bool = False) -> tuple[float, float, float]:
    """(encrypt packets/s, decrypt packets/s, send+receive packets/s) through the Device API
    (``plaintext``: an unencrypted network's authenticated-only messages)."""
    a, b = pair()
    a.set_plaintext(b.public_key, plaintext)
    b.set_plaintext(a.public_key, plaintext)
    a.initiate_handshake(b.public_key, 0.0)
    pump(a, b, 0.0)
    while b.next_event() is not None:
        pass
    packet = ipv4_packet(PACKET_SIZE)
    key = b.public_key
    send, receive, drain, next_event = a.send, b.receive, a.datagrams_to_send, b.next_event
    start = time.perf_counter()
    for _ in range(n):
        send(key, packet, 1.0)
    out = drain()
    t_enc = time.perf_counter() - start
    start = time.perf_counter()
    for data, _ in out:
        receive(data, A_ADDR, 1.0)
        next_event()
    t_dec = time.perf_counter() - start
    assert b.stats["packets_rx"] == n, b.stats
    return n / t_enc, n / t_dec, n / (t_enc + t_dec)


async def _udp(n: int, batch: int, offload: bool) -> tuple[float, float, float]:
    """(send datagrams/s, received datagrams/s end to end, fraction lost) over loopback.

    The sender hands the loop back after each batch, as a node does between wakeups, so the
    receiver drains concurrently and the figure is the pipeline's, not a buffer-overflow race.
    """
    received = 0

    def on_datagram(view, addr) -> None:
        nonlocal received
        received += 1

    rx = UdpSocket(bind_udp("127.0.0.1", 0), on_datagram, gro=offload)
    tx = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: None, gso=offload)
    dst = rx.local_address
    items = [(bytes(PACKET_SIZE + 32), dst)] * batch
    loop = asyncio.get_running_loop()
    send_time = 0.0
    start = time.perf_counter()
    for _ in range(n // batch):
        t0 = time.perf_counter()
        tx.send_batch(items)
        send_time += time.perf_counter() - t0
        await asyncio.sleep(0)
    deadline = loop.time() + 1.0
    while received < tx.stats["tx"] and loop.time() < deadline:
        await asyncio.sleep(0)
    total = time.perf_counter() - start
    sent = tx.stats["tx"]
    tx.close()
    rx.close()
    return sent / send_time, received / total, 1 - received / sent


async def _tunnel(n: int, batch: int) -> float:
    """Inner packets/s through Device -> UdpSocket -> loopback -> UdpSocket -> Device, one loop."""
    loop = asyncio.get_running_loop()
    a, b = pair()
    delivered = 0

    def on_b(view, addr) -> None:
        b.receive(view, addr, loop.time())

    def flush_b() -> None:
        nonlocal delivered
        while b.next_event() is not None:
            delivered += 1
        ub.send_batch(b.datagrams_to_send())

    def on_a(view, addr) -> None:
        a.receive(view, addr, loop.time())

    ua = UdpSocket(bind_udp("127.0.0.1", 0), on_a, on_batch=lambda: ua.send_batch(a.datagrams_to_send()))
    ub = UdpSocket(bind_udp("127.0.0.1", 0), on_b, on_batch=flush_b)
    a.set_endpoint(b.public_key, ub.local_address)
    b.set_endpoint(a.public_key, ua.local_address)
    a.initiate_handshake(b.public_key, loop.time())
    ua.send_batch(a.datagrams_to_send())
    while not b.peer_stats(a.public_key)["has_session"] or not a.peer_stats(b.public_key)["has_session"]:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    delivered = 0
    packet = ipv4_packet(PACKET_SIZE)
    key = b.public_key
    start = time.perf_counter()
    for _ in range(n // batch):
        now = loop.time()
        for _ in range(batch):
            a.send(key, packet, now)
        ua.send_batch(a.datagrams_to_send())
        await asyncio.sleep(0)
    deadline = loop.time() + 1.0
    while delivered < n // batch * batch and loop.time() < deadline:
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    ua.close()
    ub.close()
    return delivered / elapsed


def median_of(runs: int, fn, *args):
    results = [fn(*args) for _ in range(runs)]
    if isinstance(results[0], tuple):
        return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    runs = 3 if args.quick else 5
    scale = 0.1 if args.quick else 1.0

    hs = median_of(runs, bench_handshakes, int(300 * scale) or 10)
    print(f"handshakes (init+response+keepalive, both sides): {hs:,.0f}/s")

    enc, dec, both = median_of(runs, bench_transport, int(100_000 * scale))
    bits = PACKET_SIZE * 8
    print(f"transport encrypt {PACKET_SIZE} B: {enc:,.0f} packets/s = {enc * bits / 1e9:.2f} Gbit/s")
    print(f"transport decrypt {PACKET_SIZE} B: {dec:,.0f} packets/s = {dec * bits / 1e9:.2f} Gbit/s")
    print(f"transport encrypt+decrypt (one core does both): {both:,.0f} packets/s = {both * bits / 1e9:.2f} Gbit/s")
    # unencrypted networks, measured in this same run: authenticated (Poly1305 tag), not encrypted
    penc, pdec, pboth = median_of(runs, bench_transport, int(100_000 * scale), True)
    print(f"transport unencrypted (authenticated only) send {penc:,.0f} / receive {pdec:,.0f} / both "
          f"{pboth:,.0f} packets/s = {pboth * bits / 1e9:.2f} Gbit/s: {pboth / both - 1:+.0%} against encrypted")

    tun = median_of(runs, lambda: asyncio.run(_tunnel(int(200_000 * scale), 64)))
    print(f"tunnel {PACKET_SIZE} B Device->UDP->Device, both ends in one process and core: "
          f"{tun:,.0f} packets/s = {tun * bits / 1e9:.2f} Gbit/s")

    for offload in (False, True):
        label = "GSO/GRO" if offload else "no offload"
        snd, rcv, lost = median_of(runs, lambda: asyncio.run(_udp(int(400_000 * scale), 64, offload)))
        print(f"UDP loopback {PACKET_SIZE + 32} B, {label}: send {snd:,.0f} datagrams/s; "
              f"send+receive on one loop {rcv:,.0f} datagrams/s ({lost:.1%} lost)")


if __name__ == "__main__":
    main()

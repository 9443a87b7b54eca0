"""overlay/io/udp.py over loopback: drained reads, GSO batches, GRO splitting, fallback, backlog."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from polling import wait_async

from overlay import crypto
from overlay.io.udp import SOL_UDP, UDP_SEGMENT, UdpSocket, bind_udp
from overlay.wire import Device, PacketReceived

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def until(predicate, timeout: float = 5.0) -> None:
    await wait_async(predicate, timeout, interval=0.005)


def plain_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(65536))
        except BlockingIOError:
            return out


def test_reads_are_drained_in_bounded_batches():
    async def main():
        got: list[bytes] = []
        batches: list[int] = []
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: got.append(bytes(v)),
                      on_batch=lambda: batches.append(u.stats["rx_syscalls"]), max_per_wakeup=16, gro=False)
        sender = plain_socket()
        try:
            for i in range(1000):
                sender.sendto(i.to_bytes(4, "big") * 10, u.local_address)
            await until(lambda: len(got) == 1000)
            assert got == [i.to_bytes(4, "big") * 10 for i in range(1000)]
            steps = [y - x for x, y in zip([0] + batches, batches)]
            assert max(steps) <= 16 and len(batches) >= 1000 // 16
        finally:
            u.close()
            sender.close()
    run(main())


def test_a_small_first_datagram_is_handed_on_before_the_socket_is_read_again():
    """Latency: the read that would find the socket empty comes after the batch handler, not
    before it; bulk (full-size) datagrams keep their whole batch."""
    async def main():
        got: list[int] = []
        batches: list[int] = []   # datagrams delivered so far, at each on_batch
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: got.append(len(v)),
                      on_batch=lambda: batches.append(len(got)), gro=False)
        sender = plain_socket()
        try:
            sender.sendto(b"x" * 41, u.local_address)        # a lone small one: one read, then the handler
            await until(lambda: len(batches) >= 1)
            await asyncio.sleep(0.05)
            assert batches == [1] and u.stats["rx_syscalls"] == 2  # the empty read came after the handler
            batches.clear()
            for _ in range(8):                                 # small ones queued: the first alone, then the rest
                sender.sendto(b"y" * 41, u.local_address)
            for _ in range(8):                                 # full-size ones: one batch
                sender.sendto(b"z" * 1400, u.local_address)
            await until(lambda: len(got) == 17)
            await asyncio.sleep(0.05)
            assert batches == [2, 17]
        finally:
            u.close()
            sender.close()
    run(main())


def test_gso_batch_arrives_as_separate_datagrams():
    async def main():
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: None)
        rx = plain_socket()
        try:
            dst = rx.getsockname()
            batch = [(bytes([i]) * 1400, dst) for i in range(100)] + [(b"tail", dst)]
            u.send_batch(batch)
            assert u.stats["tx"] == 101 and u.gso
            assert u.stats["gso_sends"] >= 2 and u.stats["tx_syscalls"] <= 4  # 64 + 36 + tail
            got: list[bytes] = []
            await until(lambda: got.extend(drain(rx)) or len(got) == 101)
            assert got == [d for d, _ in batch]
        finally:
            u.close()
            rx.close()
    run(main())


def test_gso_runs_split_by_address_and_size():
    async def main():
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: None)
        r1, r2 = plain_socket(), plain_socket()
        try:
            a1, a2 = r1.getsockname(), r2.getsockname()
            batch = [(b"a" * 100, a1), (b"b" * 100, a1), (b"c" * 50, a1), (b"d" * 100, a1),
                     (b"e" * 100, a2), (b"f" * 200, a2), (b"g" * 200, a2)]
            u.send_batch(batch)
            got1: list[bytes] = []
            got2: list[bytes] = []
            await until(lambda: got1.extend(drain(r1)) or got2.extend(drain(r2)) or len(got1) + len(got2) == 7)
            assert got1 == [d for d, a in batch if a == a1]
            assert got2 == [d for d, a in batch if a == a2]
        finally:
            u.close()
            r1.close()
            r2.close()
    run(main())


def test_gro_receive_splits_coalesced_segments():
    async def main():
        got: list[bytes] = []
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: got.append(bytes(v)))
        if not u.gro:
            u.close()
            pytest.skip("kernel without UDP_GRO")
        sender = plain_socket()
        try:
            segments = [bytes([i]) * 1000 for i in range(40)] + [b"short"]
            sender.sendmsg(segments, [(SOL_UDP, UDP_SEGMENT, (1000).to_bytes(2, "little"))], 0, u.local_address)
            await until(lambda: len(got) == 41)
            assert got == segments
            assert u.stats["rx_syscalls"] < u.stats["rx"]  # several datagrams per recvmsg
        finally:
            u.close()
            sender.close()
    run(main())


class RefusesGso(socket.socket):
    def sendmsg(self, *args, **kw):
        raise OSError(errno.EIO, "no GSO here")


def test_gso_refused_falls_back_to_single_sends():
    async def main():
        s = RefusesGso(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        u = UdpSocket(s, lambda v, a: None)
        rx = plain_socket()
        try:
            batch = [(bytes([i]) * 500, rx.getsockname()) for i in range(10)]
            u.send_batch(batch)
            assert not u.gso and u.stats["tx"] == 10 and u.stats["tx_syscalls"] == 10
            got: list[bytes] = []
            await until(lambda: got.extend(drain(rx)) or len(got) == 10)
            assert got == [d for d, _ in batch]
        finally:
            u.close()
            rx.close()
    run(main())


class BlocksAtFirst(socket.socket):
    blocked_calls = 3

    def sendto(self, *args):
        if self.blocked_calls:
            self.blocked_calls -= 1
            raise BlockingIOError(errno.EAGAIN, "would block")
        return super().sendto(*args)


def test_backlog_is_bounded_and_flushed_in_order_when_writable():
    async def main():
        s = BlocksAtFirst(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        u = UdpSocket(s, lambda v, a: None, backlog=5, gso=False)
        rx = plain_socket()
        try:
            dst = rx.getsockname()
            u.send_batch([(b"%d" % i, dst) for i in range(8)])  # blocks: 5 kept, 3 dropped
            assert u.stats["tx_dropped"] == 3 and u.stats["tx"] == 0
            u.send(b"late", dst)  # still backlogged: dropped, never reordered ahead
            assert u.stats["tx_dropped"] == 4
            got: list[bytes] = []
            await until(lambda: got.extend(drain(rx)) or len(got) == 5)
            assert got == [b"0", b"1", b"2", b"3", b"4"]
        finally:
            u.close()
            rx.close()
    run(main())


def test_two_devices_over_loopback_udp():
    async def main():
        loop = asyncio.get_running_loop()
        devs, socks, received = [], [], [[], []]
        for i in range(2):
            dev = Device(crypto.generate_private_key())
            devs.append(dev)

        def make(i):
            dev = devs[i]

            def on_datagram(view, addr):
                dev.receive(view, addr, loop.time())

            def flush():
                while (ev := dev.next_event()) is not None:
                    if isinstance(ev, PacketReceived):
                        received[i].append(ev.packet)
                socks[i].send_batch(dev.datagrams_to_send())
            return on_datagram, flush

        for i in range(2):
            on_datagram, flush = make(i)
            socks.append(UdpSocket(bind_udp("127.0.0.1", 0), on_datagram, on_batch=flush))
        try:
            devs[0].add_peer(devs[1].public_key, endpoint=socks[1].local_address)
            devs[1].add_peer(devs[0].public_key)  # learns a's address from its handshake
            packets = [b"\x01frame %d" % i for i in range(300)]
            devs[0].send(devs[1].public_key, packets[0], loop.time())
            socks[0].send_batch(devs[0].datagrams_to_send())
            await until(lambda: len(received[1]) == 1)
            for p in packets[1:]:
                devs[0].send(devs[1].public_key, p, loop.time())
            socks[0].send_batch(devs[0].datagrams_to_send())
            await until(lambda: len(received[1]) == 300)
            assert received[1] == packets
            devs[1].send(devs[0].public_key, b"\x01back", loop.time())
            socks[1].send_batch(devs[1].datagrams_to_send())
            await until(lambda: received[0] == [b"\x01back"])
        finally:
            for s in socks:
                s.close()
    run(main())


def test_set_handler_hands_the_socket_to_a_new_owner():
    """``set_handler``: datagrams after the call go to the new handler (how a hard-NAT attempt's
    socket passes to the node's demux once it won)."""
    async def main():
        first: list[bytes] = []
        second: list[bytes] = []
        u = UdpSocket(bind_udp("127.0.0.1", 0), lambda v, a: first.append(bytes(v)), gro=False)
        sender = plain_socket()
        try:
            sender.sendto(b"one", u.local_address)
            await until(lambda: first == [b"one"])
            u.set_handler(lambda v, a: second.append((bytes(v), a)))
            sender.sendto(b"two", u.local_address)
            await until(lambda: len(second) == 1)
            assert first == [b"one"] and second == [(b"two", sender.getsockname())]
        finally:
            u.close()
            sender.close()
    run(main())

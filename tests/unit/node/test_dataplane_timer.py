"""The data plane's one timer: the parts' timers cached between WireGuard-only flushes, and an
armed timer kept when it is early. Whatever the order of events, the armed timer is never later
than the earliest deadline of the device and every part."""

from __future__ import annotations

import asyncio
import random
import struct

from overlay import crypto
from overlay.node.dataplane import DataPlane

A_ADDR, B_ADDR = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
A_IP, B_IP = b"\n\0\0\1", b"\n\0\0\2"


def packet(src: bytes, dst: bytes) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 41, 0, 0x4000, 64, 6, 0, src, dst)
    return ip + struct.pack(">HHIIBBHHH", 40000, 5000, 1, 1, 0x50, 0x18, 65535, 0, 0) + b"x"


class Pair:
    """Two started data planes, static peers of each other, their sockets replaced by a list."""

    def __init__(self) -> None:
        self.a, self.b = DataPlane(crypto.generate_private_key()), DataPlane(crypto.generate_private_key())
        self.wire: list = []
        self.got: list = []
        for dp, me in ((self.a, A_ADDR), (self.b, B_ADDR)):
            dp.start()
            dp.udp.send_batch = lambda items, me=me: self.wire.extend((d, to, me) for d, to in items)
            dp.inner_sink = self.got.extend
        self.a.add_static_peer(self.b.public_key, name="b", endpoint=B_ADDR, allowed_ips=["10.0.0.2/32"])
        self.b.add_static_peer(self.a.public_key, name="a", endpoint=A_ADDR, allowed_ips=["10.0.0.1/32"])
        self.by_addr = {A_ADDR: self.a, B_ADDR: self.b}

    def deliver(self) -> None:
        """Everything on the wire to its data plane, as the socket does (datagram, then flush)."""
        while self.wire:
            data, to, frm = self.wire.pop(0)
            dp = self.by_addr[to]
            dp._on_datagram(memoryview(data), frm)
            dp._flush_wire()

    def session(self) -> None:
        self.a.send_packets([packet(A_IP, B_IP)])
        self.deliver()
        assert len(self.got) == 1
        self.got.clear()

    def close(self) -> None:
        self.a.close()
        self.b.close()


def device_deadline(dp: DataPlane) -> float | None:
    """The device's earliest peer deadline, computed afresh (``get_timer`` may answer earlier)."""
    times = [t for peer in dp.device._peers.values() if (t := peer.next_deadline()) is not None]
    return min(times) if times else None


def true_deadline(dp: DataPlane) -> float | None:
    """The earliest deadline of the device and every part, computed afresh."""
    s = dp.server
    paths = [e.path.get_timer() for e in dp.table.peers.values() if e.path is not None]
    times = [t for t in [device_deadline(dp), s.next_register(), s.next_probe,
                         s.probe.get_timer() if s.probe else None, dp.hardnat.timer(), dp.portmap.timer(),
                         dp.v6.timer(), dp.turn.timer(), *paths] if t is not None]
    return min(times) if times else None


def assert_never_late(dp: DataPlane) -> None:
    """Once no flush is pending (a part that asked for one is not armed before it ran)."""
    t = true_deadline(dp)
    if t is not None and not dp._flush_scheduled:
        assert dp._timer_at is not None and dp._timer_at <= max(t, dp.now()), (dp._timer_at, t)


def test_wireguard_traffic_alone_does_not_recompute_the_parts():
    async def main():
        p = Pair()
        try:
            p.session()
            calls = []
            real = p.a.hardnat.timer
            p.a.hardnat.timer = lambda: calls.append(1) or real()
            for _ in range(10):
                p.a.send_packets([packet(A_IP, B_IP)])
                p.deliver()
                p.b.send_packets([packet(B_IP, A_IP)])
                p.deliver()
            assert calls == [] and len(p.got) == 20
            p.a._flush()            # any other flush recomputes them
            assert calls == [1]
        finally:
            p.close()
    asyncio.run(main())


def test_a_part_moving_its_timer_earlier_between_wireguard_flushes_is_armed():
    """A part that asks for a flush (``schedule_flush``) is recomputed by the next flush, even a
    WireGuard-only one that runs before the scheduled one."""
    async def main():
        p = Pair()
        try:
            p.session()
            a = p.a
            soon = a.now() + 0.5
            assert a._timer_at is not None and a._timer_at > soon    # the device's keepalive, seconds away
            a.hardnat.birthday.check[b"k" * 32] = soon                # an attempt planned (as on_punch does)
            a.hardnat.schedule_flush()
            p.b.send_packets([packet(B_IP, A_IP)])
            p.deliver()                                               # a WireGuard flush on a first
            assert a._timer_at == soon
            assert_never_late(a)
        finally:
            p.close()
    asyncio.run(main())


def test_a_datagram_other_than_wireguard_marks_the_parts():
    async def main():
        p = Pair()
        try:
            p.session()
            a = p.a
            soon = a.now() + 0.25
            a.portmap.timer = lambda: soon       # as if the router's answer had moved the mapping timer
            a._on_datagram(memoryview(b"not a protocol of ours"), ("127.0.0.1", 9))
            a._flush_wire()
            assert a._timer_at == soon and a.stats["not_ours"] == 1
        finally:
            p.close()
    asyncio.run(main())


def test_an_early_timer_is_kept_and_firing_early_does_nothing_but_rearm():
    async def main():
        p = Pair()
        try:
            p.session()
            a, b = p.a, p.b
            b.send_packets([packet(B_IP, A_IP)])
            p.deliver()                  # a received data: its keepalive is due in 10 s
            a._timer.cancel()
            a._on_timer()                # (an early timer left from the handshake fires)
            handle, at = a._timer, a._timer_at
            assert device_deadline(a) == at
            a.send_packets([packet(A_IP, B_IP)])    # a answered: no keepalive needed, the deadline moves later
            assert device_deadline(a) > at
            assert a._timer is handle and a._timer_at == at      # not re-armed
            p.wire.clear()
            stats = dict(a.device.stats)
            a.now = lambda: at            # the timer fires when armed, early: nothing is due
            a._on_timer()
            assert p.wire == [] and a.device.stats == stats
            assert a._timer_at == device_deadline(a)             # re-armed at the real deadline
        finally:
            p.close()
    asyncio.run(main())


def test_the_armed_timer_is_never_late_whatever_happens():
    """Random WireGuard traffic, parts moving their timers (earlier and later, with a flush asked
    for), timers firing, in any order: after every step the armed timer is not later than the
    earliest deadline (once the flush a part asked for ran, or a WireGuard one did)."""
    async def main():
        rng = random.Random(7)
        p = Pair()
        try:
            p.session()
            a = p.a
            planned: dict[bytes, float] = a.hardnat.birthday.check
            for step in range(400):
                op = rng.randrange(6)
                if op == 0:
                    a.send_packets([packet(A_IP, B_IP)])
                elif op == 1:
                    p.b.send_packets([packet(B_IP, A_IP)])
                elif op == 2:
                    planned[bytes([step % 7]) * 32] = a.now() + rng.uniform(0.01, 30.0)
                    a.hardnat.schedule_flush()
                elif op == 3 and planned:
                    planned.pop(next(iter(planned)))
                    a.hardnat.schedule_flush()
                elif op == 4:
                    await asyncio.sleep(0)    # the scheduled flush runs
                elif op == 5 and a._timer is not None:
                    a._timer.cancel()
                    a._on_timer()             # the timer fires (early: nothing is due)
                p.deliver()
                assert_never_late(a)
            planned.clear()
        finally:
            p.close()
    asyncio.run(main())


def test_send_all_sorts_ipv4_ipv6_and_relay():
    """The flush's batch: IPv6 addresses through the IPv6 socket (also when only some are), the
    rest through the IPv4 one, relayed peers framed for the server, order kept per socket."""
    import pytest

    from overlay.node.peers import RelayAddr

    async def main():
        dp = DataPlane(crypto.generate_private_key())
        dp.start()
        try:
            if dp.v6.udp is None:
                pytest.skip("no IPv6 socket on this machine")
            v4: list = []
            v6: list = []
            dp.udp.send_batch = v4.extend
            dp.v6.udp.send_batch = v6.extend
            relayed: list = []
            dp.server.relay_send = lambda key, data, batch: relayed.append((key, data))
            dp._send_all([(b"1", ("192.0.2.1", 1)), (b"2", ("192.0.2.2", 2))])
            assert v4 == [(b"1", ("192.0.2.1", 1)), (b"2", ("192.0.2.2", 2))] and v6 == []
            v4.clear()
            dp._send_all([(b"1", ("192.0.2.1", 1)), (b"2", ("2001:db8::2", 2)), (b"3", ("192.0.2.3", 3)),
                          (b"4", RelayAddr(b"k" * 32))])
            assert v4 == [(b"1", ("192.0.2.1", 1)), (b"3", ("192.0.2.3", 3))]
            assert v6 == [(b"2", ("2001:db8::2", 2))] and relayed == [(b"k" * 32, b"4")]
        finally:
            dp.close()
    asyncio.run(main())

"""``Device.get_timer`` kept across data traffic: never later than a peer deadline, exact after
``handle_timer``, and a device driven by it behaves exactly as one that scans every peer each time."""

from __future__ import annotations

import random
import struct

from overlay.wire.device import Device
from overlay.wire.messages import MSG_TRANSPORT

KEYS = [bytes([i + 1]) * 32 for i in range(3)]
ADDRS = [("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)]


def ipv4(size: int = 41) -> bytes:
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2") + bytes(size - 20)


def exact(dev: Device) -> float | None:
    times = [t for p in dev._peers.values() if (t := p.next_deadline()) is not None]
    return min(times) if times else None


def run(seed: int, cached: bool) -> tuple[list, list]:
    """A random scenario of three devices (two of them with a persistent keepalive toward each
    other), with loss and long silences; timers fired exactly when ``get_timer`` says. Returns
    the transcript (time, sender, receiver, type, length) and every event."""
    rng = random.Random(seed)
    devs = [Device(_key(i), rng=random.Random(i)) for i in range(3)]
    for i, d in enumerate(devs):
        for j, e in enumerate(devs):
            if i != j:
                d.add_peer(e.public_key, endpoint=ADDRS[j], persistent_keepalive=7.0 if {i, j} == {1, 2} else None)
    by_addr = {ADDRS[i]: devs[i] for i in range(3)}
    now = 0.0
    wire: list = []
    events: list = []

    def get_timer(d: Device) -> float | None:
        if not cached:
            d._timer_valid = False     # the reference: a full scan every time
        t = d.get_timer()
        e = exact(d)
        assert (t is None) == (e is None) and (t is None or t <= e), (t, e)   # never late
        return t

    def pump(loss: float) -> None:
        moved = True
        while moved:
            moved = False
            for i, d in enumerate(devs):
                for data, dst in d.datagrams_to_send():
                    moved = True
                    wire.append((round(now, 9), i, dst, data[0], len(data)))
                    if rng.random() >= loss:
                        by_addr[dst].receive(data, ADDRS[i], now)
                while (ev := d.next_event()) is not None:
                    events.append((round(now, 9), i, type(ev).__name__))

    def run_until(t: float, loss: float) -> None:
        nonlocal now
        for _ in range(10_000):
            due = [x for d in devs if (x := get_timer(d)) is not None]
            if not due or min(due) > t:
                break
            now = max(now, min(due))
            for d in devs:
                x = get_timer(d)
                if x is not None and x <= now:
                    d.handle_timer(now)
                    assert not cached or d.get_timer() == exact(d)   # exact after handle_timer
            pump(loss)
        now = t

    for _ in range(300):
        loss = 0.3 if rng.random() < 0.1 else 0.0
        i, j = rng.sample(range(3), 2)
        op = rng.random()
        if op < 0.7:
            devs[i].send(devs[j].public_key, ipv4(rng.choice((41, 60, 1000))), now)
        elif op < 0.8:
            devs[i].send(devs[j].public_key, b"", now)
        elif op < 0.85:
            devs[i].initiate_handshake(devs[j].public_key, now)
        pump(loss)
        gap = rng.choice((0.001, 0.01, 0.5, 3.0, 11.0, 16.0, 130.0, 200.0))
        run_until(now + gap, loss)
    return wire, events


def _key(i: int) -> bytes:
    k = bytearray(KEYS[i])
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def test_the_kept_timer_is_never_late_and_changes_nothing():
    for seed in range(4):
        wire, events = run(seed, cached=True)
        ref_wire, ref_events = run(seed, cached=False)
        assert wire == ref_wire and events == ref_events
        assert sum(1 for w in wire if w[3] == MSG_TRANSPORT) > 200       # traffic, not just handshakes
        assert any(e[2] == "HandshakeCompleted" for e in events)


def test_data_traffic_keeps_the_timer_without_a_scan():
    a, b = Device(_key(0)), Device(_key(1))
    a.add_peer(b.public_key, endpoint=ADDRS[1])
    b.add_peer(a.public_key, endpoint=ADDRS[0])
    a.initiate_handshake(b.public_key, 0.0)
    for _ in range(3):
        for src, dst, addr in ((a, b, ADDRS[0]), (b, a, ADDRS[1])):
            for data, _ in src.datagrams_to_send():
                dst.receive(data, addr, 0.0)
    b.send(a.public_key, ipv4(), 1.0)
    for data, _ in b.datagrams_to_send():
        a.receive(data, ADDRS[1], 1.0)
    assert a.get_timer() == exact(a) == 11.0       # the keepalive a owes b
    a.send(b.public_key, ipv4(), 1.5)              # answered: no keepalive, a new-handshake deadline
    assert exact(a) > 11.0
    assert a.get_timer() == 11.0                   # kept (early): no scan of the peers
    assert len(a.datagrams_to_send()) == 1
    a.handle_timer(11.0)                           # nothing due...
    assert a.datagrams_to_send() == []
    assert a.get_timer() == exact(a) > 11.0        # ...and exact again

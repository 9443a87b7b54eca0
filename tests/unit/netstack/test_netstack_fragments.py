"""IPv4 fragmentation on send and bounded reassembly on receive, sans-I/O with an injected clock.

Datagrams larger than the MTU (default iperf3 -u sends 32 KB ones, DNS with EDNS ~1.2-4 KB) must
arrive whole, in any fragment order, and a flood of fragments that never complete must cost a
bounded amount of memory for a bounded time. Linux interop is in test_netstack_interop.py.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.netstack import DatagramReceived, Stack, wire
from overlay.netstack.fragments import FRAGMENT_OVERHEAD, Reassembler

A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A_IP, B_IP = "10.0.0.1", "10.0.0.2"
MTU = 1380


def frags(payload: bytes, mtu: int = MTU, ident: int = 7, proto: int = wire.PROTO_UDP, src: bytes = A) -> list[wire.Ipv4Packet]:
    return [wire.parse_ipv4(p) for p in wire.build_ipv4_fragments(src, B, proto, payload, mtu, ident=ident)]


def raw_fragment(offset: int, data: bytes, more: bool, ident: int = 9, src: bytes = A) -> wire.Ipv4Packet:
    """A fragment built by hand (offset in bytes), as a peer could send it."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident, offset >> 3 | (0x2000 if more else 0),
                                64, wire.PROTO_UDP, 0, src, B))
    hdr[10:12] = struct.pack("!H", wire.checksum(bytes(hdr)))
    return wire.parse_ipv4(bytes(hdr) + data)


# ---------------------------------------------------------------- sending


def test_fragments_fit_the_mtu_and_follow_rfc791():
    payload = wire.build_udp(A, B, 5000, 5201, random.Random(1).randbytes(32768))
    pkts = wire.build_ipv4_fragments(A, B, wire.PROTO_UDP, payload, MTU, ident=0x1234)
    assert len(pkts) == -(-len(payload) // 1360) == 25
    offset = 0
    for i, p in enumerate(pkts):
        assert len(p) <= MTU
        assert wire.checksum_ok(p[:20])
        ip = wire.parse_ipv4(p)
        assert ip.ident == 0x1234 and ip.frag_offset == offset
        flags = struct.unpack_from("!H", p, 6)[0]
        assert not flags & wire.FLAG_DF  # a fragment never carries DF
        assert ip.more_fragments == (i < len(pkts) - 1)
        if ip.more_fragments:
            assert len(ip.payload) % 8 == 0
        offset += len(ip.payload)
    assert offset == len(payload)


def test_small_payload_is_one_packet_with_df():
    (p,) = wire.build_ipv4_fragments(A, B, wire.PROTO_UDP, b"x" * (MTU - 20), MTU, ident=3)
    assert p == wire.build_ipv4(A, B, wire.PROTO_UDP, b"x" * (MTU - 20), ident=3)
    assert wire.parse_ipv4(p).frag == 0


def test_fragment_header_fields_parse():
    ip = raw_fragment(1480, b"y" * 16, more=True)
    assert ip.frag and ip.frag_offset == 1480 and ip.more_fragments


# ---------------------------------------------------------------- reassembly


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1381, 65507 - 8), seed=st.integers(0, 2**32), mtu=st.sampled_from([576, 1280, 1380, 9000]))
def test_reassembly_in_any_order_gives_the_datagram(size, seed, mtu):
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    parts = frags(payload, mtu)
    rng.shuffle(parts)
    r = Reassembler()
    results = [r.add(p, 0.0) for p in parts]
    assert all(x is None for x in results[:-1])
    whole = results[-1]
    assert whole is not None and whole.payload == payload and whole.frag == 0 and whole.proto == wire.PROTO_UDP
    assert len(r) == 0 and r.bytes == 0


def test_exact_duplicate_is_ignored_and_datagram_completes():
    payload = bytes(range(256)) * 20
    parts = frags(payload)
    r = Reassembler()
    assert r.add(parts[0], 0) is None
    assert r.add(parts[0], 0) is None
    assert r.stats["duplicate"] == 1
    out = [r.add(p, 0) for p in parts[1:]]
    assert out[-1].payload == payload


@pytest.mark.parametrize(
    "second",
    [
        (8, 16, True),  # starts inside the first
        (0, 8, True),  # same start, different length
        (16, 8, False),  # final fragment ending inside data already held
    ],
)
def test_overlapping_fragment_drops_the_whole_datagram(second):
    r = Reassembler()
    assert r.add(raw_fragment(0, b"a" * 24, more=True), 0) is None
    off, n, more = second
    assert r.add(raw_fragment(off, b"b" * n, more=more), 0) is None
    assert r.stats["overlap"] == 1 and len(r) == 0 and r.bytes == 0
    # the rest of the original datagram no longer completes anything
    assert r.add(raw_fragment(24, b"c" * 8, more=False), 0) is None
    assert len(r) == 1


def test_second_final_fragment_and_data_beyond_the_end_drop_the_datagram():
    r = Reassembler()
    r.add(raw_fragment(16, b"z" * 8, more=False), 0)
    r.add(raw_fragment(32, b"z" * 8, more=True), 0)  # beyond the known end
    assert r.stats["overlap"] == 1 and len(r) == 0


@pytest.mark.parametrize("offset, size, more", [(0, 13, True), (65528, 16, False), (8, 0, True)])
def test_invalid_fragments_are_dropped(offset, size, more):
    r = Reassembler()
    assert r.add(raw_fragment(offset, b"q" * size, more=more), 0) is None
    assert r.stats["invalid"] == 1 and len(r) == 0 and r.bytes == 0


def test_incomplete_datagram_times_out_after_30_seconds():
    r = Reassembler()
    parts = frags(bytes(5000))
    r.add(parts[0], 100.0)
    assert r.next_deadline() == 130.0
    r.add(parts[1], 129.0)  # later fragments do not extend the deadline (as in Linux)
    r.expire(129.99)
    assert len(r) == 1
    r.expire(130.0)
    assert len(r) == 0 and r.bytes == 0 and r.stats["timeout"] == 1 and r.next_deadline() is None
    # the missing fragments arriving late start a new datagram that never completes
    assert all(r.add(p, 131.0) is None for p in parts[2:])


def test_fragment_flood_is_bounded_in_datagrams_and_bytes():
    r = Reassembler(max_datagrams=64, max_bytes=256 * 1024)
    rng = random.Random(5)
    for i in range(5000):
        # first fragments of datagrams that never complete, from many idents
        r.add(raw_fragment(0, rng.randbytes(1360), more=True, ident=i & 0xFFFF), i * 0.001)
        assert len(r) <= 64 and r.bytes <= 256 * 1024
    assert r.stats["evicted"] >= 5000 - 64
    # a legitimate datagram still gets through afterwards
    payload = rng.randbytes(20000)
    out = [r.add(p, 10.0) for p in frags(payload, ident=0xBEEF)]
    assert out[-1] is not None and out[-1].payload == payload


def test_tiny_fragments_are_charged_and_capped_per_datagram():
    r = Reassembler(max_fragments=128)
    for k in range(200):
        r.add(raw_fragment(k * 16, b"t" * 8, more=True), 0)  # gaps between: never completes
    assert r.stats["too_many_fragments"] == 1
    assert r.bytes <= 128 * (8 + FRAGMENT_OVERHEAD)


def test_oldest_is_evicted_when_bytes_run_out_for_a_growing_datagram():
    r = Reassembler(max_bytes=3 * (1360 + FRAGMENT_OVERHEAD))
    old = frags(bytes(4000), ident=1)
    new = frags(bytes(4000), ident=2)
    r.add(old[0], 0)
    r.add(new[0], 1)
    r.add(new[1], 2)
    assert r.add(new[2], 3) is not None  # completing the new one evicts the old one
    assert r.stats["evicted"] == 1 and len(r) == 0


# ---------------------------------------------------------------- through the stack


def exchange(a: Stack, b: Stack, now: float, shuffle: random.Random | None = None) -> list[bytes]:
    """Deliver a's output to b and b's to a until quiet; returns every packet a sent."""
    sent = []
    for _ in range(10):
        pa, pb = a.packets_to_send(now), b.packets_to_send(now)
        if not pa and not pb:
            break
        sent += pa
        if shuffle:
            shuffle.shuffle(pa)
        for p in pa:
            b.receive_packet(p, now)
        for p in pb:
            a.receive_packet(p, now)
    return sent


@pytest.mark.parametrize("size", [1353, 2000, 32768, 65507])
def test_large_udp_datagrams_cross_between_stacks(size):
    a, b = Stack(A_IP, mtu=MTU, now=0), Stack(B_IP, mtu=MTU, now=0)
    ua, ub = a.udp_bind(40000), b.udp_bind(5201)
    data = random.Random(size).randbytes(size)
    ua.sendto(data, (B_IP, 5201))
    sent = exchange(a, b, 1.0, random.Random(2))
    assert all(len(p) <= MTU for p in sent) and len(sent) > 1
    ev = b.next_event()
    assert isinstance(ev, DatagramReceived) and ev.data == data and ev.addr == (A_IP, 40000)
    ub.sendto(data[::-1], (A_IP, 40000))
    exchange(b, a, 1.0)
    ev = a.next_event()
    assert isinstance(ev, DatagramReceived) and ev.data == data[::-1]
    assert b.stats["tx_fragmented"] == 1 and b.fragments.stats["reassembled"] == 1


def test_large_ping_is_answered_with_fragments():
    b = Stack(B_IP, mtu=MTU, now=0)
    data = bytes(range(256)) * 12
    echo = wire.build_icmp(wire.ICMP_ECHO_REQUEST, 0, 0x0042_0001, data)
    for p in wire.build_ipv4_fragments(A, B, wire.PROTO_ICMP, echo, MTU, ident=77):
        b.receive_packet(p, 0)
    out = b.packets_to_send(0)
    assert len(out) == 3 and all(len(p) <= MTU for p in out)
    r = Reassembler()
    whole = [r.add(wire.parse_ipv4(p), 0) for p in out][-1]
    reply = wire.parse_icmp(whole.payload)
    assert (reply.type, reply.rest, reply.data) == (wire.ICMP_ECHO_REPLY, 0x0042_0001, data)


def test_stack_timer_expires_stale_fragments():
    b = Stack(B_IP, mtu=MTU, now=0)
    b.udp_bind(5201)
    b.receive_packet(wire.build_ipv4_fragments(A, B, wire.PROTO_UDP, wire.build_udp(A, B, 1, 5201, bytes(3000)), MTU)[0], 5.0)
    assert b.get_timer() == 35.0
    b.handle_timer(35.0)
    assert len(b.fragments) == 0 and b.get_timer() is None and b.fragments.stats["timeout"] == 1

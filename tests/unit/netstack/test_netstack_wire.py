"""Wire formats: checksums against an independent RFC 1071 implementation and known packets,
parse/emit round trips, and rejection of malformed input (never anything but WireError)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.netstack import wire
from overlay.netstack.wire import WireError

A = bytes([10, 0, 0, 1])
B = bytes([10, 0, 0, 2])


def rfc1071(data: bytes) -> int:
    """Textbook checksum: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.binary(min_size=1, max_size=3000))
def test_checksum_matches_rfc1071(data):
    if not any(data):
        return  # all-zero data never occurs in a header with a pseudo-header (documented corner)
    assert wire.checksum(data) == rfc1071(data)


def test_checksum_negative_zero_corner():
    # words summing to exactly 0xFFFF: the one's complement sum is 0xFFFF, so the checksum is 0
    data = b"\xff\x00\x00\xff"
    assert rfc1071(data) == 0
    assert wire.checksum(data) == 0
    # and a block including its checksum verifies
    assert wire.checksum_ok(data + b"\x00\x00")


def test_known_ipv4_header_checksum():
    # the classic example header (Wikipedia "IPv4 header checksum"): checksum 0xB861
    payload = bytes(0x73 - 20)
    pkt = wire.build_ipv4(bytes([192, 168, 0, 1]), bytes([192, 168, 0, 199]), 17, payload, ttl=64, ident=0)
    assert pkt[:20].hex() == "45000073000040004011b861c0a80001c0a800c7"
    parsed = wire.parse_ipv4(pkt)
    assert parsed.src == bytes([192, 168, 0, 1]) and parsed.proto == 17 and parsed.payload == payload


def test_linux_style_syn_parses_and_reemits_identically():
    # a SYN laid out as Linux sends it (10.99.0.1:41234 -> 10.99.0.2:5001): MSS 1360, SACK-permitted,
    # timestamps, NOP, window scale 7; checksum computed independently with rfc1071(). (Real kernel
    # packets are exercised by test_netstack_interop.)
    opts = bytes.fromhex("02040550" "0402" "080a0001e24000000000" "01" "030307")
    hdr = struct.pack("!HHIIBBHHH", 41234, 5001, 0x1A2B3C4D, 0, (20 + len(opts)) << 2, wire.SYN, 64240, 0, 0) + opts
    src, dst = bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2])
    pseudo = src + dst + bytes([0, 6]) + struct.pack("!H", len(hdr))
    csum = rfc1071(pseudo + hdr)
    seg = hdr[:16] + struct.pack("!H", csum) + hdr[18:]
    ip = wire.build_ipv4(src, dst, wire.PROTO_TCP, seg)
    parsed = wire.parse_tcp(wire.parse_ipv4(ip))
    assert parsed.flags == wire.SYN and parsed.seq == 0x1A2B3C4D
    assert parsed.mss == 1360 and parsed.sack_permitted and parsed.wscale == 7
    assert parsed.timestamp == (0x1E240, 0)
    # our emitter produces the same bytes
    ours = wire.build_tcp(src, dst, 41234, 5001, 0x1A2B3C4D, 0, wire.SYN, 64240, b"", opts)
    assert ours == seg


@given(
    sport=st.integers(1, 65535),
    dport=st.integers(1, 65535),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0x3F),
    window=st.integers(0, 65535),
    data=st.binary(max_size=1500),
    mss=st.none() | st.integers(0, 65535),
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    sack=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=3),
)
def test_tcp_round_trip(sport, dport, seq, ack, flags, window, data, mss, wscale, sack_permitted, sack):
    opts = wire.tcp_options(mss=mss, wscale=wscale, sack_permitted=sack_permitted, sack=sack)
    seg = wire.build_tcp(A, B, sport, dport, seq, ack, flags, window, data, opts)
    assert rfc1071(A + B + bytes([0, 6]) + struct.pack("!H", len(seg)) + seg) == 0
    p = wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, seg)))
    assert (p.src_port, p.dst_port, p.seq, p.ack, p.flags, p.window, p.data) == (sport, dport, seq, ack, flags, window, data)
    assert (p.mss, p.wscale, p.sack_permitted, p.sack) == (mss, wscale, sack_permitted, tuple(sack))


@given(data=st.binary(max_size=1400), sport=st.integers(1, 65535), dport=st.integers(1, 65535))
def test_udp_round_trip(data, sport, dport):
    dg = wire.build_udp(A, B, sport, dport, data)
    assert struct.unpack_from("!H", dg, 6)[0] != 0  # checksum always present
    p = wire.parse_udp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_UDP, dg)))
    assert (p.src_port, p.dst_port, p.data) == (sport, dport, data)


def test_udp_zero_checksum_is_sent_as_ffff():
    # search a payload whose checksum computes to 0: it must go out as 0xFFFF and still verify
    for i in range(1 << 17):
        data = struct.pack("!I", i)
        hdr = struct.pack("!HHHH", 1000, 2000, 12, 0)
        pseudo = A + B + bytes([0, 17]) + struct.pack("!H", 12)
        if rfc1071(pseudo + hdr + data) == 0:
            break
    else:
        pytest.fail("no zero-checksum payload found")
    dg = wire.build_udp(A, B, 1000, 2000, data)
    assert dg[6:8] == b"\xff\xff"
    assert wire.parse_udp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_UDP, dg))).data == data


def test_icmp_echo_round_trip():
    msg = wire.build_icmp(wire.ICMP_ECHO_REQUEST, 0, 0x1234_0007, b"ping payload")
    assert rfc1071(msg) == 0
    p = wire.parse_icmp(msg)
    assert (p.type, p.code, p.rest, p.data) == (8, 0, 0x12340007, b"ping payload")


def _ip(payload=b"x" * 8, proto=wire.PROTO_UDP) -> bytearray:
    return bytearray(wire.build_ipv4(A, B, proto, payload))


def _fix_ip_checksum(pkt: bytearray) -> bytearray:
    ihl = (pkt[0] & 15) * 4
    pkt[10:12] = b"\0\0"
    pkt[10:12] = struct.pack("!H", wire.checksum(bytes(pkt[:ihl])))
    return pkt


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p[:19], "too short"),
        (lambda p: _fix_ip_checksum(bytearray([0x65]) + p[1:]), "not IPv4"),
        (lambda p: _fix_ip_checksum(bytearray([0x44]) + p[1:]), "header length"),
        (lambda p: _fix_ip_checksum(p[:2] + struct.pack("!H", 200) + p[4:]), "total length"),
        (lambda p: p[:10] + bytes([p[10] ^ 1]) + p[11:], "checksum"),
    ],
)
def test_ipv4_rejects(mutate, reason):
    with pytest.raises(WireError, match=reason):
        wire.parse_ipv4(bytes(mutate(_ip())))


def test_ipv4_options_skipped_and_padding_ignored():
    payload = wire.build_udp(A, B, 1, 2, b"hello")
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(payload), 1, 0, 64, 17, 0, A, B)) + b"\x01\x01\x01\x00"
    pkt = bytes(_fix_ip_checksum(hdr)) + payload + b"\0\0\0"  # trailing link-layer padding
    p = wire.parse_ipv4(pkt)
    assert p.payload == payload
    assert wire.parse_udp(p).data == b"hello"


@pytest.mark.parametrize(
    "opts, reason",
    [
        (b"\x02\x03\x05\x00", "MSS"),
        (b"\x03\x02\x00\x00", "window scale"),
        (b"\x05\x0b" + bytes(9) + b"\x00", "SACK"),
        (b"\x08\x04\x00\x00", "timestamp"),
        (b"\x01\x01\x01\x02", "truncated"),
        (b"\x02\x00\x00\x00", "bad length"),
        (b"\x02\x08\x00\x00", "bad length"),
    ],
)
def test_tcp_option_rejects(opts, reason):
    seg = wire.build_tcp(A, B, 1, 2, 0, 0, wire.SYN, 0, b"", opts)
    with pytest.raises(WireError, match=reason):
        wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, seg)))


def test_tcp_bad_checksum_and_offset():
    seg = bytearray(wire.build_tcp(A, B, 1, 2, 0, 0, wire.ACK, 0, b"data"))
    bad = bytes(seg[:20]) + b"datb"
    with pytest.raises(WireError, match="checksum"):
        wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, bad)))
    seg[12] = 15 << 4  # data offset 60 > segment length
    seg[16:18] = b"\0\0"
    seg[16:18] = struct.pack("!H", wire.checksum(bytes(seg), wire.pseudo_header_sum(A, B, 6, len(seg))))
    with pytest.raises(WireError, match="data offset"):
        wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, bytes(seg))))


def test_window_scale_clamped_to_14():
    seg = wire.build_tcp(A, B, 1, 2, 0, 0, wire.SYN, 0, b"", b"\x03\x03\x1e\x00")
    assert wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, seg))).wscale == 14


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from([wire.PROTO_TCP, wire.PROTO_UDP, wire.PROTO_ICMP]))
def test_garbage_payloads_only_raise_wire_error(garbage, proto):
    ip = wire.parse_ipv4(wire.build_ipv4(A, B, proto, garbage))
    try:
        if proto == wire.PROTO_TCP:
            wire.parse_tcp(ip)
        elif proto == wire.PROTO_UDP:
            wire.parse_udp(ip)
        else:
            wire.parse_icmp(ip.payload)
    except WireError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_garbage_options_only_raise_wire_error(opts):
    opts = opts[: 40 - 40 % 4] if len(opts) >= 4 else b""
    seg = wire.build_tcp(A, B, 1, 2, 0, 0, wire.ACK, 0, b"", opts[: len(opts) - len(opts) % 4])
    try:
        wire.parse_tcp(wire.parse_ipv4(wire.build_ipv4(A, B, wire.PROTO_TCP, seg)))
    except WireError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_garbage_ip_only_raises_wire_error(garbage):
    try:
        wire.parse_ipv4(garbage)
    except WireError:
        pass


@given(
    seq=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0x3F),
    data=st.binary(max_size=1400),
    ident=st.integers(0, 65535),
    sack=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4),
)
def test_combined_ipv4_tcp_builder_matches_layered_builders(seq, flags, data, ident, sack):
    opts = wire.tcp_options(sack=sack)
    layered = wire.build_ipv4(A, B, wire.PROTO_TCP, wire.build_tcp(A, B, 80, 443, seq, 7, flags, 999, data, opts), ident=ident)
    assert wire.build_ipv4_tcp(A, B, ident, 80, 443, seq, 7, flags, 999, data, opts) == layered

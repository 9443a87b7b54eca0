"""Packet formats: IPv4, ICMP echo / unreachable, UDP and TCP (with options), parse and emit.

The smoltcp ``wire`` layer in Python: parsers turn bytes into small immutable records and
raise :class:`WireError` (with the reason) on anything malformed, truncated or unsupported;
emitters build complete packets with correct checksums (TCP and UDP ones may be left 0 for a
peer that never verifies them). Nothing here keeps state.

Checksums use the RFC 1071 one's-complement sum computed as ``int.from_bytes(data) % 0xFFFF``
(2**16 is 1 modulo 0xFFFF, so the remainder is the folded sum; CPython does it at C speed).
The only corner: the remainder is 0 both for all-zero data and for a one's-complement sum of
0xFFFF ("negative zero"), which is what any non-zero data summing to a multiple of 0xFFFF gives.
A packet with a pseudo-header is never all zero, so there we treat remainder 0 as 0xFFFF.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import NamedTuple

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8
TCP_HEADER_LEN = 20
DEFAULT_TTL = 64
MAX_IPV4_LEN = 65535
MAX_UDP_PAYLOAD = MAX_IPV4_LEN - IPV4_HEADER_LEN - UDP_HEADER_LEN  # 65507, as on Linux

# IPv4 flags and fragment offset (the 16-bit field after the identification)
FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF  # in units of 8 bytes

# TCP flags
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

# TCP option kinds
OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8
MAX_SACK_BLOCKS = 4  # 4 * 8 + 2 bytes fit in the 40-byte option space without timestamps

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_NET_UNREACHABLE = 0   # codes under ICMP_DEST_UNREACHABLE
ICMP_HOST_UNREACHABLE = 1
ICMP_PORT_UNREACHABLE = 3
ICMP_HOST_PROHIBITED = 10
ICMP_ADMIN_PROHIBITED = 13

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHHH")
_IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PSEUDO = struct.Struct("!4s4sxBH")


class WireError(ValueError):
    """A packet is malformed, truncated, fails its checksum or uses something we do not support."""


def checksum_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement 16-bit sum of ``data`` (odd length padded with a zero byte), 0..0xFFFE.

    The value is additive: sums of consecutive even-length parts add up (then ``% 0xFFFF``).
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    # 2**16 == 1 (mod 0xFFFF): folding the high half onto the low half keeps the residue and makes
    # the final big-number division much cheaper for packet-sized inputs (~25% faster at 1340 B)
    bits = n.bit_length()
    while bits > 2048:
        h = (bits >> 5) << 4  # about half, a multiple of 16
        n = (n >> h) + (n & ((1 << h) - 1))
        bits = n.bit_length()
    return n % 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum to put in a header whose checksum field is zero in ``data``."""
    s = (checksum_sum(data) + initial) % 0xFFFF
    # s == 0 means the true sum is 0xFFFF (data is never all zero here), whose complement is 0
    return 0xFFFF - s if s else 0


def checksum_ok(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if ``data`` (checksum field included) plus ``initial`` sums to 0xFFFF."""
    return (checksum_sum(data) + initial) % 0xFFFF == 0


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Checksum sum of the IPv4 pseudo-header used by TCP and UDP."""
    return checksum_sum(_PSEUDO.pack(src, dst, proto, length))


@functools.lru_cache(maxsize=1024)   # per connection and per SYN: a few addresses over and over
def ip_to_bytes(ip: str) -> bytes:
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError as e:
        raise ValueError(f"not an IPv4 address: {ip!r}") from e


@functools.lru_cache(maxsize=1024)
def ip_to_str(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


# ---------------------------------------------------------------- IPv4


class Ipv4Packet(NamedTuple):
    src: bytes  # 4 bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    payload: bytes  # the transport segment (options stripped, padding beyond total length cut)
    header: bytes  # the IP header as received (ICMP errors quote it)
    frag: int = 0  # More Fragments flag and offset (DF masked out); non-zero: a fragment

    @property
    def frag_offset(self) -> int:
        """Offset of this fragment's payload in the datagram, in bytes."""
        return (self.frag & FRAG_OFFSET_MASK) * 8

    @property
    def more_fragments(self) -> bool:
        return bool(self.frag & FLAG_MF)


def parse_ipv4(packet: bytes, verify: bool = True) -> Ipv4Packet:
    """Parse and verify one IPv4 packet. A fragment parses like any packet with ``frag`` non-zero
    (the stack reassembles it, see ``fragments.py``); options are skipped; trailing link padding is
    ignored. ``verify=False`` skips the checksum (packets authenticated by the tunnel, as Linux
    WireGuard does)."""
    n = len(packet)
    if n < IPV4_HEADER_LEN:
        raise WireError(f"IPv4 packet too short ({n} bytes)")
    vihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    if vihl >> 4 != 4:
        raise WireError(f"not IPv4 (version {vihl >> 4})")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_HEADER_LEN:
        raise WireError(f"IPv4 header length {ihl} < 20")
    if total < ihl or total > n:
        raise WireError(f"IPv4 total length {total} inconsistent (header {ihl}, have {n})")
    header = packet[:ihl]
    if verify and not checksum_ok(header):
        raise WireError("IPv4 header checksum mismatch")
    frag &= FLAG_MF | FRAG_OFFSET_MASK
    if frag:
        return Ipv4Packet(src, dst, proto, ttl, ident, packet[ihl:total], header, frag)
    return Ipv4Packet(src, dst, proto, ttl, ident, packet[ihl:total], header)


def build_ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = DEFAULT_TTL, ident: int = 0) -> bytes:
    """An IPv4 packet with the Don't Fragment bit (path MTU is the tunnel's, known in advance)."""
    total = IPV4_HEADER_LEN + len(payload)
    if total > MAX_IPV4_LEN:
        raise WireError(f"IPv4 packet too long ({total} bytes)")
    hdr = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, FLAG_DF, ttl, proto, 0, src, dst)
    c = checksum(hdr)
    return hdr[:10] + _U16.pack(c) + hdr[12:] + payload


def build_ipv4_fragments(
    src: bytes, dst: bytes, proto: int, payload: bytes, mtu: int, *, ttl: int = DEFAULT_TTL, ident: int = 0
) -> list[bytes]:
    """``payload`` as IPv4 packets of at most ``mtu`` bytes: one packet with DF if it fits (same as
    :func:`build_ipv4`), else RFC 791 fragments without DF, every one but the last carrying a
    multiple of 8 payload bytes (what Linux sends for a large UDP datagram over a TUN device)."""
    if IPV4_HEADER_LEN + len(payload) <= mtu:
        return [build_ipv4(src, dst, proto, payload, ttl=ttl, ident=ident)]
    total = IPV4_HEADER_LEN + len(payload)
    if total > MAX_IPV4_LEN:
        raise WireError(f"IPv4 packet too long ({total} bytes)")
    step = (mtu - IPV4_HEADER_LEN) & ~7
    if step <= 0:
        raise WireError(f"MTU {mtu} too small to fragment")
    out = []
    mv = memoryview(payload)
    n = len(payload)
    ident &= 0xFFFF
    for off in range(0, n, step):
        end = min(off + step, n)
        frag = off >> 3 | (FLAG_MF if end < n else 0)
        hdr = bytearray(_IPV4.pack(0x45, 0, IPV4_HEADER_LEN + end - off, ident, frag, ttl, proto, 0, src, dst))
        _U16.pack_into(hdr, 10, checksum(hdr))
        out.append(b"".join((hdr, mv[off:end])))
    mv.release()
    return out


# ---------------------------------------------------------------- ICMP


class IcmpMessage(NamedTuple):
    type: int
    code: int
    rest: int  # the 4 bytes after the checksum (echo: ident << 16 | seq)
    data: bytes


def parse_icmp(payload: bytes, verify: bool = True) -> IcmpMessage:
    if len(payload) < 8:
        raise WireError(f"ICMP message too short ({len(payload)} bytes)")
    if verify and not checksum_ok(payload):
        raise WireError("ICMP checksum mismatch")
    t, code, _c, hi, lo = _ICMP.unpack_from(payload)
    return IcmpMessage(t, code, hi << 16 | lo, payload[8:])


def build_icmp(type_: int, code: int, rest: int, data: bytes) -> bytes:
    body = _ICMP.pack(type_, code, 0, rest >> 16 & 0xFFFF, rest & 0xFFFF) + data
    return body[:2] + _U16.pack(checksum(body)) + body[4:]


def build_port_unreachable(original: Ipv4Packet) -> bytes:
    """ICMP payload for "port unreachable": the offending header plus its first 8 payload bytes."""
    return build_icmp(ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, 0, original.header + original.payload[:8])


# ---------------------------------------------------------------- UDP


class UdpDatagram(NamedTuple):
    src_port: int
    dst_port: int
    data: bytes


def parse_udp(ip: Ipv4Packet, verify: bool = True) -> UdpDatagram:
    seg = ip.payload
    if len(seg) < UDP_HEADER_LEN:
        raise WireError(f"UDP datagram too short ({len(seg)} bytes)")
    sport, dport, length, csum = _UDP.unpack_from(seg)
    if length < UDP_HEADER_LEN or length > len(seg):
        raise WireError(f"UDP length {length} inconsistent (have {len(seg)})")
    seg = seg[:length]
    if verify and csum and not checksum_ok(seg, pseudo_header_sum(ip.src, ip.dst, PROTO_UDP, length)):
        raise WireError("UDP checksum mismatch")
    if dport == 0:
        raise WireError("UDP destination port 0")
    return UdpDatagram(sport, dport, seg[UDP_HEADER_LEN:])


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, data: bytes, l4_checksum: bool = True) -> bytes:
    """A UDP datagram (transport part only) with its checksum; 0 is sent as 0xFFFF (RFC 768).
    ``l4_checksum=False``: the field stays 0 ("no checksum", which IPv4 allows)."""
    length = UDP_HEADER_LEN + len(data)
    hdr = _UDP.pack(sport, dport, length, 0)
    if not l4_checksum:
        return hdr + data
    c = checksum(hdr + data, pseudo_header_sum(src, dst, PROTO_UDP, length))
    return hdr[:6] + _U16.pack(c or 0xFFFF) + data


# ---------------------------------------------------------------- TCP


class TcpSegment(NamedTuple):
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int  # raw 16-bit field, unscaled
    data: bytes
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: data plus one each for SYN and FIN."""
        return len(self.data) + (self.flags & SYN != 0) + (self.flags & FIN != 0)


def _parse_tcp_options(opts: bytes, seg: dict) -> None:
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise WireError("TCP option truncated")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise WireError(f"TCP option {kind} has bad length {length}")
        body = opts[i + 2 : i + length]
        if kind == OPT_MSS:
            if length != 4:
                raise WireError("TCP MSS option length != 4")
            seg["mss"] = _U16.unpack(body)[0]
        elif kind == OPT_WSCALE:
            if length != 3:
                raise WireError("TCP window scale option length != 3")
            seg["wscale"] = min(body[0], 14)  # RFC 7323: larger shifts are treated as 14
        elif kind == OPT_SACK_PERMITTED:
            if length != 2:
                raise WireError("TCP SACK-permitted option length != 2")
            seg["sack_permitted"] = True
        elif kind == OPT_SACK:
            if (length - 2) % 8 or length == 2:
                raise WireError(f"TCP SACK option length {length} invalid")
            seg["sack"] = tuple(struct.unpack_from("!II", body, j) for j in range(0, length - 2, 8))
        elif kind == OPT_TIMESTAMP:
            if length != 10:
                raise WireError("TCP timestamp option length != 10")
            seg["timestamp"] = struct.unpack("!II", body)
        i += length


def parse_tcp(ip: Ipv4Packet, verify: bool = True) -> TcpSegment:
    seg = ip.payload
    n = len(seg)
    if n < TCP_HEADER_LEN:
        raise WireError(f"TCP segment too short ({n} bytes)")
    if verify and not checksum_ok(seg, pseudo_header_sum(ip.src, ip.dst, PROTO_TCP, n)):
        raise WireError("TCP checksum mismatch")
    sport, dport, seq, ack, off, flags, window, _c, _urg = _TCP.unpack_from(seg)
    hlen = (off >> 4) * 4
    if hlen < TCP_HEADER_LEN or hlen > n:
        raise WireError(f"TCP data offset {hlen} invalid (segment {n} bytes)")
    if sport == 0 or dport == 0:
        raise WireError("TCP port 0")
    if hlen == TCP_HEADER_LEN:
        return TcpSegment(sport, dport, seq, ack, flags & 0x3F, window, seg[hlen:])
    opts: dict = {}
    _parse_tcp_options(seg[TCP_HEADER_LEN:hlen], opts)
    return TcpSegment(sport, dport, seq, ack, flags & 0x3F, window, seg[hlen:], **opts)


def tcp_options(
    *,
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    sack: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    timestamp: tuple[int, int] | None = None,
) -> bytes:
    """Encode TCP options, NOP-padded to a multiple of 4 bytes (at most 40)."""
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack_permitted:
        out += b"\x01\x01\x04\x02"
    if timestamp is not None:
        out += b"\x01\x01" + struct.pack("!BBII", OPT_TIMESTAMP, 10, *timestamp)
    if wscale is not None:
        out += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    if sack:
        blocks = list(sack)[:MAX_SACK_BLOCKS]
        out += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks))
        for left, right in blocks:
            out += _U32.pack(left & 0xFFFFFFFF) + _U32.pack(right & 0xFFFFFFFF)
    if len(out) % 4:
        out += b"\x01" * (4 - len(out) % 4)
    if len(out) > 40:
        raise WireError(f"TCP options too long ({len(out)} bytes)")
    return bytes(out)


def build_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    data: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """A TCP segment (transport part only) with its checksum. ``options`` from :func:`tcp_options`."""
    hlen = TCP_HEADER_LEN + len(options)
    hdr = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, hlen << 2, flags, window, 0, 0) + options
    length = hlen + len(data)
    # header is even-length, so the sums of the parts add up
    s = checksum_sum(hdr) + checksum_sum(data) + pseudo_header_sum(src, dst, PROTO_TCP, length)
    s %= 0xFFFF
    c = 0xFFFF - s if s else 0
    return hdr[:16] + _U16.pack(c) + hdr[18:] + data


def build_ipv4_tcp(
    src: bytes,
    dst: bytes,
    ident: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    data: bytes | bytearray = b"",
    options: bytes = b"",
    l4_checksum: bool = True,
) -> bytes:
    """IPv4 + TCP in one go (the stack's per-segment hot path): one header pack, both checksums
    patched in place, one copy of the payload. Same bytes as ``build_ipv4(build_tcp(...))``.
    ``l4_checksum=False``: the TCP checksum is left 0 (for a peer that never verifies it: the
    tunnel authenticates every packet); the IPv4 header checksum is always computed."""
    hlen = TCP_HEADER_LEN + len(options)
    total = IPV4_HEADER_LEN + hlen + len(data)
    if total > MAX_IPV4_LEN:
        raise WireError(f"IPv4 packet too long ({total} bytes)")
    hdr = bytearray(
        _IPV4_TCP.pack(
            0x45, 0, total, ident & 0xFFFF, 0x4000, DEFAULT_TTL, PROTO_TCP, 0, src, dst,
            sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, hlen << 2, flags, window, 0, 0,
        )
    )
    if options:
        hdr += options
    mv = memoryview(hdr)
    _U16.pack_into(hdr, 10, checksum(mv[:IPV4_HEADER_LEN]))
    if not l4_checksum:
        mv.release()
        return b"".join((hdr, data))
    s = checksum_sum(mv[IPV4_HEADER_LEN:]) + checksum_sum(data) + pseudo_header_sum(src, dst, PROTO_TCP, hlen + len(data))
    s %= 0xFFFF
    _U16.pack_into(hdr, IPV4_HEADER_LEN + 16, 0xFFFF - s if s else 0)
    mv.release()
    return b"".join((hdr, data))


# the IPv4 + TCP header of one connection: the version, TOS, flags (DF), TTL and protocol, the
# addresses and ports are fixed; 12 bytes of them pass as one field
_TCP_TEMPLATE = struct.Struct("!HHH4sH12sIIBBHH2x")
_DF_TTL_TCP = _U16.pack(FLAG_DF) + bytes((DEFAULT_TTL, PROTO_TCP))


class TcpTemplate:
    """The IPv4 + TCP headers of one connection, for its per-segment hot path: what never changes
    (addresses, ports, the constant fields) is packed and summed once, so a segment costs one
    header pack, the checksums patched from precomputed partial sums, and one join with the
    payload. ``build`` gives the same bytes as :func:`build_ipv4_tcp` with the same arguments."""

    __slots__ = ("_fixed", "_ip_sum", "_tcp_sum")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int):
        self._fixed = src + dst + _U16.pack(sport) + _U16.pack(dport)
        addr_sum = checksum_sum(src + dst)
        # IPv4: version/IHL/TOS, flags/fragment offset, TTL/protocol, addresses (checksum 0)
        self._ip_sum = 0x4500 + FLAG_DF + (DEFAULT_TTL << 8 | PROTO_TCP) + addr_sum
        # TCP: the pseudo header's addresses and protocol, the ports
        self._tcp_sum = addr_sum + PROTO_TCP + sport + dport

    def build(
        self,
        ident: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        data: bytes | bytearray = b"",
        options: bytes = b"",
        l4_checksum: bool = True,
    ) -> bytes:
        """One packet: ``ident`` is the IPv4 identification (16 bits), ``window`` the raw field."""
        hlen = TCP_HEADER_LEN + len(options)
        tcp_len = hlen + len(data)
        total = IPV4_HEADER_LEN + tcp_len
        if total > MAX_IPV4_LEN:
            raise WireError(f"IPv4 packet too long ({total} bytes)")
        ident &= 0xFFFF
        s = (self._ip_sum + total + ident) % 0xFFFF
        ip_csum = 0xFFFF - s if s else 0
        seq &= 0xFFFFFFFF
        ack &= 0xFFFFFFFF
        if l4_checksum:
            # the header as 16-bit words (sums congruent modulo 0xFFFF add up, see checksum_sum)
            s = (self._tcp_sum + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
                 + (hlen << 10 | flags) + window)
            if options:
                s += checksum_sum(options)
            if data:
                s += checksum_sum(data)
            s %= 0xFFFF
            tcp_csum = 0xFFFF - s if s else 0
        else:
            tcp_csum = 0
        hdr = _TCP_TEMPLATE.pack(0x4500, total, ident, _DF_TTL_TCP, ip_csum, self._fixed, seq, ack, hlen << 2,
                                 flags, window, tcp_csum)
        if options:
            return b"".join((hdr, options, data))
        return hdr + data if data else hdr

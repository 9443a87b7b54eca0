"""TUN/TAP offloads, sans-I/O: coalescing TCP runs on write, and segmenting the kernel's super-packets.

With ``IFF_VNET_HDR`` every read and write of the device carries a 10-byte ``virtio_net_hdr``.

- ``coalesce`` (always used with the header): the IPv4 packets a batch from the tunnel delivers
  become writes for the device. Consecutive in-order TCP data segments of one flow (same
  addresses, ports, ACK, options, only ACK/PSH flags, equal sizes but the last) are joined into
  one super-packet that the kernel takes through its GRO path, as if a NIC had coalesced it: one
  write and one pass through the receiving TCP stack instead of up to 64. Everything else is
  written alone, flagged DATA_VALID (which Linux's TUN driver ignores: it verifies such packets),
  except TCP segments to our own address (``local``) that came without a checksum (a peer that
  knows we take that: ``no-inner-csum``): those go as CHECKSUM_PARTIAL, like the runs. That
  is what made wireguard-go several times faster in 2023, and it pays here too
  (benchmarks/bench_tun.py).
- ``split``: a read buffer -> MTU-sized IPv4 packets for the tunnel. With ``TUNSETOFFLOAD``
  TSO4/CSUM the kernel hands over TCP super-packets of up to 64 KB; they become ``gso_size``
  segments with their own IP length, ID and checksum, sequence number, flags (FIN/PSH only on the
  last, CWR only on the first) and full TCP checksum, and a partial checksum is completed. Peers
  see ordinary packets. Measured here, the per-segment checksums in Python cost more CPU than the
  kernel saves, so the node asks for no read offloads by default (``OVERLAY_TUN_OFFLOAD=tso``
  turns them on for measurement) and ``split`` then only strips the header.

Checksums use the folded-sum helpers of the userspace stack (``overlay.netstack.wire``).
"""

from __future__ import annotations

import struct

from overlay.netstack.wire import checksum, pseudo_header_sum

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size          # 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO_ECN = 0x08
TSO_FLAGS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN

HDR_VALID = VNET_HDR.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)
"""Header for a packet written as is: its checksum needs no verification."""
MAX_COALESCED = 65535 - 100   # IPv4 total length, with room for the headers
MAX_SEGMENTS = 64

_U16 = struct.Struct(">H")
_ZERO16 = b"\0\0"
_U32 = struct.Struct(">I")
_TCP_ACK, _TCP_PSH, _TCP_FIN, _TCP_CWR = 0x10, 0x08, 0x01, 0x80
_DATA_FLAGS = (_TCP_ACK, _TCP_ACK | _TCP_PSH)


class OffloadStats:
    __slots__ = ("split_in", "split_out", "coalesced_in", "coalesced_out", "dropped")

    def __init__(self) -> None:
        self.split_in = self.split_out = self.coalesced_in = self.coalesced_out = self.dropped = 0


def split(buf: bytes | memoryview, out: list[bytes], stats: OffloadStats | None = None, l2: int = 0) -> None:
    """Append the IP packets carried by one read (virtio_net_hdr + packet) to ``out``. ``l2``:
    the length of a link-layer header before the IP packet (14 on TAP), left out of the output."""
    if len(buf) <= VNET_HDR_LEN + l2:
        return
    flags, gso, _, gso_size, cstart, coff = VNET_HDR.unpack_from(buf)
    split_packet(flags, gso, gso_size, cstart - l2, coff, memoryview(buf)[VNET_HDR_LEN + l2:], out, stats)


def split_packet(flags: int, gso: int, gso_size: int, cstart: int, coff: int, pkt, out: list[bytes],
                 stats: OffloadStats | None = None) -> None:
    gso &= ~GSO_ECN
    if gso == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            out.append(bytes(pkt))
            return
        pkt = bytearray(pkt)
        field = cstart + coff
        if field + 2 > len(pkt) or not 0 <= cstart < len(pkt):
            if stats:
                stats.dropped += 1
            return
        c = checksum(memoryview(pkt)[cstart:])   # the field holds the pseudo-header sum already
        if c == 0 and pkt[9] == 17:
            c = 0xFFFF   # UDP sends a zero checksum as all ones
        _U16.pack_into(pkt, field, c)
        out.append(bytes(pkt))
        return
    if gso != GSO_TCPV4 or len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6 or not gso_size:
        if stats:
            stats.dropped += 1
        return
    ihl = (pkt[0] & 0x0F) * 4
    thl = (pkt[ihl + 12] >> 4) * 4
    hl = ihl + thl
    if hl > len(pkt):
        if stats:
            stats.dropped += 1
        return
    head = bytearray(pkt[:hl])
    seq0 = _U32.unpack_from(head, ihl + 4)[0]
    ipid0 = _U16.unpack_from(head, 4)[0]
    flags0 = head[ihl + 13]
    src, dst = bytes(head[12:16]), bytes(head[16:20])
    data = memoryview(pkt)[hl:]
    n = len(data)
    i = 0
    if stats:
        stats.split_in += 1
    for off in range(0, n, gso_size):
        chunk = data[off:off + gso_size]
        clen = len(chunk)
        f = flags0
        if off + gso_size < n:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            f &= ~_TCP_CWR
        _U16.pack_into(head, 2, hl + clen)
        _U16.pack_into(head, 4, (ipid0 + i) & 0xFFFF)
        head[10] = head[11] = 0
        _U16.pack_into(head, 10, checksum(head[:ihl]))
        _U32.pack_into(head, ihl + 4, (seq0 + off) & 0xFFFFFFFF)
        head[ihl + 13] = f
        head[ihl + 16] = head[ihl + 17] = 0
        seg = head + chunk
        _U16.pack_into(seg, ihl + 16, checksum(memoryview(seg)[ihl:], pseudo_header_sum(src, dst, 6, thl + clen)))
        out.append(bytes(seg))
        i += 1
    if stats:
        stats.split_out += i


def coalesce(packets: list[bytes], stats: OffloadStats | None = None, l2: int = 0,
             local: bytes | None = None) -> list[tuple]:
    """Writes for a batch of IPv4 packets, TCP data runs coalesced: each a tuple (virtio_net_hdr,
    IP packet or its headers, payload pieces...) for one ``writev``. ``l2``: the length of the
    link-layer header the caller writes after the virtio header (14 on TAP). ``local``: our own
    address (TUN): a TCP segment to it that is not coalesced and whose checksum field is 0 (a
    peer left it to the tunnel) is written with a partial checksum (``partial_tcp``), which the
    kernel takes as checksummed (and computes should the packet go on elsewhere); one with a
    checksum is written as it came (no extra work for the common kernel-to-kernel case)."""
    out: list = []            # (header, packet) or a _Run being built
    runs: dict[bytes, _Run] = {}
    for p in packets:
        n = len(p)
        if n >= 40 and p[0] == 0x45 and p[9] == 6 and not (p[6] & 0x3F or p[7]):
            thl = (p[32] >> 4) * 4
            hl = 20 + thl
            plen = ((p[2] << 8) | p[3]) - hl
            flags = p[33]
            key = p[12:24]
            run = runs.get(key)
            if plen > 0 and flags in _DATA_FLAGS and hl <= n:
                if run is not None and run.take(p, hl, plen):
                    if flags & _TCP_PSH:
                        del runs[key]
                    continue
                run = _Run(p, hl, plen)
                out.append(run)
                if flags & _TCP_PSH:
                    runs.pop(key, None)
                else:
                    runs[key] = run
                continue
            if run is not None:
                del runs[key]     # anything else of the flow goes after the run, in order
            if local is not None and p[36:38] == _ZERO16 and p[16:20] == local and hl <= n:
                out.append(partial_tcp(p, hl))
                continue
        out.append((HDR_VALID, p))
    writes = []
    for item in out:
        if type(item) is tuple:
            writes.append(item)
        else:
            writes.append(item.finish(stats, l2, local))
    return writes


def partial_tcp(p: bytes, hl: int) -> tuple:
    """A write of one unfragmented IPv4 TCP segment (20-byte IP header, ``hl`` bytes of headers)
    as CHECKSUM_PARTIAL: the checksum field replaced by the pseudo-header sum (the TCP checksum a
    peer sent is not used), start and offset in the virtio_net_hdr. Linux then treats it as
    checksummed on local delivery and completes the checksum if it forwards the packet."""
    total = (p[2] << 8) | p[3]
    psum = pseudo_header_sum(p[12:16], p[16:20], 6, total - 20)
    mv = memoryview(p)
    return VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, hl, 0, 20, 16), mv[:36], _U16.pack(psum), mv[38:]


class _Run:
    """Consecutive TCP data segments of one flow, to be written as one super-packet."""

    __slots__ = ("first", "hl", "size", "next_seq", "parts", "total", "psh")

    def __init__(self, p: bytes, hl: int, plen: int):
        self.first, self.hl, self.size = p, hl, plen
        self.next_seq = (_U32.unpack_from(p, 24)[0] + plen) & 0xFFFFFFFF
        self.parts = [p]
        self.total = plen
        self.psh = bool(p[33] & _TCP_PSH)

    def take(self, p: bytes, hl: int, plen: int) -> bool:
        first = self.first
        if (hl != self.hl or plen > self.size or self.total + plen > MAX_COALESCED
                or len(self.parts) >= MAX_SEGMENTS or self.psh
                or _U32.unpack_from(p, 24)[0] != self.next_seq
                or p[28:32] != first[28:32]          # ACK number
                or p[1] != first[1] or p[6] != first[6] or p[8] != first[8]   # TOS, DF, TTL
                or p[40:hl] != first[40:self.hl]):   # TCP options (timestamps) must match
            return False
        if self.total != self.size * len(self.parts):
            return False   # a short segment ended the run
        self.parts.append(p)
        self.total += plen
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        self.psh = bool(p[33] & _TCP_PSH)
        return True

    def finish(self, stats: OffloadStats | None, l2: int = 0, local: bytes | None = None) -> tuple:
        first = self.first
        if len(self.parts) == 1:
            if local is not None and first[36:38] == _ZERO16 and first[16:20] == local:
                return partial_tcp(first, self.hl)
            return HDR_VALID, first
        hl = self.hl
        head = bytearray(first[:hl])
        total = hl + self.total
        _U16.pack_into(head, 2, total)
        head[10] = head[11] = 0
        _U16.pack_into(head, 10, checksum(head[:20]))
        if self.psh:
            head[33] |= _TCP_PSH
        # partial checksum: the pseudo-header sum, completed by the kernel (or never, GRO path)
        _U16.pack_into(head, 36, pseudo_header_sum(bytes(head[12:16]), bytes(head[16:20]), 6, total - 20))
        if stats:
            stats.coalesced_in += len(self.parts)
            stats.coalesced_out += 1
        # the pieces go to writev as they are: no 64 KB join
        return (VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, hl + l2, self.size, 20 + l2, 16), bytes(head),
                *(memoryview(p)[hl:] for p in self.parts))

"""A TUN node takes checksum-free TCP from peers: segments to its own address whose checksum
field is 0 are written as CHECKSUM_PARTIAL (``offload.coalesce(local=...)``); those with a
checksum go as before (the kernel verifies it).

``offload.split`` completes a partial checksum exactly as the kernel does when it forwards such a
packet, so a packet that comes out of it valid is one the kernel would have sent on valid."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from overlay.iface import offload
from tests.unit.iface.test_iface_units import DST, SRC, tcp_segment, udp, valid


def _zeroed(p: bytes) -> bytes:
    """The segment as a peer leaving the checksum to the tunnel sends it: field 0."""
    return p[:36] + b"\0\0" + p[38:]


def _as_kernel(write: tuple) -> tuple[int, bytes]:
    """(virtio flags, the packet the kernel ends up with: a partial checksum completed)."""
    hdr, *parts = write
    out: list = []
    offload.split(hdr + b"".join(parts), out)
    (pkt,) = out
    return offload.VNET_HDR.unpack(hdr)[0], pkt


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=1400), flags=st.sampled_from([0x02, 0x12, 0x10, 0x11, 0x14, 0x18]),
       seq=st.integers(0, 2**32 - 1), zero=st.booleans())
def test_segments_to_us_are_written_partial_and_complete_to_a_valid_checksum(payload, flags, seq, zero):
    p = tcp_segment(seq, payload if flags & 0x02 == 0 else b"", flags=flags)
    sent = _zeroed(p) if zero else p
    (write,) = offload.coalesce([sent], local=DST)
    fl, pkt = _as_kernel(write)
    hdr = offload.VNET_HDR.unpack(write[0])
    if zero or p[36:38] == b"\0\0":   # (a computed checksum may be 0 too: then partial is right as well)
        assert fl == offload.F_NEEDS_CSUM and hdr[4:] == (20, 16) and hdr[1] == offload.GSO_NONE
    else:
        assert write[0] == offload.HDR_VALID and b"".join(write[1:]) == p   # written as it came
    assert valid(pkt) and pkt == p


def test_only_tcp_to_our_address_is_written_partial():
    seg = _zeroed(tcp_segment(1000, b"x" * 100, flags=0x18))
    to_other = _zeroed(tcp_segment(1000, b"y" * 100, flags=0x18))
    to_other = to_other[:16] + SRC + to_other[20:]     # routed on (a gateway's LAN): left as it came
    dgram = udp(SRC, DST, 1, 2)
    writes = offload.coalesce([seg, to_other, dgram], local=DST)
    assert [offload.VNET_HDR.unpack(w[0])[0] for w in writes] == [offload.F_NEEDS_CSUM, offload.F_DATA_VALID,
                                                                 offload.F_DATA_VALID]
    assert b"".join(writes[1][1:]) == to_other and b"".join(writes[2][1:]) == dgram
    # without ``local`` (TAP, or a node that does not take checksum-free packets): as before
    assert all(w[0] == offload.HDR_VALID for w in offload.coalesce([seg, dgram]))


def test_runs_still_coalesce_and_a_lone_data_segment_is_partial():
    run = [_zeroed(tcp_segment(1000 + i * 100, bytes([i]) * 100)) for i in range(4)]
    writes = offload.coalesce(run + [_zeroed(tcp_segment(5000, b"z" * 50, flags=0x18))], local=DST)
    assert [offload.VNET_HDR.unpack(w[0])[1] for w in writes] == [offload.GSO_TCPV4, offload.GSO_NONE]
    segs: list = []
    offload.split(writes[0][0] + b"".join(writes[0][1:]), segs)
    assert len(segs) == 4 and all(valid(s) for s in segs)
    fl, pkt = _as_kernel(writes[1])
    assert fl == offload.F_NEEDS_CSUM and valid(pkt)
    assert struct.unpack_from("!I", pkt, 24)[0] == 5000

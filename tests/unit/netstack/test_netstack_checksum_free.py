"""Checksum-free TCP and UDP toward the destinations in ``Stack.checksum_free`` only.

Overlay peers that accept it (the ``no-inner-csum`` capability) get TCP segments and UDP
datagrams with the checksum field 0; every other destination gets valid checksums, and the IPv4
header checksum is always valid (a kernel always checks it).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.netstack import DatagramReceived, Stack, TcpConfig
from overlay.netstack import wire
from tests.unit.netstack.test_netstack_tcp import A_IP, B_IP, Pair, drain

C_IP = "10.0.0.3"


def _pair(free_a=(), free_b=(), verify_b: bool = True, verify_a: bool = True) -> Pair:
    p = Pair(TcpConfig(recv_buffer=1 << 20, send_buffer=1 << 20))
    p.a = Stack(A_IP, now=p.now, tcp=p.a.tcp_config, verify_checksums=verify_a,
                checksum_free={wire.ip_to_bytes(x) for x in free_a})
    p.b = Stack(B_IP, now=p.now, tcp=p.b.tcp_config, verify_checksums=verify_b,
                checksum_free={wire.ip_to_bytes(x) for x in free_b})
    return p


def _l4_checksum(pkt: bytes) -> tuple[int, bool]:
    """(the TCP/UDP checksum field, whether the packet's transport checksum verifies); asserts the
    IPv4 header checksum is valid."""
    ip = wire.parse_ipv4(pkt)              # verifies the IPv4 header checksum
    off = 16 if ip.proto == wire.PROTO_TCP else 6
    field = int.from_bytes(ip.payload[off:off + 2], "big")
    ok = wire.checksum_ok(ip.payload, wire.pseudo_header_sum(ip.src, ip.dst, ip.proto, len(ip.payload)))
    return field, ok


def test_tcp_segments_to_a_capable_peer_carry_no_checksum_and_the_transfer_works():
    p = _pair(free_a=[B_IP], verify_b=False)     # B: a node that said it accepts them
    ca, cb = p.connect()
    data = random.Random(1).randbytes(200_000)
    ca.send(data)
    got = bytearray()
    p.run(5.0, until=lambda: (got.extend(drain(cb)), len(got) >= len(data))[1])
    assert bytes(got) == data
    ca.close()
    cb.close()
    p.run(1.0)
    a_pkts = [pkt for _, n, pkt in p.log if n == "a"]
    b_pkts = [pkt for _, n, pkt in p.log if n == "b"]
    assert len(a_pkts) > 100
    assert all(_l4_checksum(pkt)[0] == 0 for pkt in a_pkts)          # SYN, data, ACKs, FIN: none computed
    assert all(_l4_checksum(pkt)[1] for pkt in b_pkts)               # B -> A: A is not capable
    assert p.a.stats["tx_no_checksum"] == len(a_pkts) and p.b.stats["tx_no_checksum"] == 0
    assert p.a.stats["malformed"] == 0 and p.b.stats["malformed"] == 0


def test_only_listed_destinations_get_checksum_free_packets():
    p = _pair(free_a=[C_IP])                     # someone else is capable; B verifies as a kernel would
    ca, cb = p.connect()
    ca.send(b"x" * 5000)
    p.run(1.0)
    assert drain(cb) == b"x" * 5000
    assert p.a.stats["tx_no_checksum"] == 0 and p.b.stats["malformed"] == 0
    assert all(_l4_checksum(pkt)[1] for _, _, pkt in p.log)
    # UDP: to the capable address the field is 0 ("no checksum"), to anyone else it is computed
    sock = p.a.udp_bind(5000)
    sock.sendto(b"hello", (C_IP, 53))
    sock.sendto(b"hello", (B_IP, 53))
    to_c, to_b = [pkt for pkt in p.a.packets_to_send(p.now) if pkt[9] == wire.PROTO_UDP]
    assert _l4_checksum(to_c)[0] == 0 and wire.parse_ipv4(to_c).dst == wire.ip_to_bytes(C_IP)
    field, ok = _l4_checksum(to_b)
    assert field != 0 and ok


def test_udp_without_checksum_is_received_by_any_stack():
    """A zero UDP checksum means "none" in IPv4: even a verifying stack takes the datagram."""
    p = _pair(free_a=[B_IP])
    rx = p.b.udp_bind(53)
    p.a.udp_bind(5000).sendto(b"query", (B_IP, 53))
    (pkt,) = p.a.packets_to_send(p.now)
    assert _l4_checksum(pkt)[0] == 0
    p.b.receive_packet(pkt, p.now)
    ev = p.b.next_event()
    assert isinstance(ev, DatagramReceived) and ev.socket is rx and ev.data == b"query"


def test_the_set_is_read_per_packet_and_may_change_in_place():
    free: set[bytes] = set()
    a = Stack(A_IP, now=0.0, checksum_free=free)
    sock = a.udp_bind(5000)
    sock.sendto(b"1", (B_IP, 9))
    free.add(wire.ip_to_bytes(B_IP))             # the peer's capability arrived
    sock.sendto(b"2", (B_IP, 9))
    free.clear()                                 # it went offline
    sock.sendto(b"3", (B_IP, 9))
    fields = [_l4_checksum(pkt)[0] for pkt in a.packets_to_send(0.0)]
    assert fields[0] != 0 and fields[1] == 0 and fields[2] != 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 60_000), loss=st.sampled_from([0.0, 0.05, 0.2]))
def test_property_checksum_free_both_ways_under_loss_and_reordering(seed, size, loss):
    """Two capable nodes (neither computes nor verifies): data arrives intact through loss,
    duplication and reordering, and only packets without a computed checksum were sent."""
    rng = random.Random(seed)
    p = _pair(free_a=[B_IP], free_b=[A_IP], verify_a=False, verify_b=False)
    p.latency = 0.002

    def drop(pkt: bytes, who: str) -> bool:
        r = rng.random()
        if r < loss:
            return True
        if r < loss + 0.15:   # delivered late (reordered), and for a third of those twice
            for _ in range(2 if r < loss + 0.05 else 1):
                p._wire.append((p.now + 0.002 + rng.random() * 0.01, p._n, p.b if who == "a" else p.a, pkt))
                p._n += 1
            return True
        return False
    ca, cb = p.connect()
    p.drop = drop
    data = rng.randbytes(size)
    ca.send(data)
    ca.close()
    got = bytearray()
    p.run(120.0, until=lambda: (got.extend(drain(cb)), len(got) >= size and ca.state.name in ("FIN_WAIT_2",
                                                                                             "TIME_WAIT"))[1])
    assert bytes(got) == data
    assert all(_l4_checksum(pkt)[0] == 0 for _, _, pkt in p.log if pkt[9] == wire.PROTO_TCP)

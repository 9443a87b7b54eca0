"""Sans-I/O parts of the TUN/TAP modes: the TAP edge, the --only-shared filter, group fan-out."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import struct

from overlay import crypto
from overlay.iface import ethernet as eth
from overlay.netstack.wire import ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_UDP, build_icmp, build_ipv4
from overlay.node.dataplane import DataPlane
from overlay.node.inbound_filter import InboundFilter
from overlay.node.peers import GROUP_BURST
from overlay.node.state import Peer

POOL = ipaddress.IPv4Network("100.64.0.0/10")
ME, PEER_TAP, PEER_TUN = b"\x64\x40\x00\x01", b"\x64\x40\x00\x02", b"\x64\x40\x00\x03"
K_TAP, K_TUN = b"\x01" * 32, b"\x02" * 32
MY_MAC = eth.node_mac(b"\x00" * 32)


def edge() -> eth.TapEdge:
    e = eth.TapEdge(MY_MAC)
    e.set_address("100.64.0.1", POOL)
    e.set_peers([(K_TAP, PEER_TAP, True), (K_TUN, PEER_TUN, False)])
    return e


def arp_request(sha: bytes, spa: bytes, tpa: bytes) -> bytes:
    return (eth.BROADCAST_MAC + sha + eth.ETH_ARP + bytes.fromhex("0001080006040001") + sha + spa
            + b"\x00" * 6 + tpa)


def test_node_mac_is_stable_unicast_and_locally_administered():
    k = crypto.public_key(crypto.generate_private_key())
    m = eth.node_mac(k)
    assert m == eth.node_mac(k) and len(m) == 6
    assert m[0] & 0x02 and not m[0] & 0x01
    assert eth.node_mac(k) != eth.node_mac(bytes(32))


def test_arp_for_a_peer_is_answered_for_any_kind_of_peer():
    e = edge()
    for vip, key in ((PEER_TAP, K_TAP), (PEER_TUN, K_TUN)):
        action, reply, _ = e.from_device(arp_request(MY_MAC, ME, vip))
        peer_mac = eth.node_mac(key)
        assert action == eth.REPLY
        assert reply[:6] == MY_MAC and reply[6:12] == peer_mac and reply[12:14] == eth.ETH_ARP
        htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", reply[14:22])
        assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
        assert reply[22:28] == peer_mac and reply[28:32] == vip and reply[32:38] == MY_MAC and reply[38:42] == ME
    # an overlay address nobody holds: no answer, not flooded; an address outside the pool: flooded
    assert e.from_device(arp_request(MY_MAC, ME, b"\x64\x40\x00\x63"))[0] == eth.DROP
    assert e.from_device(arp_request(MY_MAC, ME, b"\xc0\xa8\x01\x05"))[0] == eth.FLOOD
    # our own probes stay here
    assert e.from_device(arp_request(MY_MAC, ME, ME))[0] == eth.DROP


def test_non_ip_frames_flood_or_go_to_the_owner_of_the_mac():
    e = edge()
    ipx = eth.BROADCAST_MAC + MY_MAC + b"\x81\x37" + b"\xff\xff" + b"\x00\x1e" + bytes(26)
    assert e.from_device(ipx) == (eth.FLOOD, ipx, None)
    llc = eth.BROADCAST_MAC + MY_MAC + struct.pack("!H", 33) + b"\xe0\xe0\x03" + bytes(30)   # 802.2 LLC IPX
    assert e.from_device(llc)[0] == eth.FLOOD
    to_tap = eth.node_mac(K_TAP) + MY_MAC + b"\x81\x37" + bytes(30)
    assert e.from_device(to_tap) == (eth.UNICAST, to_tap, K_TAP)
    to_tun = eth.node_mac(K_TUN) + MY_MAC + b"\x81\x37" + bytes(30)       # a TUN node has no Ethernet
    assert e.from_device(to_tun)[0] == eth.DROP
    multicast_v6 = b"\x33\x33\x00\x00\x00\x01" + MY_MAC + b"\x86\xdd" + bytes(40)
    assert e.from_device(multicast_v6)[0] == eth.FLOOD


def test_ipv4_frames_become_plain_packets_without_padding():
    e = edge()
    pkt = build_ipv4(ME, PEER_TUN, PROTO_UDP, b"\x00\x01\x00\x02\x00\x0a\x00\x00hi")
    frame = eth.node_mac(K_TUN) + MY_MAC + eth.ETH_IPV4 + pkt + bytes(60 - 14 - len(pkt))
    assert e.from_device(frame) == (eth.SEND_IP, pkt, None)


def test_headers_toward_our_device():
    e = edge()
    uni = build_ipv4(PEER_TAP, ME, PROTO_UDP, bytes(10))
    assert e.header_for(uni) == MY_MAC + eth.node_mac(K_TAP) + eth.ETH_IPV4
    bcast = build_ipv4(PEER_TUN, b"\xff\xff\xff\xff", PROTO_UDP, bytes(10))
    assert e.header_for(bcast) == eth.BROADCAST_MAC + eth.node_mac(K_TUN) + eth.ETH_IPV4
    mdns = build_ipv4(PEER_TUN, socket.inet_aton("224.0.0.251"), PROTO_UDP, bytes(10))
    assert e.header_for(mdns)[:6] == bytes.fromhex("01005e0000fb")
    stranger = build_ipv4(b"\x0a\x00\x00\x07", ME, PROTO_UDP, bytes(10))   # behind a static peer
    assert e.header_for(stranger)[6:12] == eth.GATEWAY_MAC
    # a TAP gateway: a member's packet to a host of our LAN is unicast to our MAC (the kernel forwards
    # only frames addressed to it), and the pool's broadcast address stays broadcast
    lan = build_ipv4(PEER_TAP, socket.inet_aton("192.168.1.20"), PROTO_UDP, bytes(10))
    assert e.header_for(lan) == MY_MAC + eth.node_mac(K_TAP) + eth.ETH_IPV4
    pb = build_ipv4(PEER_TAP, POOL.broadcast_address.packed, PROTO_UDP, bytes(10))
    assert e.header_for(pb)[:6] == eth.BROADCAST_MAC


def test_frames_from_peers_are_checked():
    e = edge()
    tap_mac = eth.node_mac(K_TAP)
    good = eth.BROADCAST_MAC + tap_mac + b"\x81\x37" + bytes(30)
    assert e.admit_frame(K_TAP, good)
    assert not e.admit_frame(K_TUN, good)                                          # not its MAC
    assert not e.admit_frame(K_TAP, eth.node_mac(K_TUN) + tap_mac + b"\x81\x37" + bytes(30))  # not to us
    assert e.admit_frame(K_TAP, MY_MAC + tap_mac + b"\x81\x37" + bytes(30))
    assert not e.admit_frame(K_TAP, MY_MAC + tap_mac + eth.ETH_IPV4 + bytes(40))   # IPv4 must come plain
    own = arp_request(tap_mac, PEER_TAP, b"\xc0\xa8\x01\x05")
    assert e.admit_frame(K_TAP, own)
    poison = arp_request(tap_mac, PEER_TUN, b"\xc0\xa8\x01\x05")                   # claims another's VIP
    assert not e.admit_frame(K_TAP, poison)
    assert not e.admit_frame(K_TAP, good[:10])


def _tagged(tpids: list[int], vid: int, inner_type: bytes, body: bytes) -> bytes:
    """``body`` (of EtherType ``inner_type``) behind one tag per TPID, outermost first."""
    return b"".join(struct.pack("!HH", t, vid) for t in tpids) + inner_type + body


def _snap(etype: bytes, body: bytes) -> bytes:
    llc = b"\xaa\xaa\x03\x00\x00\x00" + etype + body
    return struct.pack("!H", len(llc)) + llc


def test_ipv4_and_arp_under_another_guise_are_refused():
    """IPv4 or ARP behind a VLAN tag (VLAN ID 0: Linux handles it as untagged), at any depth and with
    any TPID, or inside an 802.3 LLC/SNAP frame, never reach the device; IPX in all its framings does."""
    e = edge()
    tap_mac = eth.node_mac(K_TAP)
    to_me = MY_MAC + tap_mac
    spoofed = build_ipv4(socket.inet_aton("203.0.113.66"), ME, PROTO_UDP, struct.pack("!HHHH", 1, 7, 12, 0) + b"data")
    poison = arp_request(tap_mac, PEER_TUN, ME)[14:]        # claims the TUN peer's address
    own_arp = arp_request(tap_mac, PEER_TAP, ME)[14:]
    refused = {}
    for tpid in (0x8100, 0x88A8, 0x9100, 0x9200, 0x9300):
        for vid in (0, 5):
            refused[f"{tpid:#x} vid {vid} ipv4"] = to_me + _tagged([tpid], vid, eth.ETH_IPV4, spoofed)
            refused[f"{tpid:#x} vid {vid} arp"] = eth.BROADCAST_MAC + tap_mac + _tagged([tpid], vid, eth.ETH_ARP, poison)
            refused[f"{tpid:#x} vid {vid} own arp"] = to_me + _tagged([tpid], vid, eth.ETH_ARP, own_arp)
            refused[f"{tpid:#x} vid {vid} ipx"] = to_me + _tagged([tpid], vid, b"\x81\x37", bytes(30))
    refused["qinq ipv4"] = to_me + _tagged([0x88A8, 0x8100], 0, eth.ETH_IPV4, spoofed)
    refused["triple ipv4"] = to_me + _tagged([0x8100, 0x8100, 0x8100], 0, eth.ETH_IPV4, spoofed)
    refused["snap ipv4"] = to_me + _snap(eth.ETH_IPV4, spoofed)
    refused["snap arp"] = to_me + _snap(eth.ETH_ARP, own_arp)
    refused["snap ipv6"] = to_me + _snap(eth.ETH_IPV6, bytes(40))
    refused["snap vlan"] = to_me + _snap(b"\x81\x00", b"\x00\x00" + eth.ETH_IPV4 + spoofed)
    refused["snap truncated"] = to_me + struct.pack("!H", 4) + b"\xaa\xaa\x03\x00"
    refused["snap response ipv4"] = to_me + _snap(eth.ETH_IPV4, spoofed)[:2] + b"\xaa\xab" + _snap(eth.ETH_IPV4, spoofed)[4:]
    refused["arp, not ethernet/ipv4"] = to_me + eth.ETH_ARP + own_arp[:2] + b"\x08\x00\x08\x04" + own_arp[6:]
    refused["plain ipv4"] = to_me + eth.ETH_IPV4 + spoofed
    for label, frame in refused.items():
        before = e.stats["bad_frames"]
        assert not e.admit_frame(K_TAP, frame), label
        assert e.stats["bad_frames"] == before + 1, label
    admitted = {
        "ethernet ii ipx": to_me + b"\x81\x37" + bytes(30),
        "802.2 llc ipx": to_me + struct.pack("!H", 33) + b"\xe0\xe0\x03" + bytes(30),
        "raw 802.3 ipx": to_me + struct.pack("!H", 30) + b"\xff\xff" + bytes(28),
        "snap ipx": to_me + _snap(b"\x81\x37", bytes(30)),
        "own arp": to_me + eth.ETH_ARP + own_arp,
        "ipv6": b"\x33\x33\x00\x00\x00\x01" + tap_mac + eth.ETH_IPV6 + bytes(40),
        "rarp": eth.BROADCAST_MAC + tap_mac + b"\x80\x35" + own_arp,
    }
    for label, frame in admitted.items():
        assert e.admit_frame(K_TAP, frame), label


def test_only_shared_tap_edge_refuses_ipv6():
    """--only-shared: the filter judges IPv4, so IPv6 from peers (link-local, NDP) never reaches the
    kernel; IPX and the peer's own ARP still do."""
    e = eth.TapEdge(MY_MAC, refuse_ipv6=True)
    e.set_address("100.64.0.1", POOL)
    e.set_peers([(K_TAP, PEER_TAP, True)])
    tap_mac = eth.node_mac(K_TAP)
    assert not e.admit_frame(K_TAP, MY_MAC + tap_mac + eth.ETH_IPV6 + bytes(40))
    assert not e.admit_frame(K_TAP, b"\x33\x33\xff\x00\x00\x01" + tap_mac + eth.ETH_IPV6 + bytes(40))
    assert e.admit_frame(K_TAP, MY_MAC + tap_mac + b"\x81\x37" + bytes(30))
    assert e.admit_frame(K_TAP, arp_request(tap_mac, PEER_TAP, ME))


def udp(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return build_ipv4(src, dst, PROTO_UDP, struct.pack("!HHHH", sport, dport, 12, 0) + b"data")


def tcp(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return build_ipv4(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0))


def test_only_shared_filter():
    f = InboundFilter({22}, {27015})
    assert f.admit(tcp(PEER_TUN, ME, 40000, 22), 0)
    assert not f.admit(tcp(PEER_TUN, ME, 40000, 23), 0)
    assert f.admit(udp(PEER_TUN, ME, 5000, 27015), 0)
    assert not f.admit(udp(PEER_TUN, ME, 5000, 27016), 0)
    # replies to our own flows, until they expire
    f.outbound(udp(ME, PEER_TUN, 27016, 53), 0)
    assert f.admit(udp(PEER_TUN, ME, 53, 27016), 1)
    assert not f.admit(udp(PEER_TAP, ME, 53, 27016), 1)         # another peer, same ports
    assert not f.admit(udp(PEER_TUN, ME, 53, 27016), 1000)      # expired
    f.outbound(tcp(ME, PEER_TUN, 50000, 80), 0)
    assert f.admit(tcp(PEER_TUN, ME, 80, 50000), 10)
    # ping both ways; an echo reply only for our own request
    echo = build_ipv4(PEER_TUN, ME, PROTO_ICMP, build_icmp(ICMP_ECHO_REQUEST, 0, 7 << 16 | 1, b"x"))
    assert f.admit(echo, 0)
    reply = build_ipv4(PEER_TUN, ME, PROTO_ICMP, build_icmp(0, 0, 9 << 16 | 1, b"x"))
    assert not f.admit(reply, 0)
    f.outbound(build_ipv4(ME, PEER_TUN, PROTO_ICMP, build_icmp(ICMP_ECHO_REQUEST, 0, 9 << 16 | 1, b"x")), 0)
    assert f.admit(reply, 1)
    # an ICMP error about our own flow, and not about someone else's
    ours = udp(ME, PEER_TUN, 27016, 9999)
    f.outbound(ours, 0)
    err = build_ipv4(PEER_TUN, ME, PROTO_ICMP, build_icmp(3, 3, 0, ours[:28]))
    assert f.admit(err, 1)
    other = build_ipv4(PEER_TUN, ME, PROTO_ICMP, build_icmp(3, 3, 0, udp(ME, PEER_TUN, 1, 2)[:28]))
    assert not f.admit(other, 1)
    assert not f.admit(b"\x45" + bytes(10), 0)


def test_only_shared_flow_table_is_bounded():
    f = InboundFilter(set(), set(), max_flows=100)
    for port in range(1000, 1300):
        f.outbound(udp(ME, PEER_TUN, port, 53), 0)
    assert len(f.flows) == 100
    assert f.admit(udp(PEER_TUN, ME, 53, 1299), 1) and not f.admit(udp(PEER_TUN, ME, 53, 1000), 1)


def test_only_shared_refusals_answer_at_once_and_are_bounded():
    """A refused SYN gets a reset, a refused datagram ICMP port unreachable (what the peer's stack
    reports as "refused" at once); resets are never answered, and a flood gets at most the budget."""
    from overlay.netstack.wire import (ACK, ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, RST, parse_icmp,
                                       parse_ipv4, parse_tcp)
    from overlay.node.inbound_filter import REFUSALS_PER_SECOND
    f = InboundFilter({22}, set())
    syn = tcp(PEER_TUN, ME, 40000, 23)
    assert not f.admit(syn, 0)
    ip = parse_ipv4(f.refusal(syn, 0))
    assert (ip.src, ip.dst) == (ME, PEER_TUN)
    seg = parse_tcp(ip)                                    # checksums verified
    assert (seg.src_port, seg.dst_port, seg.flags, seg.ack) == (23, 40000, RST | ACK, 2)   # SYN seq 1 + 1
    dgram = udp(PEER_TUN, ME, 5000, 27016)
    ip = parse_ipv4(f.refusal(dgram, 0))
    msg = parse_icmp(ip.payload)
    assert (ip.dst, msg.type, msg.code) == (PEER_TUN, ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE)
    assert msg.data == dgram[:28]                           # the offending header and 8 bytes
    rst = build_ipv4(PEER_TUN, ME, 6, struct.pack("!HHIIBBHHH", 40000, 23, 1, 0, 0x50, RST, 0, 0, 0))
    assert f.refusal(rst, 0) is None
    echo = build_ipv4(PEER_TUN, ME, PROTO_ICMP, build_icmp(ICMP_ECHO_REQUEST, 0, 0, b""))
    assert f.refusal(echo, 0) is None and f.refusal(b"\x45" + bytes(30), 0) is None
    answered = sum(f.refusal(syn, 10 + i / 1000) is not None for i in range(500))
    assert answered == REFUSALS_PER_SECOND
    assert f.refusal(syn, 11.5) is not None                 # the next second has a new budget


def test_group_fan_out_and_caps():
    async def main():
        dp = DataPlane(crypto.generate_private_key())
        dp.loop = asyncio.get_running_loop()
        dp.set_pool("100.64.0.0/10")
        keys = {kind: crypto.public_key(crypto.generate_private_key()) for kind in ("tap", "tun", "user", "off")}
        peers = {}
        for i, (kind, k) in enumerate(keys.items()):
            iface = ("tap" if kind == "off" else kind) if kind in ("tap", "tun", "off") else None
            peers[k] = Peer(kind, k, base64.b64encode(k).decode(), f"100.64.0.{i + 2}", kind != "off", iface)
        dp.update_peers(peers)
        sent = []
        dp.device.send = lambda key, pkt, now: sent.append((key, pkt))
        dp._flush = lambda: None
        dp.now = lambda: 1000.0     # one instant: no refill between the sends below
        bcast = udp(b"\x64\x40\x00\x01", b"\xff\xff\xff\xff", 1, 2)
        dp.send_packets([bcast, udp(b"\x64\x40\x00\x01", b"\x64\x7f\xff\xff", 1, 2),
                         udp(b"\x64\x40\x00\x01", socket.inet_aton("239.255.255.250"), 1, 1900)])
        assert sorted(k for k, _ in sent) == sorted([keys["tap"], keys["tun"]] * 3)
        sent.clear()
        dp.send_frames([(None, eth.BROADCAST_MAC + bytes(6) + b"\x81\x37" + bytes(30))])
        assert [k for k, _ in sent] == [keys["tap"]] and sent[0][1][0] == eth.L2_FRAME
        sent.clear()
        dp.send_frames([(keys["tun"], bytes(40))])      # a unicast frame for a TUN member: nowhere
        assert sent == []
        dp.send_packets([bcast] * 2000)                 # same instant: only the burst leaves
        assert len(sent) == 2 * (GROUP_BURST - 4)
        assert dp.stats["group_capped"] == 2000 - (GROUP_BURST - 4)

    asyncio.run(main())


# ---------------------------------------------------------------------------- TUN offloads
from hypothesis import given, settings, strategies as st  # noqa: E402

from overlay.iface import offload  # noqa: E402
from overlay.netstack.wire import checksum_ok, pseudo_header_sum  # noqa: E402

SRC, DST = socket.inet_aton("100.64.0.1"), socket.inet_aton("100.64.0.2")
TS_OPTION = b"\x01\x01\x08\x0a" + struct.pack("!II", 12345, 678)


def tcp_segment(seq: int, payload: bytes, flags: int = 0x10, ipid: int = 1, options: bytes = TS_OPTION) -> bytes:
    thl = 20 + len(options)
    th = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, (thl // 4) << 4, flags, 512, 0, 0) + options
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + len(payload), ipid, 0x4000, 64, 6, 0, SRC, DST))
    from overlay.netstack.wire import checksum as ck
    struct.pack_into("!H", ip, 10, ck(ip))
    seg = bytearray(th + payload)
    struct.pack_into("!H", seg, 16, ck(seg, pseudo_header_sum(SRC, DST, 6, len(seg))))
    return bytes(ip) + bytes(seg)


def valid(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    return (total == len(pkt) and checksum_ok(pkt[:ihl])
            and checksum_ok(pkt[ihl:], pseudo_header_sum(pkt[12:16], pkt[16:20], pkt[9], len(pkt) - ihl)))


def super_packet(seq: int, data: bytes, mss: int, flags: int) -> bytes:
    """What the kernel hands over with TSO: one header, all the data, a partial checksum."""
    p = bytearray(tcp_segment(seq, data, flags))
    struct.pack_into("!H", p, 36, pseudo_header_sum(SRC, DST, 6, len(p) - 20))
    return offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 52, mss, 20, 16) + bytes(p)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=20000), mss=st.integers(100, 1400),
       seq=st.integers(0, 2**32 - 1), fin=st.booleans())
def test_split_then_coalesce_round_trip(data, mss, seq, fin):
    flags = 0x18 | (0x01 if fin else 0)
    segs: list = []
    offload.split(super_packet(seq, data, mss, flags), segs)
    assert len(segs) == -(-len(data) // mss)
    assert all(valid(s) for s in segs)
    assert b"".join(s[52:] for s in segs) == data
    assert [struct.unpack_from("!I", s, 24)[0] for s in segs] == [(seq + i * mss) % 2**32 for i in range(len(segs))]
    assert all(s[33] == 0x10 for s in segs[:-1]) and segs[-1][33] == flags   # FIN/PSH only on the last
    # and back: one super-packet (FIN ends runs: then the last segment is written alone)
    writes = offload.coalesce(segs)
    again: list = []
    for hdr, *parts in writes:
        pkt = b"".join(parts)
        fl, gso, _, size, _, _ = offload.VNET_HDR.unpack(hdr)
        if gso == offload.GSO_NONE:
            assert fl == offload.F_DATA_VALID and valid(pkt)
            again.append(pkt)
        else:
            offload.split(hdr + pkt, again)
    assert [a[20:] for a in again] == [s[20:] for s in segs]
    if len(segs) <= offload.MAX_SEGMENTS:
        # one super-packet (or the lone segment); a FIN with data ends the run: its segment goes alone
        assert len(writes) == (1 if len(segs) == 1 or not fin else 2)


def test_coalesce_keeps_order_and_refuses_what_it_must():
    a = [tcp_segment(1000 + i * 100, bytes([i]) * 100) for i in range(5)]
    gap = tcp_segment(1000 + 7 * 100, b"g" * 100)                # not in sequence
    other_ts = tcp_segment(1500, b"t" * 100, options=b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2))
    syn = tcp_segment(0, b"", flags=0x02)
    udp_pkt = udp(SRC, DST, 1, 2)
    writes = offload.coalesce(a + [gap, udp_pkt, syn])
    kinds = [offload.VNET_HDR.unpack(w[0])[1] for w in writes]
    assert kinds == [offload.GSO_TCPV4, 0, 0, 0]
    assert b"".join(writes[0][1:])[52:] == b"".join(bytes([i]) * 100 for i in range(5))
    # different timestamps: no coalescing (the kernel would refuse the merged options)
    writes = offload.coalesce([a[0], tcp_segment(1100, b"t" * 100, options=b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2))])
    assert [offload.VNET_HDR.unpack(w[0])[1] for w in writes] == [0, 0]
    assert other_ts  # built above for the same reason


def test_split_completes_a_partial_checksum():
    p = bytearray(udp(SRC, DST, 1000, 2000))
    struct.pack_into("!H", p, 26, pseudo_header_sum(SRC, DST, 17, len(p) - 20))
    out: list = []
    offload.split(offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(p), out)
    assert checksum_ok(out[0][20:], pseudo_header_sum(SRC, DST, 17, len(p) - 20))
    out.clear()
    offload.split(offload.VNET_HDR.pack(0, 7, 0, 0, 0, 0) + bytes(p), out, st := offload.OffloadStats())
    assert out == [] and st.dropped == 1


def test_arp_for_a_host_behind_a_gateway_peer_is_answered_as_a_router():
    e = edge()
    lan_host = b"\xc0\xa8\x01\x14"
    assert e.from_device(arp_request(MY_MAC, ME, lan_host))[0] == eth.FLOOD   # no route: not ours to answer
    e.routes = [ipaddress.IPv4Network("192.168.1.0/24")]
    action, reply, _ = e.from_device(arp_request(MY_MAC, ME, lan_host))
    assert action == eth.REPLY and reply[6:12] == eth.GATEWAY_MAC and reply[28:32] == lan_host


def test_gateway_ruleset_names_what_it_switched_on():
    """The TUN/TAP gateway's nftables table (loaded for real in tests/lab/test_gateway_lab.py): masquerade
    and forward filter for the approved routes only, and a marked rule from which a later run
    learns which interfaces a crashed one switched forwarding on for."""
    from overlay.iface.router import opened_in, ruleset, table_name
    text = ruleset("ovl0", "100.64.0.0/10", ["192.168.1.0/24", "10.1.2.3/32"], ["ovl0", "eth0"])
    assert text.startswith(f"table ip {table_name('ovl0')} {{}}\ndelete table ip overlay_ovl0\n")
    assert 'iifname "ovl0" ip saddr 100.64.0.0/10 ip daddr { 192.168.1.0/24, 10.1.2.3/32 } accept' in text
    assert 'oifname != "ovl0" ip saddr 100.64.0.0/10 ip daddr { 192.168.1.0/24, 10.1.2.3/32 } masquerade' in text
    assert opened_in(text) == ["ovl0", "eth0"]
    assert opened_in(ruleset("ovl0", "100.64.0.0/10", ["192.168.1.0/24"], [])) == []
    assert opened_in('\t\tiifname "enp3s0" drop comment "forwarding switched on by overlay"\n') == ["enp3s0"]
    assert table_name("games-0.1") == "overlay_games_0_1"


def test_kernel_node_proxy_dials_approved_gateway_routes_through_the_os():
    """A TUN/TAP node's SOCKS/HTTP proxy reaches a host inside an approved gateway route with an
    ordinary socket (the kernel routes it through the device), as a userspace node's proxy does."""
    from overlay.node.services import OverlayDialer
    from overlay.proxy.dialer import ConnectionRefused, NotOverlayAddress

    gw = Peer("gw", bytes(32), base64.b64encode(bytes(32)).decode(), "100.64.0.9", True)

    async def main():
        async def serve(reader, writer):
            writer.write(b"hello from the LAN")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()
        d = OverlayDialer(lambda host: None, lambda: None, kernel=True,
                          find_route=lambda ip: gw if ip == "127.0.0.1" else None)
        try:
            reader, writer = await d.open_connection("127.0.0.1", port)
            assert await reader.read() == b"hello from the LAN"
            writer.close()
            try:
                await d.open_connection("127.0.0.1", closed_port)
                raise AssertionError("a closed port connected")
            except ConnectionRefused as e:
                assert "through gateway gw" in e.message
            try:
                await d.open_connection("192.0.2.1", port)
                raise AssertionError("an address in no approved route was dialed")
            except NotOverlayAddress as e:
                assert "no approved gateway route" in e.message
        finally:
            server.close()
            await server.wait_closed()
    asyncio.run(main())

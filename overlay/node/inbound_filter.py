"""``--only-shared`` for TUN/TAP nodes, sans-I/O: what peers may send to this node's kernel.

By default a TUN/TAP node's kernel receives whatever its networks' members send, as on a LAN (and
as with Hamachi and ZeroTier): that is what makes games, RDP and file sharing work unchanged. With
the filter on, an inbound IPv4 packet reaches the kernel only if it is
- TCP or UDP to a port this node shares (``overlay share PORT[/udp]``), or
- part of a flow this node's kernel started (a reply: same protocol, addresses and ports as a
  packet that left through the interface, within the flow's idle timeout), or
- ICMP echo (ping, both ways), or an ICMP error about one of this node's own flows, or
- a later fragment of a datagram (without the first fragment, which carries the ports and is
  checked, the kernel cannot reassemble it).
Flows live in one bounded table (oldest evicted first); nothing is allocated per packet beyond
the table's key when a flow is new or refreshed.

A refused packet is answered as a host without a listener would answer it, so the peer's
application fails at once instead of waiting for its connect timeout: a TCP segment (other than a
reset) with a reset, a UDP datagram with ICMP port unreachable (:meth:`InboundFilter.refusal`);
never a packet to a broadcast or multicast address, and at most ``REFUSALS_PER_SECOND`` of them, so
the node cannot be made to reflect a flood.
"""

from __future__ import annotations

from overlay.netstack.wire import (ACK, ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, RST, WireError, build_icmp,
                                   build_ipv4, build_tcp, parse_ipv4, parse_tcp)

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
ICMP_ECHO_REPLY, ICMP_UNREACHABLE, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
MAX_FLOWS = 16384
TIMEOUT = {PROTO_TCP: 3600.0, PROTO_UDP: 180.0, PROTO_ICMP: 30.0}
REFUSALS_PER_SECOND = 100


class InboundFilter:
    def __init__(self, tcp_ports: set[int], udp_ports: set[int], max_flows: int = MAX_FLOWS):
        self.tcp_ports, self.udp_ports = tcp_ports, udp_ports   # live views of the node's shares
        self.max_flows = max_flows
        self.flows: dict[tuple, float] = {}   # (proto, remote ip, remote port/id, local port) -> expiry
        self.stats = {"admitted": 0, "refused": 0, "answered": 0}
        self._budget, self._window = REFUSALS_PER_SECOND, float("-inf")

    @staticmethod
    def _key(pkt: bytes, outbound: bool) -> tuple | None:
        """The flow key of a TCP/UDP/ICMP-echo packet, seen from this node; None for others."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        if len(pkt) < ihl + 8:
            return None
        remote = pkt[16:20] if outbound else pkt[12:16]
        if proto == PROTO_TCP or proto == PROTO_UDP:
            a, b = (pkt[ihl] << 8) | pkt[ihl + 1], (pkt[ihl + 2] << 8) | pkt[ihl + 3]
            return (proto, remote, b, a) if outbound else (proto, remote, a, b)
        if proto == PROTO_ICMP:
            return (proto, remote, (pkt[ihl + 4] << 8) | pkt[ihl + 5], 0)
        return None

    def outbound(self, pkt: bytes, now: float) -> None:
        """A packet leaving through the interface: remember (or refresh) its flow."""
        if pkt[6] & 0x1F or pkt[7]:
            return  # a fragment (only the first carries ports, and it is the one that counts)
        key = self._key(pkt, True)
        if key is None:
            return
        if key[0] == PROTO_ICMP and pkt[(pkt[0] & 0x0F) * 4] != ICMP_ECHO_REQUEST:
            return
        flows = self.flows
        if key in flows:
            del flows[key]      # re-insert: the dict's order is the eviction order
        elif len(flows) >= self.max_flows:
            del flows[next(iter(flows))]
        flows[key] = now + TIMEOUT[key[0]]

    def admit(self, pkt: bytes, now: float) -> bool:
        ok = self._admit(pkt, now)
        self.stats["admitted" if ok else "refused"] += 1
        return ok

    def _admit(self, pkt: bytes, now: float) -> bool:
        if len(pkt) < 20:
            return False
        if (pkt[6] & 0x1F) or pkt[7]:
            return True   # a non-first fragment: its first fragment was checked
        proto = pkt[9]
        ihl = (pkt[0] & 0x0F) * 4
        if len(pkt) < ihl + 8:
            return False
        if proto == PROTO_TCP or proto == PROTO_UDP:
            dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
            if dport in (self.tcp_ports if proto == PROTO_TCP else self.udp_ports):
                return True
            return self._tracked(self._key(pkt, False), now)
        if proto == PROTO_ICMP:
            t = pkt[ihl]
            if t == ICMP_ECHO_REQUEST:
                return True
            if t == ICMP_ECHO_REPLY:
                return self._tracked(self._key(pkt, False), now)
            if t in (ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED):
                inner = pkt[ihl + 8:]   # the offending packet we sent, as "outbound"
                return len(inner) >= 28 and self._tracked(self._key(inner, True), now)
        return False

    def refusal(self, pkt: bytes, now: float) -> bytes | None:
        """The answer to a packet :meth:`admit` refused, addressed to this node's own unicast
        address: a TCP reset or ICMP port unreachable, None for anything else or over the rate."""
        proto = pkt[9] if len(pkt) >= 20 else 0
        if proto != PROTO_TCP and proto != PROTO_UDP:
            return None
        if now - self._window >= 1.0:
            self._window, self._budget = now, REFUSALS_PER_SECOND
        if self._budget <= 0:
            return None
        try:
            ip = parse_ipv4(pkt, verify=False)
            if ip.frag:
                return None
            if proto == PROTO_UDP:
                if len(ip.payload) < 8:
                    return None
                answer = build_ipv4(ip.dst, ip.src, PROTO_ICMP, build_icmp(
                    ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, 0, ip.header + ip.payload[:8]))
            else:
                seg = parse_tcp(ip, verify=False)
                if seg.flags & RST:
                    return None
                if seg.flags & ACK:   # RFC 9293 3.10.7.1: take its ACK as our sequence number
                    tcp = build_tcp(ip.dst, ip.src, seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
                else:
                    tcp = build_tcp(ip.dst, ip.src, seg.dst_port, seg.src_port, 0, seg.seq + seg.seg_len, RST | ACK, 0)
                answer = build_ipv4(ip.dst, ip.src, PROTO_TCP, tcp)
        except WireError:
            return None
        self._budget -= 1
        self.stats["answered"] += 1
        return answer

    def _tracked(self, key: tuple | None, now: float) -> bool:
        if key is None:
            return False
        exp = self.flows.get(key)
        if exp is None:
            return False
        if exp < now:
            del self.flows[key]
            return False
        return True

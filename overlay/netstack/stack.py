"""The userspace IPv4 host: one address, TCP connections, UDP sockets, ICMP echo; sans-I/O.

Feed it inbound IPv4 packets with :meth:`Stack.receive_packet`, drain what it wants to send
with :meth:`Stack.packets_to_send`, run :meth:`Stack.handle_timer` at :meth:`Stack.get_timer`,
and take application events from :meth:`Stack.next_event`. Every call takes ``now`` (seconds on
any monotonic clock) so tests can drive hours of timers in milliseconds.

Security posture: only listened TCP ports accept connections; a SYN to any
other port is answered with RST and reported as :class:`~overlay.netstack.events.PortRefused`.
Malformed packets are counted in ``stats`` and dropped; nothing a peer sends can raise here.

Many short connections: the side that closes first keeps TIME-WAIT (2 * MSL), so the dialling side
picks ephemeral ports per RFC 6056 (algorithm 4: a keyed hash of the destination plus a
per-destination counter), which walks the whole range before a port recurs with one peer:port; a
SYN reaching a connection in TIME-WAIT with a sequence number above everything of the old one is
accepted as a new connection (RFC 1122 4.2.2.13, as Linux does without timestamps). TIME-WAIT
connections sit in a table of their own, ordered by expiry and bounded (``max_time_wait``: the
oldest is recycled), so they cost nothing per packet or timer scan and memory stays flat however
many connections come and go.

Checksums: ``verify_checksums=False`` skips verifying received ones, and TCP segments and UDP
datagrams to an address in ``checksum_free`` go out with the checksum left 0 (an overlay node
whose peer said it accepts that: the tunnel authenticates every packet, and computing checksums
nobody verifies was a fifth of a sending node's busy time). The IPv4 header checksum is always
computed (20 bytes; a kernel always checks it). Everything else always carries valid checksums.

IP fragments are reassembled within fixed bounds (``fragments.py``); UDP datagrams and ICMP echo
replies larger than the MTU are sent as fragments, as Linux sends them over a TUN device. TCP
never needs fragments (its MSS follows the MTU).
"""

from __future__ import annotations

import os
import random
import struct
from collections import deque
from collections.abc import Container

from .. import crypto
from . import events
from . import tcp as _tcp
from .fragments import Reassembler
from .tcp import MASK32, TcpConfig, TcpConnection, TcpState, unwrap
from .udp import UdpSocket
from .wire import (
    ACK,
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_PORT_UNREACHABLE,
    ICMP_TIME_EXCEEDED,
    IPV4_HEADER_LEN,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    RST,
    SYN,
    TCP_HEADER_LEN,
    TcpSegment,
    WireError,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    build_port_unreachable,
    build_tcp,
    build_udp,
    checksum_ok,
    ip_to_bytes,
    ip_to_str,
    parse_icmp,
    parse_ipv4,
    parse_tcp,
    parse_udp,
    pseudo_header_sum,
)

EPHEMERAL_PORTS = range(49152, 65536)
PORT_TABLE_SIZE = 4096  # RFC 6056 algorithm 4: per-destination counters, hashed into this many slots
MAX_TIME_WAIT = 4096  # connections kept in TIME-WAIT; beyond that the oldest is recycled
REQUEST_TIMEOUT = 30.0  # a deferred SYN nobody answered: the next retransmission asks again
MIN_MTU = 576
MAX_MTU = 65535
# ICMP destination unreachable codes that end a connection attempt (besides port unreachable):
# network, host unreachable; network, host unknown; network, host, administratively prohibited
UNREACHABLE_CODES = frozenset((0, 1, 6, 7, 9, 10, 13))
_ISN_TICKS = 250_000  # RFC 6528: the clock component advances every 4 microseconds
# the fields of an IPv4 header without options followed by a TCP header (after the version and
# header length byte): total length, flags and fragment offset, protocol, addresses, ports, sequence and
# acknowledgment numbers, data offset, flags, window (TTL, identification, checksums skipped)
_IPV4_TCP_FIELDS = struct.Struct("!xxH2xHxB2x4s4sHHIIBBH")


class Stack:
    """A userspace TCP/IP host with one IPv4 address.

    ``mtu`` is the tunnel's inner MTU (packets we send never exceed it; the TCP MSS we announce
    is ``mtu - 40``). ``tcp`` tunes TCP (buffers, timers, congestion control).
    """

    def __init__(
        self,
        address: str,
        *,
        mtu: int = 1400,
        now: float,
        tcp: TcpConfig | None = None,
        listen_backlog: int = 128,
        max_time_wait: int = MAX_TIME_WAIT,
        icmp_errors_per_second: int = 100,
        verify_checksums: bool = True,
        reassembler: Reassembler | None = None,
        checksum_free: Container[bytes] = frozenset(),
    ):
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self.address = address
        self._addr = ip_to_bytes(address)
        self.mtu = mtu
        # False when every packet arrives through an authenticated tunnel (Poly1305 already
        # guarantees integrity; Linux WireGuard marks such packets CHECKSUM_UNNECESSARY too)
        self.verify_checksums = verify_checksums
        # destinations (packed IPv4) whose TCP segments and UDP datagrams we send with the
        # checksum left 0: peers that said they never verify it nor hand it on unchanged to a
        # kernel (one set lookup per packet; the owner may update the container in place)
        self.checksum_free = checksum_free
        self.now = now
        self.tcp_config = tcp or TcpConfig()
        self.listen_backlog = listen_backlog
        self._conns: dict[tuple[bytes, int, int], TcpConnection] = {}  # every state but TIME-WAIT
        # TIME-WAIT connections, oldest expiry first (all last 2 * MSL; a re-armed one moves last)
        self._time_wait: dict[tuple[bytes, int, int], TcpConnection] = {}
        self.max_time_wait = max(1, max_time_wait)  # (0 would end a connection before its last ACK)
        self._listeners: dict[int, int] = {}  # port -> connections still in SYN-RECEIVED
        self._deferred: set[int] = set()  # listened ports whose SYNs wait for accept_request()
        # every port listened, deferred (a gateway's stack for one LAN host: each SYN is a request
        # the application answers after trying the real host)
        self.listen_any = False
        # SYNs awaiting an answer: (SYN, arrival, lowest ISN allowed (a reopened TIME-WAIT) or None)
        self._requests: dict[tuple[bytes, int, int], tuple[TcpSegment, float, int | None]] = {}
        self._udp: dict[int, UdpSocket] = {}
        self._out: list[bytes] = []
        self._events: deque = deque()
        self._dirty: dict[TcpConnection, None] = {}  # insertion-ordered set
        self._isn_secret = os.urandom(16)
        self._port_secret = os.urandom(16)
        self._port_table = [0] * PORT_TABLE_SIZE
        self._ident = random.getrandbits(16)
        self._icmp_budget = icmp_errors_per_second
        self._icmp_rate = icmp_errors_per_second
        self._icmp_window = now
        self.fragments = reassembler or Reassembler()  # its own counters: ``fragments.stats``
        self._fast_path = _tcp.FAST_PATH  # tests turn it off to compare with the full path
        self.stats = dict.fromkeys(
            ("rx_packets", "tx_packets", "malformed", "not_for_us", "unknown_proto", "rst_sent", "backlog_full",
             "udp_dropped", "icmp_echo", "rx_fragments", "tx_fragmented", "time_wait_reopened",
             "time_wait_recycled", "tx_no_checksum"),
            0,
        )

    # ------------------------------------------------------------------ public API

    @property
    def connections(self) -> list[TcpConnection]:
        return [*self._conns.values(), *self._time_wait.values()]

    @property
    def time_wait_count(self) -> int:
        return len(self._time_wait)

    def listen(self, port: int, *, defer: bool = False) -> None:
        """Accept TCP connections to ``port`` (they arrive as IncomingConnection events).

        ``defer``: each SYN first becomes a ConnectionRequest event and the handshake only goes on
        once the application calls :meth:`accept_request` (say, after reaching the service the
        port leads to), or the peer gets ICMP port unreachable from :meth:`refuse_request`. At
        most ``listen_backlog`` requests per port wait for an answer."""
        _check_port(port)
        self._listeners.setdefault(port, 0)
        if defer:
            self._deferred.add(port)
        else:
            self._deferred.discard(port)

    def unlisten(self, port: int) -> None:
        """Stop accepting on ``port``; established connections are not touched."""
        self._listeners.pop(port, None)
        self._deferred.discard(port)
        for key in [k for k in self._requests if k[2] == port]:
            del self._requests[key]

    def accept_request(self, req: events.ConnectionRequest, now: float) -> TcpConnection | None:
        """Go on with the handshake of a deferred SYN; None if the request is gone (port no longer
        listened, or it waited longer than REQUEST_TIMEOUT and the peer's retransmission made a
        new one)."""
        self.now = now
        entry = self._requests.pop(req.key, None)
        if entry is None or req.port not in self._listeners or req.key in self._conns or req.key in self._time_wait:
            return None
        seg, _, min_iss = entry
        src = req.key[0]
        self._listeners[req.port] += 1
        conn = self._new_conn(src, seg.src_port, req.port, now, passive=True, min_iss=min_iss)
        conn.half_open_slot = True
        self._conns[req.key] = conn
        conn._start_passive(seg, now)
        return conn

    def refuse_request(self, req: events.ConnectionRequest, now: float,
                       icmp: tuple[int, int] = (ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE)) -> None:
        """Refuse a deferred SYN with ICMP port unreachable (Linux reports ECONNREFUSED for it), or
        the ICMP error ``icmp`` (type, code); a RST when the ICMP error budget is spent."""
        self.now = now
        entry = self._requests.pop(req.key, None)
        if entry is None:
            return
        seg = entry[0]
        src = req.key[0]
        if self._icmp_allowed(now):
            # the quoted packet: an IPv4 header and the first 8 bytes of the SYN (ports, sequence)
            quoted = build_ipv4(src, self._addr, PROTO_TCP, struct.pack("!HHI", seg.src_port, seg.dst_port, seg.seq))
            body = build_icmp(icmp[0], icmp[1], 0, quoted)
            self._out.append(build_ipv4(self._addr, src, PROTO_ICMP, body, ident=self._next_ident()))
        else:
            self._send_rst_for(self._addr, src, seg)

    def connect(self, dst_ip: str, dst_port: int, now: float, *, src_port: int | None = None,
                defer_ack: bool = False) -> TcpConnection:
        """Active open. Returns at once in SYN-SENT; ``Connected`` or ``ConnectionRefused`` /
        ``TimedOut`` follows as an event.

        ``defer_ack``: the ACK completing the handshake is not sent with the ``Connected`` event
        but is due at once as a timer (``get_timer``), so data written in answer to the event,
        before that timer runs, carries it."""
        _check_port(dst_port)
        self.now = now
        dst = ip_to_bytes(dst_ip)
        if src_port is None:
            src_port = self._ephemeral_port(dst, dst_port)
        else:
            _check_port(src_port)
        key = (dst, dst_port, src_port)
        if key in self._conns or key in self._time_wait:
            raise OSError(f"connection {ip_to_str(dst)}:{dst_port} from port {src_port} already exists")
        conn = self._new_conn(dst, dst_port, src_port, now, passive=False)
        conn.defer_handshake_ack = defer_ack
        self._conns[key] = conn
        conn._start_active(now)
        return conn

    def udp_bind(self, port: int, *, max_queued: int = 256) -> UdpSocket:
        """Bind a UDP port; 0 picks an ephemeral one."""
        if port == 0:
            free = [p for p in random.sample(EPHEMERAL_PORTS, 64) if p not in self._udp]
            if not free:
                raise OSError("no free UDP port")
            port = free[0]
        _check_port(port)
        if port in self._udp:
            raise OSError(f"UDP port {port} already bound")
        sock = UdpSocket(self, port, max_queued)
        self._udp[port] = sock
        return sock

    def receive_packet(self, ip_packet: bytes, now: float) -> None:
        """Process one inbound IPv4 packet (from the tunnel). Never raises for bad input.

        What a TCP segment makes due (an ACK, data its ACK lets out) is built at the next
        :meth:`packets_to_send`: packets received back to back form one batch, answered with
        one ACK per connection (duplicate ACKs for out-of-order data still go out per segment)."""
        self.now = now
        self.stats["rx_packets"] += 1
        # the common case first: an unfragmented TCP segment without IP or TCP options, parsed
        # here in one go (what parse_ipv4 and parse_tcp accept, they would parse the same), then
        # taken by its connection's header prediction if it can; else the full path below
        if self._fast_path and len(ip_packet) >= 40 and ip_packet[0] == 0x45:
            total, frag, proto, src, dst, sport, dport, seq, ack, off, flags, window = \
                _IPV4_TCP_FIELDS.unpack_from(ip_packet)
            if (
                proto == PROTO_TCP
                and off >> 4 == 5
                and not frag & 0x3FFF
                and 40 <= total <= len(ip_packet)
                and dst == self._addr
                and 0 < src[0] < 224 and src[0] != 127 and src != dst  # (no martian source)
                and sport and dport
                and (not self.verify_checksums or _checksums_ok(ip_packet, total, src, dst))
            ):
                data = ip_packet[40:total]
                flags &= 0x3F
                conn = self._conns.get((src, sport, dport))
                if conn is not None and conn._fast_segment(seq, ack, flags, window, data, now):
                    return
                try:
                    self._receive_tcp(src, TcpSegment(sport, dport, seq, ack, flags, window, data), now)
                except WireError:
                    self.stats["malformed"] += 1
                return
        try:
            ip = parse_ipv4(ip_packet, self.verify_checksums)
            if ip.dst != self._addr:
                self.stats["not_for_us"] += 1
                return
            src0 = ip.src[0]
            if src0 == 0 or src0 >= 224 or src0 == 127 or ip.src == self._addr:
                self.stats["not_for_us"] += 1  # martian source: never answer it
                return
            if ip.frag:
                self.stats["rx_fragments"] += 1
                whole = self.fragments.add(ip, now)
                if whole is None:
                    return
                ip = whole
            if ip.proto == PROTO_TCP:
                self._receive_tcp(ip.src, parse_tcp(ip, self.verify_checksums), now)
            elif ip.proto == PROTO_UDP:
                self._receive_udp(ip, now)
            elif ip.proto == PROTO_ICMP:
                self._receive_icmp(ip)
            else:
                self.stats["unknown_proto"] += 1
        except WireError:
            self.stats["malformed"] += 1

    def packets_to_send(self, now: float | None = None) -> list[bytes]:
        """Outbound IPv4 packets queued so far, including output made due by application calls
        (send, recv opening the window, close). ``now`` defaults to the last time seen."""
        if now is not None:
            self.now = now
        if self._dirty:
            dirty = self._dirty
            self._dirty = {}
            t = self.now
            for conn in dirty:
                if conn.state is not TcpState.CLOSED:
                    conn._output(t)
                    conn._update_deadline()
        out = self._out
        if out:
            self._out = []
            self.stats["tx_packets"] += len(out)
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run (None: no timer pending)."""
        for conn in self._dirty:  # segments arrived, output not made yet: timers may have moved
            conn._update_deadline()
        best = self.fragments.next_deadline()
        for conn in self._conns.values():
            d = conn.deadline
            if d is not None and (best is None or d < best):
                best = d
        if self._time_wait:
            d = next(iter(self._time_wait.values())).deadline
            if d is not None and (best is None or d < best):
                best = d
        return best

    def handle_timer(self, now: float) -> None:
        self.now = now
        for conn in self._dirty:
            conn._update_deadline()
        if self.fragments:
            self.fragments.expire(now)
        for conn in [c for c in self._conns.values() if c.deadline is not None and c.deadline <= now]:
            if conn.state is not TcpState.CLOSED:
                conn._on_timer(now)
        if self._time_wait:
            due = []
            for conn in self._time_wait.values():  # in expiry order: stop at the first not due
                if conn.deadline is not None and conn.deadline > now:
                    break
                due.append(conn)
            for conn in due:
                conn._on_timer(now)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    @property
    def has_output(self) -> bool:
        """:meth:`packets_to_send` would return packets (or connections have output due)."""
        return bool(self._out or self._dirty)

    def next_event(self) -> events.Event | None:
        if not self._events:
            return None
        ev = self._events.popleft()
        if type(ev) is events.DatagramReceived:
            ev.socket.queued -= 1
        return ev

    # ------------------------------------------------------------------ TCP dispatch

    def _receive_tcp(self, src: bytes, seg: TcpSegment, now: float) -> None:
        key = (src, seg.src_port, seg.dst_port)
        conn = self._conns.get(key)
        if conn is not None:
            conn._on_segment(seg, now)
            if conn.half_open_slot and conn.state is not TcpState.SYN_RECEIVED:
                self._release_half_open(conn)
            return
        flags = seg.flags
        min_iss = None
        if self._time_wait:
            conn = self._time_wait.get(key)
            if conn is not None:
                if not conn._reopened_by(seg):
                    conn._on_segment(seg, now)
                    return
                # a new incarnation (RFC 1122 4.2.2.13): end TIME-WAIT, treat the SYN as new
                self.stats["time_wait_reopened"] += 1
                min_iss = conn._next_incarnation_iss()
                conn._terminate(None)
        if flags & RST:
            return
        port = seg.dst_port
        if self.listen_any and flags & SYN and not flags & ACK and port not in self._listeners:
            self._listeners[port] = 0
            self._deferred.add(port)
        if flags & SYN and not flags & ACK and port in self._listeners:
            if port in self._deferred:
                self._request(key, seg, now, min_iss)
                return
            if self._listeners[port] >= self.listen_backlog:
                self.stats["backlog_full"] += 1
                return  # the peer retransmits its SYN; maybe there is room then
            self._listeners[port] += 1
            conn = self._new_conn(src, seg.src_port, port, now, passive=True, min_iss=min_iss)
            conn.half_open_slot = True
            self._conns[key] = conn
            conn._start_passive(seg, now)
            return
        self._send_rst_for(self._addr, src, seg)
        if flags & SYN and not flags & ACK:
            self._event(events.PortRefused(port, (ip_to_str(src), seg.src_port)))

    def _request(self, key: tuple[bytes, int, int], seg: TcpSegment, now: float, min_iss: int | None = None) -> None:
        """A SYN to a deferred port: one ConnectionRequest per connection attempt (retransmitted
        SYNs are ignored while the application decides, unless it took REQUEST_TIMEOUT)."""
        old = self._requests.get(key)
        if old is not None and now - old[1] < REQUEST_TIMEOUT:
            return
        if old is None and self._waiting(key[2]) >= self.listen_backlog:
            for k in [k for k, (_, t, _) in self._requests.items() if now - t >= REQUEST_TIMEOUT]:
                del self._requests[k]
            if self._waiting(key[2]) >= self.listen_backlog:
                self.stats["backlog_full"] += 1
                return
        self._requests[key] = (seg, now, min_iss)
        self._event(events.ConnectionRequest(key[2], (ip_to_str(key[0]), key[1]), key))

    def _waiting(self, port: int) -> int:
        return sum(1 for k in self._requests if k[2] == port)

    def _release_half_open(self, conn: TcpConnection) -> None:
        """The connection left SYN-RECEIVED: it no longer counts against the listen backlog."""
        conn.half_open_slot = False
        port = conn.local_port
        if self._listeners.get(port, 0) > 0:
            self._listeners[port] -= 1

    def _new_conn(self, remote: bytes, rport: int, lport: int, now: float, passive: bool,
                  min_iss: int | None = None) -> TcpConnection:
        """``min_iss``: the new incarnation of a TIME-WAIT connection starts beyond the old one's
        sequence numbers (the clock-based ISN usually is already)."""
        iss = self._isn(remote, rport, lport, now)
        if min_iss is not None and unwrap(iss, min_iss) < min_iss:
            iss = min_iss & MASK32
        return TcpConnection(
            self, self.tcp_config, self._addr, lport, remote, rport, iss,
            self.mtu - IPV4_HEADER_LEN - TCP_HEADER_LEN, passive,
        )

    def _isn(self, remote: bytes, rport: int, lport: int, now: float) -> int:
        """RFC 6528: ISN = M + F(4-tuple, secret), M a 4 microsecond clock."""
        f = crypto.mac(self._isn_secret, self._addr, remote, struct.pack("!HH", lport, rport))
        return (int(now * _ISN_TICKS) + int.from_bytes(f[:4], "big")) & MASK32

    def _ephemeral_port(self, dst: bytes, dport: int) -> int:
        """RFC 6056 algorithm 4 (double-hash): port = start + (F(dst) + table[G(dst)]) mod range,
        the counter advancing on every try. Consecutive connections to one peer:port take
        successive ports, so a 4-tuple recurs only after the whole range was used (the peer may
        still hold the old one in TIME-WAIT); other destinations' ports stay unpredictable."""
        h = crypto.mac(self._port_secret, self._addr, dst, struct.pack("!H", dport))
        offset = int.from_bytes(h[:4], "big")
        slot = int.from_bytes(h[4:8], "big") % PORT_TABLE_SIZE
        table = self._port_table
        start, n = EPHEMERAL_PORTS.start, len(EPHEMERAL_PORTS)
        for _ in range(n):
            p = start + (offset + table[slot]) % n
            table[slot] = (table[slot] + 1) % n
            key = (dst, dport, p)
            if key not in self._conns and key not in self._time_wait:
                return p
        raise OSError("no free ephemeral port")

    def _send_rst_for(self, local: bytes, remote: bytes, seg: TcpSegment) -> None:
        """RST answering ``seg`` (RFC 9293 §3.10.7.1): take its ACK as our sequence number,
        else acknowledge everything it occupied."""
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            tcp = build_tcp(local, remote, seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        else:
            tcp = build_tcp(local, remote, seg.dst_port, seg.src_port, 0, seg.seq + seg.seg_len, RST | ACK, 0)
        self.stats["rst_sent"] += 1
        self._out.append(build_ipv4(local, remote, PROTO_TCP, tcp, ident=self._next_ident()))

    # ------------------------------------------------------------------ UDP and ICMP

    def _receive_udp(self, ip, now: float) -> None:
        dgram = parse_udp(ip, self.verify_checksums)
        sock = self._udp.get(dgram.dst_port)
        if sock is None:
            if self._icmp_allowed(now):
                self._out.append(build_ipv4(self._addr, ip.src, PROTO_ICMP, build_port_unreachable(ip), ident=self._next_ident()))
            return
        if sock.queued >= sock.max_queued:
            sock.dropped += 1
            self.stats["udp_dropped"] += 1
            return
        sock.queued += 1
        self._events.append(events.DatagramReceived(sock, dgram.data, (ip_to_str(ip.src), dgram.src_port)))

    def _receive_icmp(self, ip) -> None:
        msg = parse_icmp(ip.payload, self.verify_checksums)
        if msg.type == ICMP_DEST_UNREACHABLE or msg.type == ICMP_TIME_EXCEEDED:
            self._receive_syn_error(ip.src, msg.type, msg.code, msg.data)
        elif msg.type == ICMP_ECHO_REQUEST and msg.code == 0:
            self.stats["icmp_echo"] += 1
            reply = build_icmp(ICMP_ECHO_REPLY, 0, msg.rest, msg.data)
            self._send_ip(ip.src, PROTO_ICMP, reply)

    def _receive_syn_error(self, src: bytes, icmp_type: int, code: int, quoted: bytes) -> None:
        """An ICMP error for one of our SYNs (the quoted header and sequence number must match a
        connection in SYN-SENT, as Linux checks). Port unreachable, from the destination itself:
        refused, the service is not there. Net / host unreachable or prohibited, time exceeded
        (from the destination or a router on the way, such as a gateway to a LAN): it cannot be
        reached."""
        if len(quoted) < IPV4_HEADER_LEN + 8:
            return
        ihl = (quoted[0] & 0x0F) * 4
        if quoted[9] != PROTO_TCP or quoted[12:16] != self._addr or len(quoted) < ihl + 8:
            return
        port = icmp_type == ICMP_DEST_UNREACHABLE and code == ICMP_PORT_UNREACHABLE
        if port and quoted[16:20] != src:
            return
        if not port and icmp_type == ICMP_DEST_UNREACHABLE and code not in UNREACHABLE_CODES:
            return   # fragmentation needed, source route failed...: not about reaching the host
        sport, dport, seq = struct.unpack_from("!HHI", quoted, ihl)
        conn = self._conns.get((quoted[16:20], dport, sport))
        if conn is None or conn.state is not TcpState.SYN_SENT or seq != conn.iss & MASK32:
            return
        if port:
            conn._terminate(f"nothing listens on {conn.remote_ip}:{conn.remote_port}",
                            events.ConnectionRefused(conn, unreachable=True))
        else:
            conn._terminate(f"{conn.remote_ip}:{conn.remote_port} is unreachable",
                            events.ConnectionRefused(conn, unreachable=True, icmp=(icmp_type, code)))

    def _icmp_allowed(self, now: float) -> bool:
        """Token bucket for ICMP errors, so we cannot be used to reflect floods."""
        if now - self._icmp_window >= 1.0:
            self._icmp_window = now
            self._icmp_budget = self._icmp_rate
        if self._icmp_budget <= 0:
            return False
        self._icmp_budget -= 1
        return True

    def _emit_udp(self, sport: int, addr: tuple[str, int], data: bytes) -> None:
        dst = ip_to_bytes(addr[0])
        _check_port(addr[1])
        if dst in self.checksum_free:
            self.stats["tx_no_checksum"] += 1
            self._send_ip(dst, PROTO_UDP, build_udp(self._addr, dst, sport, addr[1], data, False))
        else:
            self._send_ip(dst, PROTO_UDP, build_udp(self._addr, dst, sport, addr[1], data))

    def _send_ip(self, dst: bytes, proto: int, payload: bytes) -> None:
        """One IPv4 packet, or fragments of at most the MTU when it does not fit."""
        if IPV4_HEADER_LEN + len(payload) <= self.mtu:
            self._out.append(build_ipv4(self._addr, dst, proto, payload, ident=self._next_ident()))
            return
        self.stats["tx_fragmented"] += 1
        self._out.extend(build_ipv4_fragments(self._addr, dst, proto, payload, self.mtu, ident=self._next_ident()))

    def _udp_unbind(self, sock: UdpSocket) -> None:
        if self._udp.get(sock.port) is sock:
            del self._udp[sock.port]

    # ------------------------------------------------------------------ called by connections

    def _emit_tcp(self, conn: TcpConnection, seq: int, ack: int, flags: int, window: int, data: bytes | bytearray,
                  options: bytes) -> None:
        """One segment of ``conn``, built from its header template (the bytes ``build_ipv4_tcp`` makes)."""
        self._ident = ident = (self._ident + 1) & 0xFFFF
        if conn.remote_ip_bytes in self.checksum_free:
            self.stats["tx_no_checksum"] += 1
            self._out.append(conn._tmpl.build(ident, seq, ack, flags, window, data, options, False))
        else:
            self._out.append(conn._tmpl.build(ident, seq, ack, flags, window, data, options))

    def _event(self, ev: object) -> None:
        self._events.append(ev)

    def _mark_dirty(self, conn: TcpConnection) -> None:
        self._dirty[conn] = None

    def _time_wait_started(self, conn: TcpConnection) -> None:
        """``conn`` entered TIME-WAIT, or re-armed it: it moves to the end of the TIME-WAIT table
        (which stays in expiry order); past ``max_time_wait`` the oldest entry is dropped."""
        key = (conn.remote_ip_bytes, conn.remote_port, conn.local_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
        tw = self._time_wait
        tw.pop(key, None)
        tw[key] = conn
        while len(tw) > self.max_time_wait:
            self.stats["time_wait_recycled"] += 1
            next(iter(tw.values()))._terminate(None)

    def _remove(self, conn: TcpConnection) -> None:
        key = (conn.remote_ip_bytes, conn.remote_port, conn.local_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
        elif self._time_wait.get(key) is conn:
            del self._time_wait[key]
        if conn.half_open_slot:
            self._release_half_open(conn)
        self._dirty.pop(conn, None)

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident


def _checksums_ok(packet: bytes, total: int, src: bytes, dst: bytes) -> bool:
    """Both checksums of an IPv4 packet without options carrying TCP (``parse_ipv4`` and
    ``parse_tcp`` check the same)."""
    return checksum_ok(packet[:IPV4_HEADER_LEN]) and checksum_ok(
        packet[IPV4_HEADER_LEN:total], pseudo_header_sum(src, dst, PROTO_TCP, total - IPV4_HEADER_LEN))


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1..65535")

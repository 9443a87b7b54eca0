"""ICMP echo through a userspace gateway: members ping hosts of the gateway's LAN by their address.

Core (sans-I/O, ``now`` passed in): ``EchoTable`` maps a member's echo flow (member address, its
echo identifier, LAN host) to the identifier the gateway's own echo carries on the LAN, remembers
each request in flight (LAN host, local identifier, sequence) until ``ECHO_TIMEOUT``, and turns
the LAN host's reply into the member's: an echo reply from the LAN host's address with the
member's identifier, sequence and data. A reply nobody waits for (late, duplicated, unsolicited)
is dropped. Bounds: ``MAX_FLOWS`` flows, ``MAX_OUTSTANDING`` requests in flight (more are dropped,
as a lost ping would be), idle flows forgotten after ``FLOW_IDLE``; both tables are shared fairly
between members (``overlay.node.fair_share``): when one is full, the member holding the most
gives up its oldest entry to a member holding fewer.

Glue: ``IcmpEcho`` sends and receives, in this order of preference, through

- unprivileged ICMP sockets (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, Linux "ping
  sockets"), one per flow: allowed when the process's group is inside
  ``net.ipv4.ping_group_range`` (many distributions set ``0 2147483647``; the kernel's default
  ``1 0`` allows nobody). The kernel picks each socket's identifier and hands it only its replies;
- one raw ICMP socket (CAP_NET_RAW, e.g. root) for every flow, with identifiers picked here;
- neither: requests go unanswered and one line (rate limited) names the fix. Opening is tried
  again at most every ``RETRY`` seconds, so changing the sysctl takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import OrderedDict
from typing import Callable

from overlay.netstack.wire import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4
from overlay.node.fair_share import FairShare
from overlay.ratelog import LogLimiter

log = logging.getLogger("overlay.gateway")

MAX_FLOWS = 128             # (member, identifier, LAN host) at once; one socket each in ping-socket mode
MAX_OUTSTANDING = 256       # echo requests in flight over all flows
ECHO_TIMEOUT = 5.0          # a reply later than this is dropped (ping's own wait is usually shorter)
FLOW_IDLE = 30.0
RETRY = 2.0                 # how often to try opening ICMP sockets again after both ways failed

PING, RAW = "ping socket", "raw socket"
FIX = ("allow unprivileged ping sockets for the gateway's group: sudo sysctl -w "
       "net.ipv4.ping_group_range='0 2147483647' (persist it in /etc/sysctl.d/), or give the node CAP_NET_RAW")


class EchoFlow:
    __slots__ = ("member", "ident", "host", "local_id", "last", "sock")

    def __init__(self, member: bytes, ident: int, host: bytes, now: float):
        self.member, self.ident, self.host = member, ident, host
        self.local_id: int | None = None    # the identifier on the LAN, once a socket is bound
        self.last = now
        self.sock: socket.socket | None = None


class EchoTable:
    """Echo flows and requests in flight; addresses are packed (4 bytes)."""

    def __init__(self) -> None:
        self.flows: dict[tuple[bytes, int, bytes], EchoFlow] = {}
        self.by_local: dict[tuple[bytes, int], EchoFlow] = {}
        # (host, local id, seq) -> (deadline, member), oldest first (the timeout is constant)
        self.pending: OrderedDict[tuple[bytes, int, int], tuple[float, bytes]] = OrderedDict()
        self.flow_share = FairShare(MAX_FLOWS)
        self.pending_share = FairShare(MAX_OUTSTANDING)
        self.stats = {"requests": 0, "replies": 0, "dropped": 0}
        self.evicted: list[EchoFlow] = []   # flows given up to another member (their sockets are the caller's)

    def flow(self, member: bytes, ident: int, host: bytes, now: float) -> tuple[EchoFlow | None, bool]:
        """The flow of this request (and whether it is new); None when ``MAX_FLOWS`` are busy and
        this member holds its share of them."""
        key = (member, ident, host)
        f = self.flows.get(key)
        if f is not None:
            f.last = now
            return f, False
        if len(self.flows) >= MAX_FLOWS:
            self.evicted.extend(self.expire(now))
        ok, victim = self.flow_share.room_for(member)
        if not ok:
            self.stats["dropped"] += 1
            return None, False
        if victim is not None:   # the member holding the most gives up its least recently used flow
            old = min((g for g in self.flows.values() if g.member == victim), key=lambda g: g.last)
            self.remove(old)
            self.evicted.append(old)
        f = self.flows[key] = EchoFlow(member, ident, host, now)
        self.flow_share.add(member)
        return f, True

    def bind(self, f: EchoFlow, local_id: int) -> None:
        f.local_id = local_id
        self.by_local[(f.host, local_id)] = f

    def free_id(self, host: bytes) -> int:
        """An identifier no flow toward ``host`` uses (raw-socket mode picks its own)."""
        while True:
            i = int.from_bytes(os.urandom(2), "big")
            if (host, i) not in self.by_local:
                return i

    def sent(self, f: EchoFlow, seq: int, now: float) -> bool:
        """Record a request about to be sent; False (drop it) when ``MAX_OUTSTANDING`` are in
        flight and this member holds its share of them."""
        self._expire_pending(now)
        key = (f.host, f.local_id, seq)
        self._forget(key)
        ok, victim = self.pending_share.room_for(f.member)
        if not ok:
            self.stats["dropped"] += 1
            return False
        if victim is not None:   # the oldest request of the member holding the most is given up
            self._forget(next(k for k, (_, m) in self.pending.items() if m == victim))
        self.pending[key] = (now + ECHO_TIMEOUT, f.member)
        self.pending_share.add(f.member)
        self.stats["requests"] += 1
        return True

    def reply(self, host: bytes, local_id: int, seq: int, data: bytes, now: float) -> bytes | None:
        """The member's echo reply (an IPv4 packet) for a LAN host's reply, or None if nobody waits."""
        self._expire_pending(now)
        if not self._forget((host, local_id, seq)):
            return None
        f = self.by_local.get((host, local_id))
        if f is None:
            return None
        f.last = now
        self.stats["replies"] += 1
        return build_ipv4(host, f.member, PROTO_ICMP, build_icmp(ICMP_ECHO_REPLY, 0, f.ident << 16 | seq, data))

    def _forget(self, key: tuple[bytes, int, int]) -> bool:
        hit = self.pending.pop(key, None)
        if hit is None:
            return False
        self.pending_share.remove(hit[1])
        return True

    def _expire_pending(self, now: float) -> None:
        p = self.pending
        while p:
            key, (deadline, member) = next(iter(p.items()))
            if deadline > now:
                break
            del p[key]
            self.pending_share.remove(member)

    def expire(self, now: float) -> list[EchoFlow]:
        """Forget flows idle for ``FLOW_IDLE``; returns them (their sockets are the caller's)."""
        self._expire_pending(now)
        gone = [f for f in self.flows.values() if now - f.last > FLOW_IDLE]
        for f in gone:
            self.remove(f)
        return gone

    def remove(self, f: EchoFlow) -> None:
        if self.flows.pop((f.member, f.ident, f.host), None) is not None:
            self.flow_share.remove(f.member)
        if f.local_id is not None:
            self.by_local.pop((f.host, f.local_id), None)


class IcmpEcho:
    """Sockets for ``EchoTable``: ping sockets per flow, else one raw socket, else nothing."""

    def __init__(self, send_packets: Callable[[list[bytes]], None]):
        self._send = send_packets
        self.table = EchoTable()
        self.mode: str | None = None       # PING, RAW, or None (not possible, or not tried yet)
        self._tried_at = float("-inf")
        self._raw: socket.socket | None = None
        self._warn = LogLimiter(rate=1 / 600, burst=1)   # one line, then at most one per 10 min
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swept = float("-inf")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def summary(self) -> str | None:
        return self.mode

    # ------------------------------------------------------------------ sockets
    def _choose(self, now: float) -> str | None:
        if self.mode is not None or now - self._tried_at < RETRY:
            return self.mode
        self._tried_at = now
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
            self.mode = PING
        except OSError as ping_err:
            try:
                raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            except OSError:
                self._warn.log(log, logging.WARNING, "gateway: members' pings to LAN hosts go unanswered: "
                               "no ICMP socket (ping socket: %s; raw socket: no CAP_NET_RAW). To fix, %s",
                               ping_err.strerror or ping_err, FIX)
                return None
            raw.setblocking(False)
            self._raw = raw
            self.loop.add_reader(raw.fileno(), self._on_raw)
            self.mode = RAW
        log.info("gateway: ICMP echo to LAN hosts through a %s", self.mode)
        return self.mode

    def _open_ping(self, f: EchoFlow) -> bool:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        except OSError as e:     # the sysctl changed back, or out of descriptors
            self._warn.log(log, logging.WARNING, "gateway: cannot open a ping socket (%s). To fix, %s",
                           e.strerror or e, FIX)
            return False
        try:
            s.setblocking(False)
            s.connect((socket.inet_ntoa(f.host), 0))   # only this host's replies; binds an identifier
            local_id = s.getsockname()[1]
        except OSError:
            s.close()
            return False
        f.sock = s
        self.table.bind(f, local_id)
        self.loop.add_reader(s.fileno(), self._on_ping, f)
        return True

    def _close_flow(self, f: EchoFlow) -> None:
        if f.sock is not None:
            try:
                self.loop.remove_reader(f.sock.fileno())
            except (ValueError, RuntimeError):
                pass
            f.sock.close()
            f.sock = None

    # ------------------------------------------------------------------ requests from members
    def request(self, member: bytes, host: bytes, ident: int, seq: int, data: bytes, now: float) -> None:
        mode = self._choose(now)
        if mode is None:
            self.table.stats["dropped"] += 1
            return
        f, new = self.table.flow(member, ident, host, now)
        if self.table.evicted:
            for g in self.table.evicted:
                self._close_flow(g)
            self.table.evicted.clear()
        if f is None:
            return
        if new:
            if mode == PING:
                if not self._open_ping(f):
                    self.table.remove(f)
                    self.table.stats["dropped"] += 1
                    return
            else:
                self.table.bind(f, self.table.free_id(host))
        if not self.table.sent(f, seq, now):
            return
        msg = build_icmp(ICMP_ECHO_REQUEST, 0, f.local_id << 16 | seq, data)
        try:
            if mode == PING:
                f.sock.send(msg)
            else:
                self._raw.sendto(msg, (socket.inet_ntoa(host), 0))
        except OSError:
            self.table.stats["dropped"] += 1   # unreachable, buffer full: like a lost ping

    # ------------------------------------------------------------------ replies from the LAN
    def _on_ping(self, f: EchoFlow) -> None:
        """Readable ping socket: each datagram is an ICMP message (no IP header)."""
        now = self.loop.time()
        out = []
        for _ in range(64):
            try:
                msg = f.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue   # a queued error (unreachable): the member's ping just times out
            if len(msg) >= 8 and msg[0] == ICMP_ECHO_REPLY:
                pkt = self.table.reply(f.host, f.local_id, int.from_bytes(msg[6:8], "big"), msg[8:], now)
                if pkt is not None:
                    out.append(pkt)
        if out:
            self._send(out)

    def _on_raw(self) -> None:
        """Readable raw socket: every ICMP packet this host receives, with its IP header."""
        now = self.loop.time()
        out = []
        for _ in range(64):
            try:
                pkt = self._raw.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if len(pkt) < ihl + 8 or pkt[ihl] != ICMP_ECHO_REPLY:
                continue
            reply = self.table.reply(pkt[12:16], int.from_bytes(pkt[ihl + 4:ihl + 6], "big"),
                                     int.from_bytes(pkt[ihl + 6:ihl + 8], "big"), pkt[ihl + 8:], now)
            if reply is not None:
                out.append(reply)
        if out:
            self._send(out)

    # ------------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> None:
        if now - self._swept < 1.0:     # called per batch of packets: sweep at most once a second
            return
        self._swept = now
        for f in self.table.expire(now):
            self._close_flow(f)

    def close(self) -> None:
        for f in list(self.table.flows.values()):
            self._close_flow(f)
            self.table.remove(f)
        if self._raw is not None:
            try:
                self.loop.remove_reader(self._raw.fileno())
            except (ValueError, RuntimeError):
                pass
            self._raw.close()
            self._raw = None

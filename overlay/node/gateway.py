"""A userspace gateway: members reach hosts of this machine's LAN through it, no admin rights.

Packets from a member to an address inside one of this node's approved routes (``overlay up
--advertise-routes``, approved by the network's owner) arrive here from the data plane:

- TCP ends in a userspace stack that answers for that LAN address (one small ``Stack`` per
  destination, listening on every port, created on the first SYN, dropped when idle): each SYN
  first opens an ordinary OS socket to the LAN host; only when that connects does the member's
  handshake complete, otherwise the member gets at once ICMP port unreachable ("refused") when
  the LAN host refused, time exceeded when it did not answer in ``LAN_DIAL_TIMEOUT``, host
  unreachable when the gateway's kernel says so, administratively prohibited when busy.
- UDP datagrams go out of an ordinary OS socket per flow (member address and port, LAN host and
  port); replies come back as IPv4/UDP packets from the LAN address. Idle flows expire.
- ICMP echo requests go out of the gateway's own ICMP sockets and the LAN host's replies come
  back as echo replies from its address (``overlay.node.gateway_icmp``: ping sockets when
  ``net.ipv4.ping_group_range`` allows them, else a raw socket with CAP_NET_RAW, else unanswered
  with one log line naming the fix).
- Everything else (other protocols, destinations outside the approved routes, members of
  networks where the route is not approved) is dropped and logged (rate-limited): the member's own
  dialer refuses such destinations before sending anything, with a message naming the reason.

Everything is bounded: ``MAX_DESTINATIONS`` stacks, ``MAX_DIALS`` TCP dials to the LAN in flight,
``MAX_UDP_FLOWS`` flows, the echo limits of ``gateway_icmp``; the dials, the UDP flows and the echo
tables are shared fairly between members (``overlay.node.fair_share``): one member flooding them
only takes room from itself once another member needs some.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container
from typing import Callable

from overlay.netstack.asyncio_glue import REFUSE_BUSY, REFUSE_TIMED_OUT, REFUSE_UNREACHABLE, StackDriver
from overlay.netstack.stack import Stack
from overlay.netstack.tcp import TcpConfig
from overlay.netstack.wire import (ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_TCP, PROTO_UDP, WireError, build_ipv4,
                                   build_udp, ip_to_bytes, ip_to_str, parse_ipv4, parse_udp)
from overlay.node.approved_routes import ApprovedRoutes
from overlay.node.fair_share import FairShare
from overlay.node.gateway_icmp import IcmpEcho
from overlay.proxy.relay import relay
from overlay.ratelog import LogLimiter

log = logging.getLogger("overlay.gateway")

MAX_DESTINATIONS = 64       # LAN hosts with a stack at once
MAX_UDP_FLOWS = 256
MAX_DIALS = 128             # TCP connections to LAN hosts being opened at once (one OS socket each)
STACK_IDLE = 60.0           # a destination's stack without connections is dropped after this
UDP_IDLE = 120.0
LAN_DIAL_TIMEOUT = 3.0      # below the member's first SYN retransmissions adding up to its dial timeout
TCP_IDLE = 3600.0
TCP_BUFFER = 1 << 20


class Gateway:
    def __init__(self, send_packets: Callable[[list[bytes]], None], *, mtu: int,
                 open_connection=asyncio.open_connection, checksum_free: Container[bytes] = frozenset()):
        self._send = send_packets
        self._mtu = mtu
        self.checksum_free = checksum_free   # members whose TCP/UDP checksums may stay 0 (Stack.checksum_free)
        self._open = open_connection
        self.routes = ApprovedRoutes()   # approved route -> the members it is approved for
        self._stacks: dict[str, tuple[StackDriver, list[float]]] = {}
        self._udp: dict[tuple[str, int, str, int], tuple[asyncio.DatagramTransport, list[float]]] = {}
        self._udp_share = FairShare(MAX_UDP_FLOWS)
        self._dials: dict[str, list[asyncio.Task]] = {}    # member -> its dials to the LAN in flight, oldest first
        self._dial_share = FairShare(MAX_DIALS)
        self._refused = LogLimiter()   # a member cannot flood the log
        self.icmp = IcmpEcho(send_packets)
        self.stats = {"tcp_streams": 0, "udp_flows": 0, "refused": 0, "lan_refused": 0, "busy": 0}
        self.closed = False

    # ------------------------------------------------------------------ configuration
    def set_routes(self, routes: list[tuple[str, set[str]]]) -> None:
        """(approved route, member virtual IPs it serves) pairs; connections already open stay."""
        self.routes.set(routes)

    @property
    def active(self) -> bool:
        return bool(self.routes)

    # ------------------------------------------------------------------ packets from members
    def deliver(self, packets: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for pkt in packets:
            try:
                ip = parse_ipv4(pkt, False)
            except WireError:
                continue
            if ip.frag or not self.routes.permits(ip.src, ip.dst) or ip.proto not in (PROTO_TCP, PROTO_UDP,
                                                                                        PROTO_ICMP):
                src, dst = ip_to_str(ip.src), ip_to_str(ip.dst)
                self.stats["refused"] += 1
                self._refused.log(log, logging.INFO, "refused %s -> %s (protocol %d): not in this gateway's approved "
                                  "routes for that member (overlay admin routes NET)", src, dst, ip.proto)
                continue
            if ip.proto == PROTO_TCP:
                driver = self._stack_for(ip_to_str(ip.dst), now)
                if driver is not None:
                    driver.receive_packet(pkt)
            elif ip.proto == PROTO_ICMP:
                p = ip.payload
                if len(p) >= 8 and p[0] == ICMP_ECHO_REQUEST:   # other ICMP from members: nothing to do
                    self.icmp.request(ip.src, ip.dst, p[4] << 8 | p[5], p[6] << 8 | p[7], p[8:], now)
            else:
                try:
                    dgram = parse_udp(ip, False)
                except WireError:
                    continue
                self._udp_out(ip_to_str(ip.src), dgram.src_port, ip_to_str(ip.dst), dgram.dst_port, dgram.data, now)
        self._expire(now)

    # ------------------------------------------------------------------ TCP
    def _stack_for(self, dst: str, now: float) -> StackDriver | None:
        hit = self._stacks.get(dst)
        if hit is not None:
            hit[1][0] = now
            return hit[0]
        if len(self._stacks) >= MAX_DESTINATIONS:
            self._expire(now, force=True)
            if len(self._stacks) >= MAX_DESTINATIONS:
                self._refused.log(log, logging.WARNING, "gateway: %d LAN hosts busy at once: %s dropped",
                                  MAX_DESTINATIONS, dst)
                return None
        stack = Stack(dst, mtu=self._mtu, now=now, verify_checksums=False, checksum_free=self.checksum_free,
                      tcp=TcpConfig(send_buffer=TCP_BUFFER, recv_buffer=TCP_BUFFER))
        driver = StackDriver(stack, lambda p: self._send([p]), send_packets=self._send)

        async def prepare(remote: tuple[str, int], port: int):
            task = self._dial(remote[0], dst, port)
            if task is None:
                return REFUSE_BUSY
            try:
                done, _ = await asyncio.wait((task,), timeout=LAN_DIAL_TIMEOUT)
            finally:
                if not task.done():
                    task.cancel()
            if not done:
                e, answer = None, REFUSE_TIMED_OUT
            elif task.cancelled():    # given up to another member's dial
                e, answer = None, REFUSE_BUSY
            else:
                e = task.exception()
                if e is None:
                    return task.result()
                answer = None if isinstance(e, ConnectionRefusedError) else REFUSE_UNREACHABLE
            self.stats["lan_refused"] += 1
            self._refused.log(log, logging.INFO, "gateway: %s -> %s:%d: %s", remote[0], dst, port,
                              getattr(e, "strerror", None) or ("timed out" if answer is REFUSE_TIMED_OUT else
                                                               "busy" if answer is REFUSE_BUSY else e))
            return answer

        async def handle(reader, writer, pair) -> None:
            self.stats["tcp_streams"] += 1
            await relay(reader, writer, pair[0], pair[1], TCP_IDLE)

        driver.listen_any(handle, prepare=prepare, discard=lambda pair: pair[1].close())
        self._stacks[dst] = (driver, [now])
        return driver

    def _dial(self, member: str, dst: str, port: int) -> asyncio.Task | None:
        """Start opening an OS connection to the LAN host for ``member`` (None: it holds its share
        of ``MAX_DIALS`` already); a member holding more makes room by giving up its oldest dial."""
        ok, victim = self._dial_share.room_for(member)
        if not ok:
            self.stats["busy"] += 1
            self._refused.log(log, logging.WARNING, "gateway: %d dials to the LAN in flight, %s holds its share: "
                              "%s:%d refused", MAX_DIALS, member, dst, port)
            return None
        if victim is not None:
            self._forget_dial(victim, self._dials[victim][0]).cancel()
        task = asyncio.get_running_loop().create_task(self._open(dst, port))
        self._dials.setdefault(member, []).append(task)
        self._dial_share.add(member)
        task.add_done_callback(lambda t: self._forget_dial(member, t))
        return task

    def _forget_dial(self, member: str, task: asyncio.Task) -> asyncio.Task:
        mine = self._dials.get(member)
        if mine is not None and task in mine:
            mine.remove(task)
            if not mine:
                del self._dials[member]
            self._dial_share.remove(member)
        return task

    # ------------------------------------------------------------------ UDP
    def _udp_out(self, src: str, sport: int, dst: str, dport: int, data: bytes, now: float) -> None:
        key = (src, sport, dst, dport)
        flow = self._udp.get(key)
        if flow is None:
            if len(self._udp) >= MAX_UDP_FLOWS:
                self._expire(now, force=True)
            ok, victim = self._udp_share.room_for(src)
            if not ok:
                self.stats["busy"] += 1
                return
            if victim is not None:   # the member holding the most flows gives up its least recently used
                self._drop_udp(min((k for k in self._udp if k[0] == victim), key=lambda k: self._udp[k][1][0]))
            loop = asyncio.get_running_loop()
            seen = [now]
            back = _UdpBack(self, key, seen)
            self._udp[key] = (None, seen)      # datagrams arriving while the socket opens are dropped
            self._udp_share.add(src)
            self.stats["udp_flows"] += 1

            async def open_flow():
                try:
                    tr, _ = await loop.create_datagram_endpoint(lambda: back, remote_addr=(dst, dport))
                except OSError as e:
                    self._refused.log(log, logging.INFO, "gateway: udp %s -> %s:%d: %s", src, dst, dport, e.strerror or e)
                    if self._udp.get(key, (None, None))[1] is seen:
                        self._drop_udp(key)
                    return
                if self.closed or self._udp.get(key, (None, None))[1] is not seen:
                    tr.close()     # closed, expired or given up meanwhile
                    return
                self._udp[key] = (tr, seen)
                tr.sendto(data)
            loop.create_task(open_flow())
            return
        tr, seen = flow
        seen[0] = now
        if tr is not None:
            tr.sendto(data)

    def _drop_udp(self, key: tuple[str, int, str, int]) -> None:
        tr, _ = self._udp.pop(key)
        self._udp_share.remove(key[0])
        if tr is not None:
            tr.close()

    def _udp_back(self, key: tuple[str, int, str, int], data: bytes) -> None:
        src, sport, dst, dport = key
        to = ip_to_bytes(src)
        payload = build_udp(ip_to_bytes(dst), to, dport, sport, data, to not in self.checksum_free)
        if 20 + len(payload) > self._mtu:
            return   # no fragmentation toward members here: LAN services answer in small datagrams
        self._send([build_ipv4(ip_to_bytes(dst), ip_to_bytes(src), PROTO_UDP, payload)])

    # ------------------------------------------------------------------ housekeeping
    def _expire(self, now: float, force: bool = False) -> None:
        self.icmp.expire(now)
        for dst, (driver, seen) in list(self._stacks.items()):
            if not driver.stack.connections and (force or now - seen[0] > STACK_IDLE):
                driver.close()
                del self._stacks[dst]
        for key, (tr, seen) in list(self._udp.items()):
            if now - seen[0] > (UDP_IDLE / 4 if force else UDP_IDLE):
                self._drop_udp(key)

    def close(self) -> None:
        self.closed = True
        self.icmp.close()
        for driver, _ in self._stacks.values():
            driver.close()
        self._stacks.clear()
        for key in list(self._udp):
            self._drop_udp(key)
        for tasks in list(self._dials.values()):
            for t in list(tasks):
                t.cancel()


class _UdpBack(asyncio.DatagramProtocol):
    def __init__(self, gw: Gateway, key, seen: list[float]):
        self.gw, self.key, self.seen = gw, key, seen

    def datagram_received(self, data: bytes, addr) -> None:
        self.seen[0] = asyncio.get_running_loop().time()
        self.gw._udp_back(self.key, data)

    def error_received(self, exc) -> None:
        pass

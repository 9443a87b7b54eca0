"""The data plane's path to the mediation server: relay registration, relay framing, STUN probing.

Registration (``frames.register``, answered by REGISTERED) doubles as the NAT keepalive toward the
server; the server's CHALLENGE binds it to our address. While registered, packets for a peer on
the relay go over UDP in relay frames; otherwise over the control connection (TCP). The NAT probe
(``nat.classify.NatProbe``) against the server's STUN ports learns our server-reflexive address
and the NAT's mapping behaviour, again every ``REPROBE_INTERVAL``.

A peer online on another instance of our server's deployment (several servers on one PostgreSQL)
comes with that instance's relay address (its member record's ``relay``). Each such pair relays
through one instance, by a rule both ends apply alike: the instance of the node with the smaller
public key. The node with the smaller key sends as always, to its own server; the other registers
at the peer's instance too (a second registration, with the same token: the relay secret derives
from the deployment's key; kept alive like the first, only while a peer needs it) and sends its
relay frames for that peer there (``via``). Registration there needs UDP; relay over the control
connection stays with one's own server, so the smaller-key node may be the one without UDP.

Sans-I/O apart from the callables it is given: datagrams go to ``out`` (the data plane's queue),
relay-over-TCP messages to ``send_control``; ``on_public`` runs when our public address changed.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from collections.abc import Callable

from overlay.nat.candidate import format_addr
from overlay.nat.classify import SEQUENTIAL, NatProbe, NatReport
from overlay.relay import frames

log = logging.getLogger("overlay.dataplane")

REGISTER_INTERVAL = 10.0      # relay registration doubles as the NAT keepalive toward the server
REGISTER_TIMEOUT = 3.0        # no REGISTERED after this: UDP to the server looks blocked
REPROBE_INTERVAL = 120.0      # refresh the server-reflexive address and NAT classification
MAX_FOREIGN = 16              # other instances' relays registered at, at most


def relays_through_peer(own_key: bytes, peer_key: bytes) -> bool:
    """The pair rule for two nodes on different server instances: they relay through the instance
    of the node with the smaller public key; True when that is the peer's (we are the larger)."""
    return own_key > peer_key


class ForeignRelay:
    """Our registration at another instance's relay (its nonce, acknowledgement, keepalive)."""

    __slots__ = ("addr", "nonce", "ok", "sent", "acked", "challenged")

    def __init__(self, addr: tuple[str, int]):
        self.addr = addr
        self.nonce = frames.NO_NONCE
        self.ok = False               # the relay acknowledged our registration
        self.sent = float("-inf")
        self.acked = float("-inf")
        self.challenged = float("-inf")

    def next_register(self) -> float:
        return self.sent + (REGISTER_INTERVAL if self.ok else 1.0)


class ServerPath:
    def __init__(self, public_key: bytes, *, now: Callable[[], float], out: list,
                 schedule_flush: Callable[[], None], send_control: Callable[[dict], None],
                 on_public: Callable[[], None], stats: dict[str, int]):
        self.public_key = public_key
        self.now, self.out, self.schedule_flush = now, out, schedule_flush
        self.send_control, self.on_public, self.stats = send_control, on_public, stats
        self.server_udp: tuple[str, int] | None = None
        self.server_is_loopback = False
        self.udp_token: bytes | None = None
        self.relay_nonce = frames.NO_NONCE     # from the server's CHALLENGE: binds REGISTER to our address
        self.challenged_at = float("-inf")
        self.udp_ok = False           # the server acknowledged our registration
        self.srflx: tuple[str, int] | None = None
        self.registered_at = float("-inf")
        self.register_sent = float("-inf")
        self.probe: NatProbe | None = None
        self.probe_servers: list[tuple[str, int]] = []
        self.next_probe: float | None = None
        self.nat: NatReport | None = None
        self.server_rtt: float | None = None
        self.probe_waiters: list[asyncio.Future] = []
        self.foreign: dict[tuple[str, int], ForeignRelay] = {}   # other instances' relays we register at
        self.via: dict[bytes, tuple[str, int]] = {}              # peer key -> the foreign relay for it

    # ------------------------------------------------------------------ configuration
    def resolve(self, host: str, udp_port: int) -> str | None:
        """The server's UDP address (IPv4 preferred), or None (logged) when ``host`` does not resolve."""
        try:
            infos = socket.getaddrinfo(host, udp_port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except socket.gaierror as e:
            log.warning("cannot resolve server %s for UDP: %s", host, e)
            return None
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        ip = v4[0] if v4 else infos[0][4][0]
        if self.server_udp is not None and self.server_udp != (ip, udp_port):
            self.udp_ok = False       # another server (of the list): relay over TCP until it acknowledges us
        self.server_udp = (ip, udp_port)
        self.server_is_loopback = ipaddress.ip_address(ip).is_loopback
        return ip

    def set_token(self, token: bytes) -> None:
        self.udp_token = token
        self.relay_nonce = frames.NO_NONCE
        self.register_sent = float("-inf")
        for f in self.foreign.values():
            f.nonce, f.sent = frames.NO_NONCE, float("-inf")

    def set_peer_relays(self, relays: dict[bytes, tuple[str, int]]) -> None:
        """``relays``: peer key -> the relay of the other instance that peer is online on. Keeps
        ``via`` (the peers whose pair relays through their instance: ``relays_through_peer``) and a
        registration at each relay some peer needs, and drops the others."""
        via: dict[bytes, tuple[str, int]] = {}
        needed: set[tuple[str, int]] = set()
        for key, addr in relays.items():
            if addr == self.server_udp or not relays_through_peer(self.public_key, key):
                continue
            if not self.server_is_loopback and ipaddress.ip_address(addr[0]).is_loopback:
                continue    # where that node reached its server (on the server's machine), not for us
            if addr not in needed and len(needed) >= MAX_FOREIGN:
                continue
            needed.add(addr)
            via[key] = addr
        for addr in [a for a in self.foreign if a not in needed]:
            del self.foreign[addr]
        for addr in needed:
            if addr not in self.foreign:
                self.foreign[addr] = ForeignRelay(addr)
                log.info("a peer is on another server instance: registering at its relay %s", format_addr(addr))
        self.via = via

    def set_probe_servers(self, ip: str, udp_port: int, stun_ports: list[int] | None,
                          stun_alt_ip: str | None) -> None:
        servers = [(ip, p) for p in (stun_ports or [udp_port])]
        if stun_alt_ip and (":" in stun_alt_ip) == (":" in ip):
            servers.append((stun_alt_ip, udp_port))
        self.probe_servers = servers[:8]

    # ------------------------------------------------------------------ STUN probing
    def start_probe(self, loop: asyncio.AbstractEventLoop, local: Callable[[], tuple[str, int]]
                    ) -> tuple[asyncio.Future, bool]:
        """A future for the next NAT report, and whether a new probe started (then the caller runs
        the timers at once so that its first requests leave)."""
        fut = loop.create_future()
        if not self.probe_servers:
            fut.set_result(None)
            return fut, False
        self.probe_waiters.append(fut)
        if self.probe is None or self.probe.done:
            self.probe = NatProbe(local(), self.probe_servers, self.now(), rto=0.3, rc=4, rm=4)
            self.next_probe = None
            return fut, True
        return fut, False

    def stun_receive(self, data: bytes, addr: tuple[str, int], now: float) -> bool:
        """A STUN datagram: True if it answered our probe."""
        probe = self.probe
        if probe is not None and probe.receive(data, addr, now):
            if probe.done:
                self._probe_finished()
            return True
        return False

    def probe_tick(self, now: float) -> None:
        probe = self.probe
        if probe is not None:
            t = probe.get_timer()
            if t is not None and t <= now:
                probe.handle_timer(now)
            self.out.extend(probe.datagrams_to_send(now))
            if probe.done:
                self._probe_finished()

    def _probe_finished(self) -> None:
        probe, self.probe = self.probe, None
        report = probe.report()
        self.nat = report
        self.server_rtt = probe.rtt
        self.next_probe = self.now() + REPROBE_INTERVAL
        for fut in self.probe_waiters:
            if not fut.done():
                fut.set_result(report)
        self.probe_waiters.clear()
        if not report.udp:
            log.warning("no STUN answer from the server: UDP looks blocked")
            return
        if report.public != self.srflx:
            self.srflx = report.public
            log.info("server sees this node at %s (NAT mapping %s%s)", format_addr(report.public),
                     report.mapping, f", {report.allocation.lower()} ports" if report.allocation else "")
            self.on_public()

    def nat_summary(self) -> dict:
        n = self.nat
        if n is None:
            return {}
        return {"udp": n.udp, "public": format_addr(n.public) if n.public else None,
                "behind_nat": n.behind_nat, "mapping": n.mapping,
                "varies_by_destination": n.varies_by_destination, "allocation": n.allocation,
                "sequential": n.allocation == SEQUENTIAL if n.allocation else None,
                "port_delta": n.delta if n.allocation == SEQUENTIAL else None,
                "port_preserved": n.port_preserved,
                "server_rtt_ms": self.server_rtt * 1000 if self.server_rtt is not None else None}

    # ------------------------------------------------------------------ relay
    def relay_receive(self, data: bytes, addr) -> tuple[bytes, bytes] | None:
        """A relay frame from the server (or another instance's relay we registered at): (peer key,
        WireGuard packet) for relayed data, else None (registration and challenges are handled here)."""
        if (addr[0], addr[1]) != self.server_udp:
            f = self.foreign.get((addr[0], addr[1]))
            if f is None:
                self.stats["not_ours"] += 1
                return None
            return self._foreign_receive(f, data)
        try:
            t, key, rest = frames.parse(data)
        except frames.FrameError:
            self.stats["not_ours"] += 1
            return None
        if t == frames.DATA:
            return key, rest
        if t == frames.REGISTERED:
            if not self.udp_ok:
                log.info("relay registration acknowledged: UDP to the server works")
            self.udp_ok = True
            self.registered_at = self.now()
        elif t == frames.REFUSED:
            log.debug("relay refused a packet for %s: %s", base64.b64encode(key).decode(),
                      frames.REASONS.get(rest[0], "?"))
        elif t == frames.CHALLENGE and self.udp_token is not None:
            self.relay_nonce = rest
            now = self.now()
            if now - self.challenged_at >= 1.0:     # answered at once, but at most once a second
                self.challenged_at = self.register_sent = now
                self.out.append((frames.register(self.public_key, self.udp_token, rest), self.server_udp))
                self.schedule_flush()
        return None

    def _foreign_receive(self, f: ForeignRelay, data: bytes) -> tuple[bytes, bytes] | None:
        try:
            t, key, rest = frames.parse(data)
        except frames.FrameError:
            self.stats["not_ours"] += 1
            return None
        if t == frames.DATA:
            return key, rest
        if t == frames.REGISTERED:
            if not f.ok:
                log.info("registered at the relay of another server instance, %s", format_addr(f.addr))
            f.ok, f.acked = True, self.now()
        elif t == frames.CHALLENGE and self.udp_token is not None:
            f.nonce = rest
            now = self.now()
            if now - f.challenged >= 1.0:           # answered at once, but at most once a second
                f.challenged = f.sent = now
                self.out.append((frames.register(self.public_key, self.udp_token, rest), f.addr))
                self.schedule_flush()
        return None

    def relay_send(self, key: bytes, data: bytes, batch: list) -> None:
        """A WireGuard packet for the peer ``key`` on the relay: framed into ``batch`` (UDP to the
        server) while registered, else over the control connection; for a peer whose pair relays
        through its own instance (``via``), to that instance's relay once registered there."""
        if self.via and (addr := self.via.get(key)) is not None and self.foreign[addr].ok:
            batch.append((frames.data(key, data), addr))
            return
        if self.udp_ok and self.server_udp:
            batch.append((frames.data(key, data), self.server_udp))
        else:
            self.stats["relay_tcp_tx"] += 1
            self.send_control({"t": "relay", "id": 0, "to": base64.b64encode(key).decode(),
                               "data": base64.b64encode(data).decode()})

    @staticmethod
    def relay_from_tcp(ev: dict) -> tuple[bytes, bytes] | None:
        """(sender key, WireGuard packet) of a relayed packet that came over the control connection."""
        try:
            return base64.b64decode(ev["from"]), base64.b64decode(ev["data"])
        except (KeyError, ValueError):
            return None

    # ------------------------------------------------------------------ registration
    def next_register(self) -> float | None:
        if self.server_udp is None or self.udp_token is None:
            return None
        at = self.register_sent + (REGISTER_INTERVAL if self.udp_ok else 1.0)
        for f in self.foreign.values():
            at = min(at, f.next_register())
        return at

    def register_tick(self, now: float) -> None:
        if self.server_udp is None or self.udp_token is None:
            return
        if self.register_sent + (REGISTER_INTERVAL if self.udp_ok else 1.0) <= now:
            if self.udp_ok and now - self.registered_at > REGISTER_INTERVAL + REGISTER_TIMEOUT:
                log.warning("relay registration unanswered: using the control connection for relay")
                self.udp_ok = False
            self.register_sent = now
            self.out.append((frames.register(self.public_key, self.udp_token, self.relay_nonce), self.server_udp))
        for f in self.foreign.values():
            if f.next_register() <= now:
                if f.ok and now - f.acked > REGISTER_INTERVAL + REGISTER_TIMEOUT:
                    log.warning("registration at the relay %s unanswered", format_addr(f.addr))
                    f.ok = False
                f.sent = now
                self.out.append((frames.register(self.public_key, self.udp_token, f.nonce), f.addr))

    def foreign_summary(self) -> list[dict]:
        """Other instances' relays we register at (``status``: ``udp.relays``)."""
        return [{"address": format_addr(f.addr), "registered": f.ok,
                 "peers": sum(1 for a in self.via.values() if a == f.addr)} for f in self.foreign.values()]

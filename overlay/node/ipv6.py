"""The node's IPv6 side (``Ipv6Side``, driven by the data plane): its IPv6 UDP socket, its global
addresses (path candidates, read from Linux's ``/proc/net/if_inet6``) and STUN in the address
family the node does not reach the server with.

IPv6 only ever carries the outer (encrypted) packets: peers still talk inner IPv4 between
virtual IPs. A node offers its global IPv6 addresses as candidates so that two nodes with IPv6
go direct even when both IPv4 NATs are hard (home routers do not NAT IPv6; their stateful
firewall lets a flow in once the inside sent to it, which ordinary punching does).

Which addresses: global unicast only (``candidate.is_global_ipv6``), never link-local, ULA or
deprecated / tentative ones, temporary (privacy) addresses first since the kernel sends from them,
at most ``MAX_ADDRESSES``. ULA is left out on purpose: a ULA is not routed between sites, and two
nodes of one site already meet over their IPv4 LAN addresses, so a ULA probe would only spend the
probe budget. A host without IPv6 (or without a global address) offers none and logs nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from overlay.io.udp import UdpSocket, bind_udp
from overlay.nat import stun
from overlay.nat.candidate import AddressError, Addr, format_addr, is_global_ipv6, parse_addr

log = logging.getLogger("overlay.dataplane")

MAX_ADDRESSES = 3
"""IPv6 interface addresses offered at most (the server takes 16 candidates per node in all)."""
IF_INET6 = "/proc/net/if_inet6"
_TEMPORARY, _DADFAILED, _DEPRECATED, _TENTATIVE = 0x01, 0x08, 0x20, 0x40


def parse_if_inet6(text: str, exclude_ifaces: tuple[str, ...] = ()) -> list[str]:
    """Global IPv6 addresses from ``/proc/net/if_inet6`` text (address, ifindex, prefix length,
    scope, flags, interface name per line, hex), temporary ones first, in canonical text."""
    temporary, stable = [], []
    for line in text.splitlines():
        f = line.split()
        if len(f) != 6 or len(f[0]) != 32 or f[5] == "lo" or f[5] in exclude_ifaces:
            continue
        try:
            flags = int(f[4], 16)
            packed = bytes.fromhex(f[0])
        except ValueError:
            continue
        if flags & (_DADFAILED | _DEPRECATED | _TENTATIVE):
            continue
        host = socket.inet_ntop(socket.AF_INET6, packed)
        if not is_global_ipv6(host):
            continue
        (temporary if flags & _TEMPORARY else stable).append(host)
    out: list[str] = []
    for host in temporary + stable:
        if host not in out:
            out.append(host)
    return out


def global_addresses(exclude_ifaces: tuple[str, ...] = ()) -> list[str]:
    """This host's global IPv6 addresses (none where IPv6 is off or the file is missing)."""
    try:
        with open(IF_INET6) as f:
            text = f.read()
    except OSError:
        return []
    return parse_if_inet6(text, exclude_ifaces)[:MAX_ADDRESSES]


def open_udp6(port: int) -> socket.socket | None:
    """An IPv6-only UDP socket on ``port`` (the IPv4 socket's number) or, if that is taken, any
    port; None where the host has no IPv6 (quietly: an ordinary host, not an error)."""
    for p in dict.fromkeys((port, 0)):
        try:
            return bind_udp("::", p)
        except OSError as e:
            log.debug("no IPv6 UDP socket on port %d: %s", p, e)
    return None


class Ipv6Side:
    """The data plane's IPv6 half: the IPv6 socket, and STUN to the server's UDP endpoint in the
    other address family than the one the node reaches it with (IPv6 for a node on IPv4, which
    gives its public IPv6 address; IPv4 for a node that reaches the server over IPv6 only). The
    data plane keeps everything else: one device, one path manager per peer, one input path."""

    def __init__(self) -> None:
        self.udp: UdpSocket | None = None
        self.server_other: Addr | None = None
        self.srflx_other: Addr | None = None
        self.changed = False        # srflx_other moved: the owner republishes its candidates
        self._stun: stun.StunTransaction | None = None

    @property
    def port(self) -> int | None:
        return self.udp.local_address[1] if self.udp is not None else None

    def open(self, port: int, on_datagram: Callable[[memoryview, tuple], None], on_batch: Callable[[], None],
             loop: asyncio.AbstractEventLoop) -> None:
        sock = open_udp6(port)
        if sock is None:
            return
        # its 4-tuple addresses become the plain (host, port) the data plane keys on
        self.udp = UdpSocket(sock, lambda view, addr: on_datagram(view, (addr[0], addr[1])),
                             on_batch=on_batch, loop=loop)
        if addrs := global_addresses():
            log.info("IPv6 on UDP port %d (%s)", self.port, ", ".join(addrs))

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()

    def addresses(self, exclude_ifaces: tuple[str, ...] = ()) -> list[str]:
        return global_addresses(exclude_ifaces) if self.udp is not None else []

    def usable(self, server_udp: Addr | None, exclude_ifaces: tuple[str, ...] = ()) -> bool:
        """Worth probing a peer's IPv6 candidates: we have the socket and a global address (or we
        reach the server over IPv6 itself)."""
        return self.udp is not None and bool(
            (server_udp is not None and ":" in server_udp[0]) or global_addresses(exclude_ifaces))

    def set_server(self, host: str, ip: str, port: int, announced: list[str], loopback: bool,
                   exclude_ifaces: tuple[str, ...] = ()) -> None:
        """Pick the server's UDP endpoint in the other family than ``ip``: one it announced, else
        (``host`` a name) its other DNS record; none without a socket or address for that family."""
        self.server_other = None
        want6 = ":" not in ip
        if want6 and (self.udp is None or loopback or not global_addresses(exclude_ifaces)):
            return
        for text in announced:
            try:
                a = parse_addr(text)
            except AddressError:
                continue
            if (":" in a[0]) == want6:
                self.server_other = a
                return
        try:
            ipaddress.ip_address(host)
            return      # an address literal has no records of the other family
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET6 if want6 else socket.AF_INET, socket.SOCK_DGRAM)
        except socket.gaierror:
            return
        if infos:
            self.server_other = (infos[0][4][0], port)

    # ------------------------------------------------------------------ STUN in the other family
    def start_stun(self, now: float) -> list[tuple[bytes, Addr]]:
        if self.server_other is None or (self._stun is not None and not self._stun.done):
            return []
        self._stun = stun.StunTransaction(self.server_other, now, rto=0.3, rc=4, rm=4)
        return self._stun.datagrams_to_send(now)

    def timer(self) -> float | None:
        return self._stun.get_timer() if self._stun is not None else None

    def on_timer(self, now: float) -> list[tuple[bytes, Addr]]:
        tx = self._stun
        if tx is None or tx.done:
            return []
        t = tx.get_timer()
        if t is not None and t <= now:
            tx.handle_timer(now)
        return tx.datagrams_to_send(now)

    def receive_stun(self, data: bytes, addr: Addr, now: float) -> bool:
        """True if ``data`` answered our transaction (``changed`` says whether the address moved)."""
        tx = self._stun
        if tx is None or not tx.receive(data, addr, now):
            return False
        if tx.result is not None and tx.result != self.srflx_other:
            self.srflx_other = tx.result
            self.changed = True
            log.info("server sees this node at %s over IPv%d", format_addr(tx.result), 6 if ":" in tx.result[0] else 4)
        return True

    # ------------------------------------------------------------------ candidates, status, sending
    def candidates(self, exclude_ifaces: tuple[str, ...] = ()) -> list[dict]:
        """Our public address in the other family (STUN), then our global IPv6 interface
        addresses on the IPv6 socket's port (none without IPv6)."""
        out = []
        if self.srflx_other is not None:
            out.append({"addr": format_addr(self.srflx_other), "kind": "srflx"})
        port = self.port
        for a in self.addresses(exclude_ifaces):
            out.append({"addr": format_addr((a, port)), "kind": "lan"})
        return out[:MAX_ADDRESSES + 1]

    def summary(self, server_udp: Addr | None, srflx: Addr | None, exclude_ifaces: tuple[str, ...] = ()) -> dict:
        """For ``status`` / ``netcheck``: socket port, global addresses, the server's IPv6 STUN
        endpoint and what it saw (``server_udp`` / ``srflx``: the data plane's own, which are IPv6
        for a node that reaches the server over IPv6)."""
        v6_primary = server_udp is not None and ":" in server_udp[0]
        server6 = server_udp if v6_primary else self.server_other
        public6 = srflx if v6_primary else self.srflx_other
        return {"port": self.port, "addresses": self.addresses(exclude_ifaces),
                "server": format_addr(server6) if server6 and ":" in server6[0] else None,
                "public": format_addr(public6) if public6 and ":" in public6[0] else None}

    def send_own(self, batch: list[tuple[bytes, Addr]]) -> list[tuple[bytes, Addr]]:
        """Send the IPv6 datagrams of ``batch`` from the IPv6 socket; return the others (the
        socket goes by the address family; one pass over the batch, no copy without IPv6 in it)."""
        if self.udp is None:
            return batch
        v6 = [d for d in batch if ":" in d[1][0]]
        if not v6:
            return batch
        self.udp.send_batch(v6)
        return [d for d in batch if ":" not in d[1][0]]

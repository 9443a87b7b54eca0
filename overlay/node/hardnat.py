"""Punching through hard NATs: one driver interface, two drivers, and what they share.

Ordinary punching (``nat.traversal.PeerPath``) fails when a NAT gives each destination its own
port. Two drivers then try, each on a sans-I/O core:

- ``hardnat_birthday.BirthdayDriver`` (``nat.birthday``): an easy NAT against a random-port
  symmetric one; the hard side opens many sockets, the easy side sprays many ports.
- ``hardnat_sequential.SequentialDriver`` (``nat.seqpunch``): a sequential symmetric NAT against
  another one or an easy one; a fresh socket measures its next port, both sides spray windows.

Both follow ``HardNatDriver``. ``HardNat`` is their one view of the node (the data plane): the
peers' NAT classes from the server's introductions, the peer table, the outgoing queue, sockets of
their own, and the winners: an attempt's socket that received the peer's discovery message
carries everything to that address from then on (``via``, one winner per peer), like the main
socket. The data plane talks to ``HardNat`` only; the drivers never touch the data plane.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from overlay.io.udp import UdpSocket, bind_udp
from overlay.nat import birthday, disco
from overlay.node.hardnat_birthday import BirthdayDriver
from overlay.node.hardnat_sequential import SequentialDriver
from overlay.node.peers import PeerEntry

if TYPE_CHECKING:
    from overlay.nat.classify import NatReport
    from overlay.node.dataplane import DataPlane


@runtime_checkable
class HardNatDriver(Protocol):
    """One way through hard NATs, driven by ``HardNat`` on the loop (all times are the loop's)."""

    def on_punch(self, key: bytes, entry: PeerEntry, nat: dict) -> None:
        """The server introduced us to ``entry`` with its NAT class ``nat``: schedule, join or feed
        an attempt."""

    def on_datagram(self, sock: UdpSocket, view: memoryview, addr) -> None:
        """A datagram on one of the driver's own sockets (a hit adopts the socket: ``HardNat.adopt``)."""

    def timer(self) -> float | None:
        """When ``tick`` is next due, or None."""

    def tick(self, now: float) -> None:
        """Start due attempts and send due probes (cheap when nothing is pending)."""

    def path_changed(self, key: bytes, path) -> None:
        """The peer's path moved (``path`` None: to the relay); a direct one ends an attempt."""

    def forget(self, key: bytes) -> None:
        """The peer left: end its attempt."""

    def advertised(self) -> dict:
        """What this driver adds to the NAT information we publish with our candidates."""

    def close(self) -> None:
        """Close the driver's sockets (the node is stopping)."""

    def stats(self) -> dict:
        """Counters for ``status``."""


class HardNat:
    """The hard-NAT drivers and the node facade they use (see the module doc)."""

    def __init__(self, node: DataPlane, enabled: bool, birthday_config: birthday.BirthdayConfig):
        self.node = node
        self.enabled = enabled
        self.peer_nat: dict[bytes, dict] = {}       # the peers' NAT classes, from the introductions
        self.via: dict[tuple, UdpSocket] = {}       # remote address -> the winning socket toward it
        self.winners: dict[bytes, tuple[tuple, UdpSocket]] = {}
        self.birthday = BirthdayDriver(self, birthday_config)
        self.sequential = SequentialDriver(self)
        self.drivers: tuple[HardNatDriver, ...] = (self.birthday, self.sequential)

    # ------------------------------------------------------------------ for the data plane
    def on_punch(self, key: bytes, entry: PeerEntry, nat: dict) -> None:
        self.peer_nat[key] = nat
        for d in self.drivers:
            d.on_punch(key, entry, nat)

    def timer(self) -> float | None:
        times = [t for d in self.drivers if (t := d.timer()) is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        for d in self.drivers:
            d.tick(now)

    def path_changed(self, key: bytes, path) -> None:
        self.birthday.path_changed(key, path)
        w = self.winners.get(key)
        if w is not None and path != w[0]:
            self.drop_winner(key)
        self.sequential.path_changed(key, path)

    def forget(self, key: bytes) -> None:
        self.birthday.forget(key)
        self.peer_nat.pop(key, None)
        self.drop_winner(key)
        self.sequential.forget(key)

    def advertise(self, nat: dict) -> dict:
        nat["birthday"] = self.enabled     # peers behind the other kind of NAT need not probe in vain
        for d in self.drivers:
            nat.update(d.advertised())
        return nat

    def close(self) -> None:
        for d in self.drivers:
            d.close()
        for key in list(self.winners):
            self.drop_winner(key)

    # ------------------------------------------------------------------ for the drivers
    def now(self) -> float:
        return self.node.now()

    @property
    def public_key(self) -> bytes:
        return self.node.public_key

    @property
    def our_nat(self) -> NatReport | None:
        return self.node.server.nat

    @property
    def stun_servers(self) -> list[tuple[str, int]]:
        return self.node.server.probe_servers

    def peer(self, key: bytes) -> PeerEntry | None:
        return self.node.table.peers.get(key)

    def target(self, entry: PeerEntry) -> tuple | None:
        """The peer's IPv4 server-reflexive address (the easy side's port; the hard side's IP)."""
        for c in entry.path.remote_candidates:
            if c.kind == "srflx" and ":" not in c.addr[0]:
                return c.addr
        return None

    def send(self, items) -> None:
        """Datagrams to leave from the node's main socket at the next flush."""
        self.node._out.extend(items)

    def schedule_flush(self) -> None:
        self.node._schedule_flush()

    def open_socket(self, handler) -> UdpSocket:
        """A fresh UDP socket of the driver's (OSError when none can be had); its datagrams go to
        ``handler(sock, view, addr)``."""
        sock = bind_udp("0.0.0.0", 0, rcvbuf=1 << 16, sndbuf=1 << 16)
        u = UdpSocket(sock, lambda view, addr: None, on_batch=self.node._flush, loop=self.node.loop,
                      gro=False, gso=False)
        u.set_handler(functools.partial(handler, u))
        return u

    def not_ours(self) -> None:
        self.node.stats["not_ours"] += 1

    def disco_from(self, key: bytes, view: memoryview):
        """The discovery message in ``view`` if it opens and comes from peer ``key``, else None
        (counted)."""
        try:
            sender, msg = self.node.disco.open(bytes(view))
        except disco.DiscoError:
            self.node.stats["disco_bad"] += 1
            return None
        if sender != key:
            self.node.stats["not_ours"] += 1
            return None
        return msg

    def adopt(self, key: bytes, src: tuple, sock: UdpSocket) -> None:
        """An attempt's socket got the peer's message from ``src``: from now on it carries
        everything to that address, like the main socket (one winner per peer)."""
        self.drop_winner(key)
        sock.set_handler(self.node._on_datagram)
        self.via[src] = sock
        self.winners[key] = (src, sock)

    def drop_winner(self, key: bytes) -> None:
        w = self.winners.pop(key, None)
        if w is not None:
            self.via.pop(w[0], None)
            w[1].close()

    def deliver(self, entry: PeerEntry, msg, src: tuple, now: float) -> None:
        """The peer's discovery message that hit: to its path (which confirms the new path)."""
        entry.path.receive(msg, src, now)
        self.node._dirty_paths.add(entry)

    def public_known(self) -> bool:
        return bool(self.node.server.srflx) and self.node.loop is not None

    def publish(self) -> None:
        """Send our candidates and NAT information (``advertised``) to the server again."""
        self.node._publish_endpoints()

    def send_control(self, msg: dict) -> None:
        self.node.send_control(msg)

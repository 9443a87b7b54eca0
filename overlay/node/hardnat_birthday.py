"""Birthday punching (``nat.birthday``) as a ``hardnat.HardNatDriver``: an easy NAT against a
random-port symmetric one.

Per peer a ``BirthdayPunch`` planner; an attempt is checked for ``delay`` after an introduction
that tells the peer's NAT class. The easy side sprays discovery pings at many ports of the hard
side's IP from the main socket; the hard side (one attempt per node at a time) opens many sockets
and pings the easy side's server-reflexive address from each. The peer's discovery message on one
of them is a hit: that socket becomes the winner (``HardNat.adopt``) and the others close.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from overlay.io.udp import UdpSocket
from overlay.nat import birthday
from overlay.nat import disco as disco_mod

if TYPE_CHECKING:
    from overlay.node.hardnat import HardNat
    from overlay.node.peers import PeerEntry

log = logging.getLogger("overlay.dataplane")


class BirthdayDriver:
    """Per-peer planners, when to check whether an attempt is wanted, and the extra sockets of
    the one hard-side attempt at a time (``owner``)."""

    def __init__(self, host: HardNat, config: birthday.BirthdayConfig):
        self.host = host
        self.config = config
        self.punches: dict[bytes, birthday.BirthdayPunch] = {}
        self.check: dict[bytes, float] = {}
        self.owner: bytes | None = None
        self.socks: list[UdpSocket] = []

    def role(self, key: bytes) -> str | None:
        n, peer = self.host.our_nat, self.host.peer_nat.get(key, {})
        if n is None or not n.udp or peer.get("birthday") is False:   # the peer opted out
            return None
        return birthday.role(n.mapping, n.allocation, peer.get("mapping"), peer.get("allocation"))

    def on_punch(self, key: bytes, entry: PeerEntry, nat: dict) -> None:
        if self.host.enabled and self.role(key) is not None and entry.path.current_path is None:
            self.check.setdefault(key, self.host.now() + self.config.delay)

    def timer(self) -> float | None:
        times = list(self.check.values())
        times += [t for b in self.punches.values() if (t := b.get_timer()) is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if not (self.check or self.owner is not None or any(
                b.state == birthday.ACTIVE for b in self.punches.values())):
            return
        host = self.host
        for key, at in list(self.check.items()):
            if at > now:
                continue
            del self.check[key]
            entry = host.peer(key)
            if entry is None or entry.path is None or entry.path.current_path is not None or not host.enabled:
                continue   # never while a direct path works
            role = self.role(key)
            if role is None or (target := host.target(entry)) is None:
                continue
            b = self.punches.setdefault(key, birthday.BirthdayPunch(self.config))
            if not b.may_start(now) or (role == birthday.HARD and self.owner is not None):
                continue
            n = b.start(role, target, now)
            if role == birthday.HARD:
                self.owner = key
                self._open_socks(n)
            log.info("birthday punching toward %s as the %s side (%s)", entry.name, role,
                     f"{n} sockets" if n else f"{self.config.probes} probes")
        for key, b in list(self.punches.items()):
            if b.state != birthday.ACTIVE:
                continue
            entry = host.peer(key)
            t = b.get_timer()
            if t is None or t > now or entry is None:
                continue
            due = b.due(now)
            if b.role == birthday.EASY and due:
                dg = entry.path.spray_ping(due[0], now)
                host.send((dg, a) for a in due)
            elif b.role == birthday.HARD and due:
                dg = entry.path.spray_ping(b.target, now)
                for sock in self.socks:
                    sock.send_batch([(dg, b.target)])
            if b.state != birthday.ACTIVE:
                log.info("birthday punching toward %s: no hit after %d probes", entry.name, b.probes_sent)
                if key == self.owner:
                    self.close()

    def _open_socks(self, n: int) -> None:
        for _ in range(n):
            try:
                u = self.host.open_socket(self.on_datagram)
            except OSError as e:    # out of descriptors or ports: go with what we have
                log.warning("birthday punching: %d sockets only (%s)", len(self.socks), e)
                break
            self.socks.append(u)

    def on_datagram(self, sock: UdpSocket, view: memoryview, addr) -> None:
        """A datagram on one of the hard side's extra sockets: only the peer's discovery message from
        the target address counts (a hit); that socket then carries everything to that address."""
        host = self.host
        key = self.owner
        b = self.punches.get(key) if key is not None else None
        src = (addr[0], addr[1])
        if b is None or b.state != birthday.ACTIVE or src != tuple(b.target) or view[:4] != disco_mod.MAGIC:
            host.not_ours()
            return
        entry = host.peer(key)
        if entry is None or (msg := host.disco_from(key, view)) is None:
            return
        self.socks.remove(sock)
        host.adopt(key, src, sock)
        b.hit(host.now())
        log.info("birthday punching toward %s: hit on local port %d after %.2f s", entry.name,
                 sock.sock.getsockname()[1], b.last_time_to_hit)
        self.close()
        host.deliver(entry, msg, src, host.now())

    def path_changed(self, key: bytes, path) -> None:
        b = self.punches.get(key)
        if path is not None and b is not None and b.state == birthday.ACTIVE:
            b.hit(self.host.now())   # direct: this attempt (or ordinary punching) won
            if key == self.owner:
                self.close()

    def forget(self, key: bytes) -> None:
        self.check.pop(key, None)
        b = self.punches.pop(key, None)
        if b is not None:
            b.abort(self.host.now())
        if key == self.owner:
            self.close()

    def advertised(self) -> dict:
        return {}

    def close(self) -> None:
        """End the hard-side attempt's sockets (all but a winner, already handed over)."""
        socks, self.socks = self.socks, []
        self.owner = None
        for s in socks:
            s.close()

    def stats(self) -> dict:
        out = {"enabled": self.host.enabled, "attempts": 0, "hits": 0, "probes": 0, "sockets": 0,
               "open_sockets": len(self.socks) + len(self.host.winners)}
        for b in self.punches.values():
            for k in ("attempts", "hits", "probes", "sockets"):
                out[k] += b.stats()[k]
        return out

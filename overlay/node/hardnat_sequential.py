"""Sequential punching (``nat.seqpunch``) as a ``hardnat.HardNatDriver``: a sequential symmetric
NAT against another one (both spray predicted windows) or against an easy NAT.

The sequential side (one attempt per node at a time, ``owner``) opens a fresh socket, measures its
next port with one STUN transaction to the server, publishes that base with its candidates
(``advertised``: the peer reads it from the introduction) and sprays the peer's window from that
socket; the peer's discovery message there is a hit and the socket becomes the winner. The easy
side (role EASY) sprays the sequential side's window from the main socket.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

from overlay.io.udp import UdpSocket
from overlay.nat import disco as disco_mod
from overlay.nat import seqpunch, stun

if TYPE_CHECKING:
    from overlay.node.hardnat import HardNat
    from overlay.node.peers import PeerEntry

log = logging.getLogger("overlay.dataplane")


class SequentialDriver:
    """Per-peer planners, when to start, the one attempt at a time that owns the fresh socket
    and its STUN measurement, our base as published, and the peers we spray for (role EASY)."""

    def __init__(self, host: HardNat, config: seqpunch.SeqConfig | None = None):
        self.host = host
        self.config = config or seqpunch.SeqConfig()
        self.punches: dict[bytes, seqpunch.SeqPunch] = {}
        self.check: dict[bytes, float] = {}
        self.owner: bytes | None = None
        self.sock: UdpSocket | None = None
        self.stun: stun.StunTransaction | None = None
        self.pub: dict | None = None      # our base as published (withdrawn when the attempt ends)
        self.easy: set[bytes] = set()     # peers whose window we spray from our socket (role EASY)

    def role(self, key: bytes) -> str | None:
        """Our ``seqpunch.role`` toward this peer, or None."""
        n, peer = self.host.our_nat, self.host.peer_nat.get(key, {})
        if (not self.host.enabled or n is None or not n.udp or peer.get("birthday") is False
                or not self.host.stun_servers):
            return None
        return seqpunch.role(n.mapping, n.allocation, peer.get("mapping"), peer.get("allocation"))

    def _punch_for(self, key: bytes, role: str) -> seqpunch.SeqPunch:
        s = self.punches.get(key)
        if s is None or (s.role != role and s.state == seqpunch.IDLE):
            s = self.punches[key] = seqpunch.SeqPunch(self.config, lower=self.host.public_key < key, role=role)
        return s

    def on_punch(self, key: bytes, entry: PeerEntry, nat: dict) -> None:
        """An introduction: take the peer's published base for our attempt, join the peer's attempt,
        or schedule one of our own."""
        role = self.role(key)
        if entry.path.current_path is not None or key in self.host.winners or role is None:
            return    # direct, or a hit's path being confirmed
        now = self.host.now()
        s = self._punch_for(key, role)
        base = nat.get("seq")
        if not isinstance(base, dict) or base.get("for") != base64.b64encode(self.host.public_key).decode():
            base = None
        if role == seqpunch.EASY:   # the sequential side measured for us: spray its window from our socket
            if base is not None and s.state == seqpunch.IDLE and s.may_join(now):
                s.start(now, join=True)
                self.easy.add(key)
            if base is not None and s.state == seqpunch.READY:
                try:
                    s.peer_ready(int(base["next"]), int(base["step"]), now)
                except (KeyError, TypeError, ValueError):
                    return
                self._send(key, now)
            return
        if base is not None and s.state == seqpunch.IDLE and self.owner is None and s.may_join(now):
            self._start(key, entry, now, join=True)     # the peer is measuring or spraying: at once
        if base is not None and s.state in (seqpunch.MEASURING, seqpunch.READY):
            try:
                s.peer_ready(int(base["next"]), int(base["step"]), now)
            except (KeyError, TypeError, ValueError):
                return
            self._send(key, now)
        elif s.state == seqpunch.IDLE:
            delay = self.config.easy_delay if role == seqpunch.SEQ else self.config.delay
            self.check.setdefault(key, now + delay)

    def _start(self, key: bytes, entry: PeerEntry, now: float, join: bool = False) -> None:
        """Open the attempt's fresh socket and measure our next port from it."""
        host = self.host
        try:
            u = host.open_socket(self.on_datagram)
        except OSError as e:
            log.warning("sequential punching: no socket (%s)", e)
            return
        s = self.punches[key]
        s.start(now, join=join)
        if s.role == seqpunch.SEQ:      # the easy peer's one port: its server-reflexive address
            if (target := host.target(entry)) is None:
                s.abort(now)
                u.close()
                return
            s.peer_ready(target[1], 0, now)
        self.owner = key
        self.sock = u
        tx = self.stun = stun.StunTransaction(host.stun_servers[0], now, rto=0.3, rc=4, rm=4)
        u.send_batch(tx.datagrams_to_send(now))
        log.info("sequential punching toward %s: measuring our next port%s", entry.name,
                 " (the peer started)" if join else "")
        host.schedule_flush()

    def advertised(self) -> dict:
        s = self.punches.get(self.owner) if self.owner is not None else None
        if s is None or s.base is None or s.state == seqpunch.IDLE:
            self.pub = None
            return {}
        self.pub = {"for": base64.b64encode(self.owner).decode(), "next": s.base[0], "step": s.base[1]}
        return {"seq": self.pub}

    def timer(self) -> float | None:
        if not self.check and self.owner is None and not self.easy:
            return None     # nothing pending (the usual case: computed on every flush, no allocation)
        times = list(self.check.values())
        times += [t for s in self.punches.values() if (t := s.get_timer()) is not None]
        if self.stun is not None and (t := self.stun.get_timer()) is not None:
            times.append(t)
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if not (self.check or self.owner is not None or self.easy):
            return
        host = self.host
        for key, at in list(self.check.items()):
            if at > now:
                continue
            del self.check[key]
            entry = host.peer(key)
            if entry is None or entry.path is None or entry.path.current_path is not None or key in host.winners:
                continue   # never while a direct path works (or a hit's is being confirmed)
            if (role := self.role(key)) is None or role == seqpunch.EASY:
                continue
            if self.owner is not None:     # one attempt per node at a time: this one waits
                self.check[key] = now + self.config.delay
                continue
            s = self._punch_for(key, role)
            if s.may_start(now):
                self._start(key, entry, now)
            elif (at := s.retry_at()) is not None:
                self.check[key] = at           # backing off: then
        tx = self.stun
        if tx is not None and self.sock is not None:
            if (t := tx.get_timer()) is not None and t <= now:
                tx.handle_timer(now)
            self.sock.send_batch(tx.datagrams_to_send(now))
            if tx.done and tx.result is None:
                self.stun = None   # no answer: the attempt times out
        for key in list(self.punches):
            self._send(key, now)

    def _send(self, key: bytes, now: float) -> None:
        host = self.host
        s, entry = self.punches.get(key), host.peer(key)
        if s is None or s.state == seqpunch.IDLE:
            return
        if entry is None or entry.path is None:
            s.abort(now)
        elif (t := s.get_timer()) is not None and t <= now:
            ports = s.due(now)
            target = host.target(entry)
            if ports and target is not None and s.role == seqpunch.EASY:
                dg = entry.path.spray_ping((target[0], ports[0]), now)
                host.send((dg, (target[0], p)) for p in ports)
                if s.bursts == 1:
                    log.info("sequential punching with %s: %d pings at %s:%d.. from our socket", entry.name,
                             len(ports), target[0], ports[0])
            elif ports and target is not None and key == self.owner and self.sock is not None:
                dg = entry.path.spray_ping((target[0], ports[0]), now)
                self.sock.send_batch([(dg, (target[0], p)) for p in ports])
                if s.bursts == 1:
                    log.info("sequential punching toward %s: %d pings at %s:%d.., our next port %d", entry.name,
                             len(ports), target[0], ports[0], s.base[0] if s.base else 0)
        if s.state == seqpunch.IDLE and key == self.owner:
            log.info("sequential punching toward %s: no hit", entry.name if entry else "?")
            self.close()
        if s.state == seqpunch.IDLE:
            self.easy.discard(key)
        if (s.state == seqpunch.IDLE and entry is not None and entry.path is not None
                and entry.path.current_path is None and (at := s.retry_at()) is not None):
            self.check.setdefault(key, at)     # still relayed: again with fresh port data

    def on_datagram(self, sock: UdpSocket, view: memoryview, addr) -> None:
        """The fresh socket: our STUN answer (the measurement), or the peer's discovery message
        from one of the ports we aimed at (a hit: the socket then carries that path)."""
        host = self.host
        key = self.owner
        s = self.punches.get(key) if key is not None else None
        src = (addr[0], addr[1])
        if s is None or sock is not self.sock:
            host.not_ours()
            return
        now = host.now()
        if stun.is_stun(view):
            tx = self.stun
            if tx is not None and tx.receive(bytes(view), src, now) and tx.result is not None:
                self.stun = None
                n = host.our_nat
                step = n.delta if n is not None else 0
                s.measured(tx.result[1], step, now)
                if s.base is not None:
                    host.publish()
                    host.send_control({"t": "punch", "peer": base64.b64encode(key).decode()})
                    self._send(key, now)
                host.schedule_flush()
            return
        entry = host.peer(key)
        if (view[:4] != disco_mod.MAGIC or s.state != seqpunch.SPRAYING or entry is None
                or (target := host.target(entry)) is None
                or src[0] != target[0] or src[1] not in s.targets):
            host.not_ours()
            return
        if (msg := host.disco_from(key, view)) is None:
            return
        self.sock = None
        self.close()
        host.adopt(key, src, sock)
        s.hit(now)
        log.info("sequential punching toward %s: hit %s:%d on local port %d after %.2f s", entry.name, src[0],
                 src[1], sock.sock.getsockname()[1], s.last_time_to_hit or 0.0)
        host.deliver(entry, msg, src, now)
        host.schedule_flush()

    def path_changed(self, key: bytes, path) -> None:
        s = self.punches.get(key)
        if path is not None and s is not None and s.state != seqpunch.IDLE:
            s.hit(self.host.now())
            self.easy.discard(key)
            if key == self.owner:
                self.close()

    def close(self) -> None:
        """End the node's attempt: close its socket (unless a hit took it) and withdraw our base."""
        sock, self.sock = self.sock, None
        self.owner = None
        self.stun = None
        if sock is not None:
            sock.close()
        if self.pub is not None and self.host.public_known():
            self.host.publish()

    def forget(self, key: bytes) -> None:
        self.check.pop(key, None)
        self.easy.discard(key)
        s = self.punches.pop(key, None)
        if s is not None:
            s.abort(self.host.now())
        if key == self.owner:
            self.close()

    def stats(self) -> dict:
        out = {"enabled": self.host.enabled, "attempts": 0, "hits": 0, "probes": 0, "mappings": 0}
        for s in self.punches.values():
            for k in ("attempts", "hits", "probes", "mappings"):
                out[k] += s.stats()[k]
        return out

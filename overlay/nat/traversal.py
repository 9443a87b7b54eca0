"""Per-peer path state machine (sans-I/O): punch, confirm, choose, keep alive, fall back, re-probe.

Life of a peer path:

1. ``set_remote_candidates`` (from the mediation server or a CallMeMaybe) and ``start_punch(at)``
   at the common start time the server gave both sides. Every candidate gets a discovery Ping in
   each of several rounds (0, 0.2, 0.5, 1, 2, 3, 4 s after ``at``), predicted ports first.
2. An authenticated Pong echoing one of our fresh tx_ids, from the address we pinged, confirms
   that address with an RTT sample. An authenticated Ping is answered with a Pong and, if its
   source is not a fresh confirmed path, challenged with our own Ping (peer-reflexive
   candidate: how symmetric NATs are traversed). Pings alone never move the path: they can be
   replayed, our tx_ids cannot.
3. The best confirmed path wins, by smoothed round-trip time (EWMA of the pong samples, gain
   ``rtt_gain``) minus a small IPv6 credit. Being on a private range (RFC 1918, link-local, ULA;
   not CGNAT's 100.64/10) only breaks near-ties: such a path is preferred when it is within half
   the switch margin of the best public one, never when it is clearly slower (another VPN's 10.x
   address is not "the LAN"). The first confirmed path is taken at once; after that the current
   path is only replaced by a clearly better one (hysteresis: ``switch_abs`` 10 ms or
   ``switch_rel`` 20 % of the current RTT) that stayed so over ``switch_samples`` consecutive
   samples of its own, so jittery samples do not flap the path; or when the current path stops
   answering.
4. No path within ``direct_timeout`` (5 s): state RELAY (traffic goes through the relay, which the
   caller already uses while ``current_path`` is None); probing continues with exponential
   backoff and upgrades to direct at the first pong.
5. The chosen path gets a Ping every ``keepalive_interval`` (25 s, under Linux's 30 s unreplied UDP
   conntrack timeout; the Pong refreshes the peer's NAT the same way). An unanswered Ping is
   retried every ``retry_interval``; after ``dead_after`` the path is dropped: another fresh
   confirmed path takes over, or the state falls back to RELAY and the candidates are re-probed.
   The caller should then refresh its own candidates (STUN) and send ``call_me_maybe`` over the
   relay, since a rebinding NAT invalidates the server-reflexive address the peer knows.
6. Roaming / NAT rebinding: a Ping from a new source address triggers a challenge of that address
   and a liveness check of the current one; if the current path fails its check while the new
   address confirmed, the path moves there within ``retry_interval``.

Probes on a peer's say-so are bounded. The candidates come from the peer (through the server or
a CallMeMaybe), so a member could advertise anyone's address and make every peer probe it. So:
pings to addresses that never answered with an authenticated Pong (unconfirmed) draw on a token
bucket per peer, ``probe_burst`` (128: one punch of 16 candidates x 7 rounds, plus some) refilled
at ``probe_rate`` (4/s); and a punch (server introduction, CallMeMaybe) restarts the rounds at
most once per ``min_punch_interval`` (2 s). Whatever a peer does, this node sends at most
128 + 4 per second discovery datagrams to addresses that are not confirmed paths of that peer.
Confirmed paths (keepalives, liveness checks) are not limited: they answered, so they want them.

No path inside our own tunnel. The caller's ``blocked(addr)`` says whether an outer datagram to an
address would enter this node's own overlay device (its pool, the routes it sends into the device:
``overlay.node.tunnel_guard``); such an address is never a candidate, is never learned from a Ping,
gets no Pong, and a Pong from it confirms nothing. When the answer changes (a gateway route was
installed after the candidates came; the caller says so, and every probe round and keepalive asks
again), ``drop_blocked`` forgets them and falls back from such a path.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from overlay.tokenbucket import TokenBucket

from .candidate import KINDS, PEER, Addr, Candidate, is_ipv6, is_lan, normalize
from .disco import MAX_CANDIDATES, CallMeMaybe, DiscoCodec, DiscoMessage, Ping, Pong, new_tx_id

IDLE, PUNCHING, DIRECT, RELAY = "idle", "punching", "direct", "relay"

_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
_MAX_PENDING = 512
_MAX_OUT = 512
_MAX_EVENTS = 64


@dataclass(frozen=True, slots=True)
class TraversalConfig:
    keepalive_interval: float = 25.0
    direct_timeout: float = 5.0
    punch_offsets: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0)
    retry_interval: float = 1.0
    dead_after: float = 5.0
    backoff_initial: float = 5.0
    # below the usual 30 s UDP mapping lifetime: probing from the relay state alone then keeps an
    # endpoint-independent mapping (the server-reflexive address the peer knows) alive, and the
    # two sides' probes still meet within each other's filter lifetime
    backoff_max: float = 20.0
    switch_abs: float = 0.010
    switch_rel: float = 0.2
    ipv6_credit: float = 0.010
    # a challenger must beat the current path on this many consecutive samples of its own
    switch_samples: int = 3
    rtt_gain: float = 0.125  # EWMA gain of the smoothed RTT (TCP's SRTT gain)
    max_candidates: int = 64
    max_peer_reflexive: int = 16
    # a peer's ping triggers at most one challenge ping per address per this interval
    trigger_interval: float = 0.1
    # pings to unconfirmed addresses, per peer (see the module docstring)
    probe_burst: float = 128.0
    probe_rate: float = 4.0
    min_punch_interval: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.retry_interval < self.dead_after < self.keepalive_interval):
            raise ValueError("need 0 < retry_interval < dead_after < keepalive_interval")
        if self.direct_timeout <= 0 or not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("bad direct_timeout / backoff")
        if not 1 <= len(self.punch_offsets) <= 16 or min(self.punch_offsets) < 0:
            raise ValueError("1..16 non-negative punch offsets")
        if self.switch_samples < 1 or not 0 < self.rtt_gain <= 1:
            raise ValueError("switch_samples >= 1 and 0 < rtt_gain <= 1")


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path to use changed. ``path`` None means: send through the relay."""

    path: Addr | None
    rtt: float | None
    reason: str  # confirmed | better | roamed | failover | lost | no direct path | inside the tunnel


@dataclass(slots=True)
class _Path:
    addr: Addr
    rtt: float
    last_pong: float
    last_sent: float
    unanswered_since: float | None
    lan: bool
    score_credit: float
    streak: int = 0  # consecutive samples on which this path warranted a switch
    samples: int = 1

    @property
    def score(self) -> float:
        return self.rtt - self.score_credit


class PeerPath:
    """Direct-path discovery and maintenance towards one peer (identified by its public key)."""

    def __init__(self, disco: DiscoCodec, peer_key: bytes, config: TraversalConfig | None = None,
                 blocked: Callable[[Addr], bool] | None = None):
        self.disco = disco
        self._blocked = blocked or (lambda addr: False)
        self.peer_key = peer_key
        self.config = config or TraversalConfig()
        self.state = IDLE
        self.current_path: Addr | None = None
        # our address as the peer last saw it (from its Pong), e.g. to show or to advertise
        self.observed_by_peer: Addr | None = None
        self._remote: dict[Addr, str] = {}
        self._paths: dict[Addr, _Path] = {}
        self._pending: OrderedDict[bytes, tuple[Addr, float]] = OrderedDict()
        self._last_ping: dict[Addr, float] = {}
        self._rounds: list[float] = []
        self._relay_deadline: float | None = None
        self._backoff_at: float | None = None
        self._backoff = self.config.backoff_initial
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[PathChanged] = deque(maxlen=_MAX_EVENTS)
        self._probes: TokenBucket | None = None     # made full at the first probe
        self._punch_started: float | None = None
        self.probes_suppressed = 0

    # ------------------------------------------------------------------ inputs

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT of the current direct path."""
        p = self._paths.get(self.current_path) if self.current_path else None
        return p.rtt if p else None

    @property
    def remote_candidates(self) -> list[Candidate]:
        return [Candidate(a, k) for a, k in self._remote.items()]

    def set_remote_candidates(self, candidates: Iterable[Candidate]) -> None:
        """Replace the peer's advertised candidates (peer-reflexive ones we learned are kept)."""
        new: dict[Addr, str] = {}
        for c in candidates:
            if len(new) >= self.config.max_candidates:
                break
            addr = normalize(c.addr)
            if not self._blocked(addr):
                new.setdefault(addr, c.kind)
        for addr, kind in self._remote.items():
            if kind == PEER:
                new.setdefault(addr, kind)
        self._remote = new

    def start_punch(self, at: float) -> None:
        """Probe every candidate in rounds starting at ``at`` (the server's common start time).

        Rounds restart at most once per ``min_punch_interval``; a punch inside it only brings the
        candidates set just before it into the rounds still to come."""
        if self._punch_started is not None and abs(at - self._punch_started) < self.config.min_punch_interval:
            return
        self._punch_started = at
        self._rounds = sorted(at + o for o in self.config.punch_offsets)
        self._backoff_at = None
        self._backoff = self.config.backoff_initial
        if self.current_path is None:
            self._relay_deadline = at + self.config.direct_timeout
            if self.state == IDLE:
                self.state = PUNCHING

    def call_me_maybe(self, local_candidates: Iterable[Candidate], now: float) -> bytes:
        """A sealed CallMeMaybe with our candidates, for the caller to send over the relay; punches now."""
        msg = CallMeMaybe(new_tx_id(), tuple(local_candidates)[:MAX_CANDIDATES])
        self.start_punch(now)
        return self.disco.seal(self.peer_key, msg)

    def receive(self, msg: DiscoMessage, addr: Addr | None, now: float) -> None:
        """Dispatch an opened discovery message from this peer (``addr`` None: came via the relay)."""
        if isinstance(msg, CallMeMaybe):
            self.receive_call_me_maybe(msg, now)
        elif addr is None:
            return  # pings and pongs only mean something for the address they travelled
        elif isinstance(msg, Ping):
            self.receive_ping(msg, addr, now)
        elif isinstance(msg, Pong):
            self.receive_pong(msg, addr, now)

    def receive_call_me_maybe(self, msg: CallMeMaybe, now: float) -> None:
        self.set_remote_candidates(msg.candidates)
        self.start_punch(now)

    def receive_ping(self, ping: Ping, addr: Addr, now: float) -> None:
        addr = normalize(addr)
        if self._blocked(addr):
            return      # it came through our own tunnel: a Pong would go back the same way
        self._queue(self.disco.seal(self.peer_key, Pong(ping.tx_id, addr)), addr)
        self.peer_seen_at(addr, now)

    def peer_seen_at(self, addr: Addr, now: float) -> None:
        """The peer sent something authenticated from ``addr`` (a Ping, or tunnel data the
        WireGuard layer authenticated from a new source: its NAT rebound). An address that is not
        a fresh confirmed path is challenged (at most once per ``trigger_interval``) and the
        current path, if elsewhere, gets a liveness check: if it has died, the path moves to the
        new address as soon as that one answers."""
        addr = normalize(addr)
        if self._blocked(addr):
            return
        path = self._paths.get(addr)
        if path is None or now - path.last_pong > self.config.keepalive_interval:
            self._learn(addr)
            if now - self._last_ping.get(addr, float("-inf")) >= self.config.trigger_interval:
                self._send_ping(addr, now)
        cur = self._paths.get(self.current_path) if self.current_path else None
        if cur is not None and addr != cur.addr and cur.unanswered_since is None:
            self._send_ping(cur.addr, now)  # the peer sends from elsewhere: is the current path alive?

    def receive_pong(self, pong: Pong, addr: Addr, now: float) -> None:
        addr = normalize(addr)
        if self._blocked(addr):
            return
        entry = self._pending.pop(pong.tx_id, None)
        if entry is None:
            return  # not ours, already answered, or forgotten
        dst, sent = entry
        if addr != dst:
            # answered from another address than the one pinged: challenge that one instead
            self._learn(addr)
            self._send_ping(addr, now)
            return
        self.observed_by_peer = pong.observed
        sample = max(now - sent, 0.0)
        path = self._paths.get(addr)
        if path is None:
            self._evict_paths()
            credit = self.config.ipv6_credit if is_ipv6(addr) else 0.0
            path = _Path(addr, sample, now, sent, None, is_lan(addr), credit)
            self._paths[addr] = path
        else:
            # the mean of the first samples, then an EWMA: one odd first sample fades quickly
            path.samples += 1
            path.rtt += (sample - path.rtt) * max(self.config.rtt_gain, 1.0 / path.samples)
            path.last_pong = now
        path.unanswered_since = None
        cur = self._paths.get(self.current_path) if self.current_path else None
        if cur is not None and path is not cur:
            # evidence: the smoothed RTT and this very sample both warrant the switch
            path.streak = path.streak + 1 if self._beats(path, cur) and self._beats(path, cur, sample) else 0
        self._select(now)

    def drop_blocked(self, now: float) -> bool:
        """The addresses leading into our tunnel changed: forget the candidates and paths that do
        now; from a current path among them, fall back (another path, else the relay). True if
        anything was forgotten."""
        gone = [a for a in self._remote if self._blocked(a)]
        for a in gone:
            del self._remote[a]
        dead = [a for a in self._paths if self._blocked(a)]
        for a in dead:
            if a != self.current_path:
                del self._paths[a]
        if self.current_path in dead:
            self._lose_current(now, "inside the tunnel")
        return bool(gone or dead)

    def spray_ping(self, dst: Addr, now: float) -> bytes:
        """One sealed Ping for a birthday attempt (``nat.birthday``, which bounds its count): the
        caller sends the same datagram from many sockets, or copies to many guessed ports. Its
        tx_id waits for a Pong as if sent to ``dst``; a Pong from another guessed address is
        challenged like any answer from an unexpected address."""
        tx = new_tx_id()
        if len(self._pending) >= _MAX_PENDING:
            self._pending.popitem(last=False)
        self._pending[tx] = (normalize(dst), now)
        return self.disco.seal(self.peer_key, Ping(tx))

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> PathChanged | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        times = []
        if self._rounds:
            times.append(self._rounds[0])
        if self._relay_deadline is not None:
            times.append(self._relay_deadline)
        if self._backoff_at is not None:
            times.append(self._backoff_at)
        cur = self._paths.get(self.current_path) if self.current_path else None
        if cur is not None:
            c = self.config
            if cur.unanswered_since is None:
                times.append(cur.last_sent + c.keepalive_interval)
            else:
                times.append(min(cur.unanswered_since + c.dead_after, cur.last_sent + c.retry_interval))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        c = self.config
        due_rounds = 0
        while self._rounds and self._rounds[0] <= now:
            self._rounds.pop(0)
            due_rounds += 1
        if due_rounds:
            self._probe_all(now)
        if self._relay_deadline is not None and now >= self._relay_deadline:
            self._relay_deadline = None
            if self.current_path is None:
                if self.state != RELAY:
                    self.state = RELAY
                    self._events.append(PathChanged(None, None, "no direct path"))
                self._backoff = c.backoff_initial
                self._backoff_at = now + self._backoff
        if self._backoff_at is not None and now >= self._backoff_at:
            if self.current_path is None:
                self._probe_all(now)
                self._backoff = min(self._backoff * 2, c.backoff_max)
                self._backoff_at = now + self._backoff
            else:
                self._backoff_at = None
        cur = self._paths.get(self.current_path) if self.current_path else None
        if cur is None:
            return
        if cur.unanswered_since is not None:
            if now - cur.unanswered_since >= c.dead_after:
                self._lose_current(now)
            elif now - cur.last_sent >= c.retry_interval and not self._select(now):
                self._send_ping(cur.addr, now)
        elif now >= cur.last_sent + c.keepalive_interval:
            self.drop_blocked(now)      # (routes change: no keepalive into our own tunnel)
            if self.current_path is not None:
                self._send_ping(self.current_path, now)

    # ------------------------------------------------------------------ internals

    def _queue(self, datagram: bytes, addr: Addr) -> None:
        if len(self._out) < _MAX_OUT:
            self._out.append((datagram, addr))

    def _probe_allowed(self, addr: Addr, now: float) -> bool:
        """The per-peer budget for pings to addresses that are not confirmed paths."""
        if addr in self._paths:
            return True
        if self._probes is None:
            self._probes = TokenBucket(self.config.probe_rate, self.config.probe_burst, now)
        if not self._probes.take(now):
            self.probes_suppressed += 1
            return False
        return True

    def _send_ping(self, addr: Addr, now: float) -> None:
        if not self._probe_allowed(addr, now):
            return
        tx = new_tx_id()
        if len(self._pending) >= _MAX_PENDING:
            self._pending.popitem(last=False)
        self._pending[tx] = (addr, now)
        if len(self._last_ping) >= _MAX_PENDING:
            self._last_ping.clear()  # only rate-limits triggered pings; forgetting is harmless
        self._last_ping[addr] = now
        path = self._paths.get(addr)
        if path is not None:
            path.last_sent = now
            if path.unanswered_since is None:
                path.unanswered_since = now
        self._queue(self.disco.seal(self.peer_key, Ping(tx)), addr)

    def _probe_all(self, now: float) -> None:
        self.drop_blocked(now)      # (routes change: ask again before every round)
        order = sorted(self._remote.items(), key=lambda item: _KIND_ORDER[item[1]])
        addrs = [a for a, _ in order] + [a for a in self._paths if a not in self._remote]
        for addr in addrs:
            self._send_ping(addr, now)

    def _learn(self, addr: Addr) -> None:
        """Remember a peer-reflexive address, forgetting the oldest one beyond the bound."""
        if addr in self._remote:
            return
        learned = [a for a, k in self._remote.items() if k == PEER and a != self.current_path]
        if len(learned) >= self.config.max_peer_reflexive:
            del self._remote[learned[0]]
        self._remote[addr] = PEER

    def _evict_paths(self) -> None:
        limit = self.config.max_candidates + self.config.max_peer_reflexive
        if len(self._paths) >= limit:
            stale = min((p for p in self._paths.values() if p.addr != self.current_path), key=lambda p: p.last_pong)
            del self._paths[stale.addr]

    def _margin(self, score: float) -> float:
        return max(self.config.switch_abs, self.config.switch_rel * score)

    def _beats(self, p: _Path, cur: _Path, sample: float | None = None) -> bool:
        """Would ``p`` (its smoothed RTT, or one ``sample`` of it) be worth switching to from
        ``cur``: clearly faster, or a private-range path in a near-tie with a public one (within
        half the margin, so that the public one then needs a full margin to win back: no
        flapping at the border)."""
        score = p.score if sample is None else sample - p.score_credit
        m = self._margin(cur.score)
        if score < cur.score - m:
            return True
        return p.lan and not cur.lan and score <= cur.score + m / 2

    def _preferred(self, paths: list[_Path]) -> _Path:
        """Lowest score; a private-range path within half the margin of it wins the tie."""
        best = min(paths, key=lambda p: p.score)
        if best.lan:
            return best
        limit = best.score + self._margin(best.score) / 2
        lan = [p for p in paths if p.lan and p.score <= limit]
        return min(lan, key=lambda p: p.score) if lan else best

    def _healthy(self, p: _Path, now: float) -> bool:
        c = self.config
        if now - p.last_pong > c.keepalive_interval + c.dead_after:
            return False
        return p.unanswered_since is None or now - p.unanswered_since < c.retry_interval

    def _select(self, now: float) -> bool:
        """Switch to the best healthy confirmed path if warranted; True if the path changed."""
        healthy = [p for p in self._paths.values() if self._healthy(p, now)]
        if not healthy:
            return False
        cur = self._paths.get(self.current_path) if self.current_path else None
        if cur is None or not self._healthy(cur, now):
            best = self._preferred(healthy)
            if best is cur:
                return False
            self._switch(best, "confirmed" if cur is None else "roamed")
            return True
        # the current path answers: only a challenger with sustained evidence replaces it
        ready = [p for p in healthy
                 if p is not cur and p.streak >= self.config.switch_samples and self._beats(p, cur)]
        if not ready:
            return False
        self._switch(self._preferred(ready), "better")
        return True

    def _switch(self, path: _Path, reason: str) -> None:
        for p in self._paths.values():
            p.streak = 0
        self.current_path = path.addr
        self.state = DIRECT
        self._relay_deadline = None
        self._backoff_at = None
        self._events.append(PathChanged(path.addr, path.rtt, reason))

    def _lose_current(self, now: float, reason: str = "lost") -> None:
        del self._paths[self.current_path]  # type: ignore[arg-type]
        self.current_path = None
        if self._select(now):
            self._events[-1] = PathChanged(self.current_path, self.rtt, "failover")
            return
        self.state = RELAY
        self._events.append(PathChanged(None, None, reason))
        self.start_punch(now)

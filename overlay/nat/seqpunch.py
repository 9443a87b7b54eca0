"""Punching between two sequential symmetric NATs: predicted windows on both sides at once (sans-I/O).

Behind a sequential symmetric NAT (address-and-port-dependent mapping, ports handed out from a
counter) every new destination takes the next port. Port prediction toward an endpoint-independent
peer works from the published candidates alone; with two such NATs both sides must guess, and each
side's guesses themselves take ports of its own counter. So both sides do this, at once:

1. Measure: open one fresh UDP socket and ask the server's STUN endpoint from it. That new flow
   takes the counter's current port ``m``; the next new flow of this host gets ``next = m + step``
   (``step``: the NAT's port delta from the classification).
2. Publish ``next`` and ``step`` (with the node's endpoints, for this one peer) and ask the server
   for an introduction: its push brings each side the other's base.
3. Spray: once both bases are known, send one ping from the fresh socket to each port of a window
   of the peer's predicted ports, all in one burst, then resend the same burst a few times (resends
   reuse the mappings, they take no new ports).

Why it meets: the k-th ping of side X leaves from X's port ``next_X + step_X * (o_X + k)``, where
``o_X >= 0`` counts the new flows X's host opened between its measurement and its burst (usually
none). The side with the lower key aims at the peer's ports ``next + step * 2k``, the other at
``next + step * k`` (k = 0, 1, 2...). Both NATs then hold the same flow (each side's mapping toward
exactly the port the other's mapping uses) for k_lower = o_lower + o_upper and k_upper =
2 * o_lower + o_upper: for any offsets up to the window, not only when both are zero. A packet that
reaches the other NAT before its mapping exists is dropped without leaving state, and the resends
cross once both bursts are out.

Cost per attempt: ``window + 1`` NAT mappings on each router (one per ping target plus the
measurement) and ``window * len(resends)`` pings. Bounded like birthday punching: one attempt per
peer and one per node at a time, at most ``measure_timeout + duration`` long, back-off doubling
from ``backoff_initial`` to ``backoff_max`` after a failure, only when both classifications say
sequential, never while a direct path works (the caller checks that).

Sequential <-> endpoint-independent (``role``): ordinary punching aims at the sequential side's
predicted candidates, which miss when that side opened other flows meanwhile (e.g. a sequential
attempt with a third node), and the pair would stay relayed, since the sequential side's mapping
toward the easy side then lives on. So when such a pair is still relayed after ordinary punching
(``easy_delay``), the sequential side (role ``SEQ``) runs the same attempt with fresh port data:
a fresh socket, measured, its base published; its window is one port, the easy side's
server-reflexive one (an endpoint-independent mapping is the same toward everyone). The easy
side (role ``EASY``) has nothing to measure: on the base it sprays its window of the sequential
side's ports from its main socket (stride 1), and a Ping from the sequential side's fresh socket
confirms the path there as any Ping does.

Retries: a relayed pair is tried again (``retry_at``: the back-off, doubling) by the side that
measures, at most ``max_failures`` times in a row; a hit resets the count.

The caller opens and closes the socket, runs the STUN transaction, publishes the base and turns
``due`` into datagrams.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backoff import Backoff

_VARYING = ("address-dependent", "address-and-port-dependent", "endpoint-dependent")
SEQUENTIAL = "sequential"
IDLE, MEASURING, READY, SPRAYING = "idle", "measuring", "ready", "spraying"
BOTH, SEQ, EASY = "both", "seq", "easy"     # roles: both sequential; we sequential; we easy
_EIM = "endpoint-independent"
_PORT_LOW, _PORT_SPAN = 1024, 65536 - 1024


def applies(own_mapping: str | None, own_allocation: str | None,
            peer_mapping: str | None, peer_allocation: str | None) -> bool:
    """Both sides behind destination-dependent mappings with sequential ports (else: ordinary
    punching with predicted candidates, birthday punching, or the relay)."""
    return (own_mapping in _VARYING and own_allocation == SEQUENTIAL
            and peer_mapping in _VARYING and peer_allocation == SEQUENTIAL)


def role(own_mapping: str | None, own_allocation: str | None,
         peer_mapping: str | None, peer_allocation: str | None) -> str | None:
    """``BOTH`` (two sequential NATs), ``SEQ`` (ours sequential, the peer's endpoint-independent),
    ``EASY`` (the reverse), or None (another method applies, or nothing does)."""
    own_seq = own_mapping in _VARYING and own_allocation == SEQUENTIAL
    peer_seq = peer_mapping in _VARYING and peer_allocation == SEQUENTIAL
    if own_seq and peer_seq:
        return BOTH
    if own_seq and peer_mapping == _EIM:
        return SEQ
    if peer_seq and own_mapping == _EIM:
        return EASY
    return None


def wrap(port: int) -> int:
    return _PORT_LOW + (port - _PORT_LOW) % _PORT_SPAN


@dataclass(frozen=True, slots=True)
class SeqConfig:
    window: int = 16                 # ports of the peer aimed at (= new NAT mappings) per attempt
    resends: tuple[float, ...] = (0.0, 0.25, 0.6, 1.2, 2.0, 3.0)   # burst times after both bases are known
    duration: float = 4.0            # spraying ends this long after the first burst
    measure_timeout: float = 4.0     # own measurement plus the peer's base must come within this
    delay: float = 0.5               # after an introduction: give ordinary punching this long first
    backoff_initial: float = 30.0
    backoff_max: float = 600.0
    # the peer published a base for us (it is measuring or spraying now): join it even while backing
    # off, at most this often, so two sides whose back-offs fell out of step still meet
    join_interval: float = 10.0
    # roles SEQ / EASY: ordinary punching (predicted candidates, 5 s of rounds) goes first
    easy_delay: float = 6.0
    max_failures: int = 8            # retries of a relayed pair in a row, then only on a new introduction

    def __post_init__(self) -> None:
        if not 1 <= self.window <= 64:
            raise ValueError("1..64 ports per window")
        if not 1 <= len(self.resends) <= 8 or min(self.resends) < 0 or max(self.resends) >= self.duration:
            raise ValueError("1..8 burst times, each within the attempt's duration")


class SeqPunch:
    """One peer's attempts. ``lower``: our public key sorts below the peer's (we take stride 2)."""

    def __init__(self, config: SeqConfig | None = None, lower: bool = False, role: str = BOTH):
        self.config = config or SeqConfig()
        self.lower = lower
        self.role = role
        self.failures = 0        # attempts in a row without a hit
        self.state = IDLE
        self.base: tuple[int, int] | None = None        # own (next port, step), once measured
        self.peer_base: tuple[int, int] | None = None
        self.targets: list[int] = []
        self._started = float("-inf")
        self._spray_at = 0.0
        self._bursts = 0
        self._backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        self.attempts = 0
        self.hits = 0
        self.probes_sent = 0
        self.mappings = 0        # new flows opened: the measurement plus one per target, per attempt
        self.last_time_to_hit: float | None = None

    # ------------------------------------------------------------------ decisions
    def may_start(self, now: float) -> bool:
        return self.state == IDLE and self._backoff.ready(now)

    def may_join(self, now: float) -> bool:
        """May we start because the peer has begun one (its base for us came)?"""
        return self.state == IDLE and (self._backoff.ready(now) or now >= self._started + self.config.join_interval)

    def start(self, now: float, join: bool = False) -> None:
        """Begin: the caller opens a fresh socket and sends one STUN request from it. ``join``:
        the peer started one (see ``may_join``)."""
        if not (self.may_join(now) if join else self.may_start(now)):
            raise RuntimeError("sequential attempt not allowed now")
        self.state, self._started = MEASURING, now
        self.base = self.peer_base = None
        self.targets = []
        self.attempts += 1
        if self.role == EASY:           # nothing to measure: wait for the peer's base
            self.state = READY
            return
        self.mappings += 1

    def measured(self, mapped_port: int, step: int, now: float) -> None:
        """The fresh socket's mapping (``mapped_port``) and our NAT's port step."""
        if self.state != MEASURING or step == 0:
            return
        self.base = (wrap(mapped_port + step), step)
        self.state = READY
        self._maybe_spray(now)

    def peer_ready(self, next_port: int, step: int, now: float) -> None:
        """The peer's published base for this attempt (from the server's introduction)."""
        if self.state not in (MEASURING, READY) or not 1024 <= next_port <= 65535:
            return
        if step == 0 and self.role != SEQ:      # only an endpoint-independent peer has no step
            return
        self.peer_base = (next_port, step)
        self._maybe_spray(now)

    def _maybe_spray(self, now: float) -> None:
        if self.state != READY or self.peer_base is None:
            return
        nxt, step = self.peer_base
        if self.role == SEQ:            # the easy side's one port
            self.targets = [nxt]
        else:
            stride = 2 if self.lower and self.role == BOTH else 1
            self.targets = [wrap(nxt + step * stride * k) for k in range(self.config.window)]
        self.state, self._spray_at, self._bursts = SPRAYING, now, 0
        self.mappings += len(self.targets)

    def hit(self, now: float) -> None:
        """A direct path was found (by this attempt or otherwise): end it, reset the back-off."""
        if self.state == IDLE:
            return
        if self.state == SPRAYING:
            self.hits += 1
            self.last_time_to_hit = now - self._started
        self._backoff.succeeded(now)
        self.failures = 0
        self._end()

    def abort(self, now: float) -> None:
        """End without a hit (timeout, peer gone, our NAT changed): back off before the next one."""
        if self.state == IDLE:
            return
        self._backoff.failed(now)
        self.failures += 1
        self._end()

    def retry_at(self) -> float | None:
        """When the side that measures should try a still-relayed pair again (the back-off), or
        None: an attempt is on, the easy side waits for the peer, or ``max_failures`` in a row."""
        if self.state != IDLE or self.role == EASY or self.failures >= self.config.max_failures:
            return None
        return self._backoff.not_before

    def _end(self) -> None:
        self.state = IDLE
        self.base = self.peer_base = None
        self.targets = []

    # ------------------------------------------------------------------ timers and output
    def get_timer(self) -> float | None:
        c = self.config
        if self.state in (MEASURING, READY):
            return self._started + c.measure_timeout
        if self.state == SPRAYING:
            end = self._spray_at + c.duration
            if self._bursts < len(c.resends):
                return min(end, self._spray_at + c.resends[self._bursts])
            return end
        return None

    def due(self, now: float) -> list[int]:
        """Ports of the peer to ping now (the whole window at each burst time, else nothing).
        Ends a timed-out attempt."""
        c = self.config
        if self.state in (MEASURING, READY):
            if now >= self._started + c.measure_timeout:
                self.abort(now)
            return []
        if self.state != SPRAYING:
            return []
        if now >= self._spray_at + c.duration:
            self.abort(now)
            return []
        if self._bursts < len(c.resends) and now >= self._spray_at + c.resends[self._bursts]:
            while self._bursts < len(c.resends) and now >= self._spray_at + c.resends[self._bursts]:
                self._bursts += 1
            self.probes_sent += len(self.targets)
            return list(self.targets)
        return []

    @property
    def bursts(self) -> int:
        """Bursts sent in the current attempt."""
        return self._bursts if self.state == SPRAYING else 0

    def stats(self) -> dict:
        return {"attempts": self.attempts, "hits": self.hits, "probes": self.probes_sent,
                "mappings": self.mappings, "state": self.state, "last_time_to_hit": self.last_time_to_hit}

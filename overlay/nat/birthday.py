"""Birthday-paradox punching between an easy and a hard NAT (sans-I/O).

The pair: one side behind an endpoint-independent mapping ("easy": its server-reflexive address
is the one every peer sees) and one behind an address-and-port-dependent mapping with random
ports ("hard": every new destination gets an unpredictable public port). Ordinary punching fails
when the easy side also filters by port: the hard side's ping to the easy address leaves from a
port the easy side never sent to, and the easy side cannot guess that port.

So both guess at once. The hard side opens ``sockets`` extra UDP sockets and pings the easy
side's address from each (``sockets`` NAT mappings, each opening its filter to the easy address);
the easy side pings ``probes`` distinct random ports of the hard side's public IP. A probe that
lands on one of those mappings gets through (and so does the hard side's next ping, since the easy
NAT now admits that port): P(hit) = 1 - (1 - sockets/span) ** probes; 256 sockets and 1024 probes
over 1024..65535 give 98 %, and on average a hit after span/sockets = 252 probes, when probing stops.

Bounded everywhere: ``sockets`` and ``probes`` per attempt, ``probe_rate`` per second, one attempt
per peer at a time, at most ``duration`` long, ``backoff_initial`` doubling to ``backoff_max``
after a failed attempt, and only for the one pairing of NAT classifications where it can help.
The caller must also not start while a direct path works (``start`` is only asked then).

This core decides when and what to send; the caller opens and closes the sockets and turns
``due`` into datagrams (hard side: one ping sent from every socket; easy side: one ping to
each port).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .backoff import Backoff
from .candidate import Addr

HARD, EASY = "hard", "easy"
IDLE, ACTIVE = "idle", "active"

EIM = "endpoint-independent"
_VARYING = ("address-dependent", "address-and-port-dependent", "endpoint-dependent")
RANDOM = "random"


def role(own_mapping: str | None, own_allocation: str | None,
         peer_mapping: str | None, peer_allocation: str | None) -> str | None:
    """Our role in a birthday attempt with this peer, or None where it cannot help (both easy:
    ordinary punching works; both hard: no fixed address for either side to aim at; sequential
    allocation: port prediction does better; unknown: nothing to go on)."""
    own_hard = own_mapping in _VARYING and own_allocation == RANDOM
    peer_hard = peer_mapping in _VARYING and peer_allocation == RANDOM
    if own_hard and peer_mapping == EIM:
        return HARD
    if own_mapping == EIM and peer_hard:
        return EASY
    return None


@dataclass(frozen=True, slots=True)
class BirthdayConfig:
    sockets: int = 256            # hard side: extra sockets (= NAT mappings) per attempt
    probes: int = 1024            # easy side: random ports probed per attempt
    probe_rate: float = 512.0     # easy side: probes per second
    resend: float = 1.0           # hard side: ping from every socket again after this long
    duration: float = 4.0         # an attempt ends after this long without a hit
    delay: float = 1.0            # after a punch: give ordinary punching this long first
    backoff_initial: float = 30.0
    backoff_max: float = 600.0
    port_low: int = 1024          # Linux NAT picks random ports from 1024..65535
    port_high: int = 65535

    def __post_init__(self) -> None:
        if not 1 <= self.sockets <= 1024 or not 1 <= self.probes <= 8192:
            raise ValueError("1..1024 sockets and 1..8192 probes per attempt")
        if self.probe_rate <= 0 or self.resend <= 0 or self.duration <= 0 or self.delay < 0:
            raise ValueError("bad rate / resend / duration / delay")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("bad backoff")
        if not 1 <= self.port_low <= self.port_high <= 65535:
            raise ValueError("bad port range")

    @property
    def span(self) -> int:
        return self.port_high - self.port_low + 1

    def hit_probability(self) -> float:
        return 1.0 - (1.0 - min(self.sockets, self.span) / self.span) ** self.probes


class BirthdayPunch:
    """Birthday attempts towards one peer: when one may start, what to send when, and counters."""

    def __init__(self, config: BirthdayConfig | None = None, rng: random.Random | None = None):
        self.config = config or BirthdayConfig()
        self.rng = rng or random.SystemRandom()
        self.state = IDLE
        self.role: str | None = None
        self.target: Addr | None = None
        self._ports: list[int] = []
        self._sent = 0
        self._started = 0.0
        self._next_resend: float | None = None
        self._backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        # counters over the node's life
        self.attempts = 0
        self.hits = 0
        self.probes_sent = 0      # easy side: pings to guessed ports; hard side: pings from extra sockets
        self.sockets_opened = 0
        self.last_time_to_hit: float | None = None

    # ------------------------------------------------------------------ decisions
    def may_start(self, now: float) -> bool:
        return self.state == IDLE and self._backoff.ready(now)

    def start(self, role_: str, target: Addr, now: float) -> int:
        """Begin an attempt: ``target`` is the easy side's address (hard role) or the hard side's
        public address (easy role: only its IP matters). Returns how many extra sockets to open."""
        if not self.may_start(now):
            raise RuntimeError("birthday attempt not allowed now")
        c = self.config
        self.state, self.role, self.target = ACTIVE, role_, target
        self._started = now
        self._sent = 0
        self.attempts += 1
        if role_ == EASY:
            self._ports = self.rng.sample(range(c.port_low, c.port_high + 1), min(c.probes, c.span))
            self._next_resend = None
            return 0
        self._ports = []
        self._next_resend = now
        self.sockets_opened += c.sockets
        return c.sockets

    def hit(self, now: float) -> None:
        """A direct path was found (by this attempt or otherwise): end it, reset the back-off."""
        if self.state != ACTIVE:
            return
        self.hits += 1
        self.last_time_to_hit = now - self._started
        self._backoff.succeeded(now)
        self._end()

    def abort(self, now: float) -> None:
        """End without a hit (timeout, peer gone, our NAT changed): back off before the next one."""
        if self.state != ACTIVE:
            return
        self._backoff.failed(now)
        self._end()

    def _end(self) -> None:
        self.state = IDLE
        self._ports = []
        self._next_resend = None

    # ------------------------------------------------------------------ timers and output
    def get_timer(self) -> float | None:
        if self.state != ACTIVE:
            return None
        end = self._started + self.config.duration
        if self.role == EASY:
            if self._sent < len(self._ports):
                return min(end, self._started + (self._sent + 1) / self.config.probe_rate)
            return end
        return min(end, self._next_resend) if self._next_resend is not None else end

    def due(self, now: float) -> list[Addr] | int:
        """What to send now. Easy role: the guessed addresses to ping. Hard role: 1 if every extra
        socket should ping the target now, else 0. Ends a timed-out attempt (then: nothing)."""
        if self.state != ACTIVE:
            return [] if self.role == EASY else 0
        c = self.config
        if now >= self._started + c.duration:
            role_ = self.role
            self.abort(now)
            return [] if role_ == EASY else 0
        if self.role == EASY:
            upto = min(len(self._ports), int((now - self._started) * c.probe_rate) + 1)
            ports = self._ports[self._sent:upto]
            self._sent = max(self._sent, upto)
            self.probes_sent += len(ports)
            assert self.target is not None   # set with the role (for mypy)
            return [(self.target[0], p) for p in ports]
        if self._next_resend is not None and now >= self._next_resend:
            self._next_resend = now + c.resend
            self.probes_sent += c.sockets
            return 1
        return 0

    def stats(self) -> dict:
        return {"attempts": self.attempts, "hits": self.hits, "probes": self.probes_sent,
                "sockets": self.sockets_opened, "active": self.state == ACTIVE, "role": self.role,
                "last_time_to_hit": self.last_time_to_hit}

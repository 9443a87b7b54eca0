"""NAT classification and port prediction from STUN observations made on one local socket.

What the mediation server must offer: STUN Binding on two public IP addresses x two UDP ports
(four endpoints: ip1:p1, ip1:p2, ip2:p1, ip2:p2). ``NatProbe`` queries them from the node's one
socket in a fixed order, staggered so the NAT sees the first packets in that order. From the
mapped addresses:

- no answer at all: UDP blocked; mapped == local: no NAT.
- same mapping for every endpoint: endpoint-independent mapping (hole punching works with any
  filtering behaviour, since the peer can learn the one mapping).
- ip1:p1 and ip1:p2 share a mapping but ip2 differs: address-dependent; all differ:
  address-and-port-dependent. With one server address only, "endpoint-dependent".
- for destination-dependent mappings, the deltas between consecutive new mappings tell
  sequential allocation (the most common delta, with the share of deltas agreeing as
  confidence; three deltas, i.e. four endpoints, are needed for full confidence) from random.
  Sequential NATs are then beaten by probing the predicted next ports.

Filtering behaviour is not measured (that needs RFC 5780 CHANGE-REQUEST from a second server
address): simultaneous probing from both sides opens the filters whatever they are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .candidate import Addr, normalize
from .stun import StunTransaction

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"
EDM = "endpoint-dependent"  # varies by destination; only one server address to tell which kind
UNKNOWN = "unknown"

SEQUENTIAL = "sequential"
RANDOM = "random"

MAX_DELTA = 64  # larger steps are indistinguishable from random allocation in practice
_PORT_LOW, _PORT_SPAN = 1024, 65536 - 1024


@dataclass(frozen=True, slots=True)
class Observation:
    """One Binding transaction: the server endpoint queried and the mapping it saw (None: no answer)."""

    server: Addr
    mapped: Addr | None


@dataclass(frozen=True, slots=True)
class NatReport:
    udp: bool  # at least one server answered
    local: Addr
    public: Addr | None  # mapping seen by the first server that answered (server-reflexive)
    behind_nat: bool | None
    mapping: str  # EIM / ADM / APDM / EDM / UNKNOWN
    port_preserved: bool  # the NAT kept our local port
    allocation: str | None  # SEQUENTIAL / RANDOM for destination-dependent mappings
    delta: int  # port step between consecutive new mappings (sequential allocation)
    confidence: float  # 0..1, share of observed deltas equal to ``delta``, scaled down below 3 deltas
    last_port: int | None  # newest mapped port, the base of the prediction
    public_ips: tuple[str, ...] = ()
    observed_ports: tuple[int, ...] = ()  # the distinct mapped ports the servers saw

    def gap_ports(self, count: int = 8) -> list[int]:
        """Ports inside the observed sequential run that no server saw: another flow of this host
        (e.g. a punch toward a peer that started during the probe) took them."""
        if not self.predictable or len(self.observed_ports) < 2:
            return []
        seen = set(self.observed_ports)
        lo, hi = min(seen), max(seen)
        step = abs(self.delta) or 1
        return [p for p in range(lo + step, hi, step) if p not in seen][:count]

    @property
    def varies_by_destination(self) -> bool:
        return self.mapping in (ADM, APDM, EDM)

    @property
    def predictable(self) -> bool:
        return self.varies_by_destination and self.allocation == SEQUENTIAL

    def predicted_ports(self, count: int) -> list[int]:
        """The next ``count`` ports this NAT should hand out for new destinations (empty if unpredictable)."""
        if not self.predictable or self.last_port is None:
            return []
        out = []
        for i in range(1, count + 1):
            p = self.last_port + self.delta * i
            out.append(_PORT_LOW + (p - _PORT_LOW) % _PORT_SPAN)
        return out


def classify(local: Addr, observations: Sequence[Observation]) -> NatReport:
    """Classify from observations listed in the order their first requests were sent."""
    local = normalize(local)
    answered = [o for o in observations if o.mapped is not None]
    if not answered:
        return NatReport(False, local, None, None, UNKNOWN, False, None, 0, 0.0, None)
    public = answered[0].mapped
    assert public is not None
    behind = public != local
    port_preserved = behind and public[1] == local[1]
    ips = tuple(dict.fromkeys(o.mapped[0] for o in answered if o.mapped))
    # one mapping per distinct server endpoint, in first-send order
    per_server: dict[Addr, Addr] = {}
    for o in answered:
        per_server.setdefault(o.server, o.mapped)  # type: ignore[arg-type]
    mappings = list(per_server.values())
    if len(per_server) < 2:
        mapping = EIM if not behind else UNKNOWN
        return NatReport(True, local, public, behind, mapping, port_preserved, None, 0, 0.0, public[1], ips)
    if len(set(mappings)) == 1:
        return NatReport(True, local, public, behind, EIM, port_preserved, None, 0, 0.0, public[1], ips)
    mapping = _dependency(per_server)
    allocation, delta, confidence, last = _allocation([m[1] for m in mappings])
    if allocation == SEQUENTIAL and mapping != ADM:
        # requests whose answers were lost after the last answered one still took ports
        answered_at = max(i for i, o in enumerate(observations) if o.mapped is not None)
        unanswered_new = {o.server for o in observations[answered_at + 1 :]} - set(per_server)
        last = _PORT_LOW + (last + delta * len(unanswered_new) - _PORT_LOW) % _PORT_SPAN
    return NatReport(True, local, public, behind, mapping, port_preserved, allocation, delta, confidence, last, ips,
                     tuple(dict.fromkeys(m[1] for m in mappings)))


def _dependency(per_server: dict[Addr, Addr]) -> str:
    """Address-dependent if endpoints sharing an IP share a mapping, else address-and-port-dependent."""
    by_ip: dict[str, set[Addr]] = {}
    for server, mapped in per_server.items():
        by_ip.setdefault(server[0], set()).add(mapped)
    same_ip_groups = [m for ip, m in by_ip.items() if sum(1 for s in per_server if s[0] == ip) > 1]
    if not same_ip_groups:
        return EDM
    # the mappings differ somewhere (checked by the caller): across addresses only, or per port
    return ADM if all(len(m) == 1 for m in same_ip_groups) else APDM


def _allocation(ports: list[int]) -> tuple[str, int, float, int]:
    """(SEQUENTIAL|RANDOM, delta, confidence, last port) from the ports of consecutive new mappings.

    Tried in send order first; then in ascending order, because a lost first request makes the
    NAT allocate at the retransmission, out of send order, while the set of ports stays a run.
    """
    uniq = list(dict.fromkeys(ports))  # address-dependent NATs repeat a mapping per address
    found = _run(uniq)
    if found is None:
        found = _run(sorted(uniq))
        if found is not None and uniq[-1] < uniq[0]:  # a decrementing counter, seen out of order
            found = (-found[0], found[1], min(uniq))
    if found is None:
        return RANDOM, 0, 0.0, uniq[-1]
    delta, confidence, last = found
    return SEQUENTIAL, delta, confidence, last


def _run(ports: list[int]) -> tuple[int, float, int] | None:
    """(delta, confidence, last port) if most consecutive deltas agree on a small step."""
    # deltas modulo the dynamic port range, so a counter wrapping from 65535 to 1024 is +1
    deltas = [(b - a + _PORT_SPAN // 2) % _PORT_SPAN - _PORT_SPAN // 2 for a, b in zip(ports, ports[1:])]
    if not deltas:
        return None
    delta, agree = Counter(deltas).most_common(1)[0]
    if delta == 0 or abs(delta) > MAX_DELTA:
        return None
    if len(deltas) > 1 and agree * 2 <= len(deltas):
        # an unanswered request still took a port, leaving a gap: accept steps that are all
        # small multiples of the smallest one, in one direction
        delta = min(deltas, key=abs)
        if delta == 0 or abs(delta) > MAX_DELTA or not all(d % delta == 0 and 0 < d // delta <= 4 for d in deltas):
            return None
        agree = deltas.count(delta)
    return delta, agree / max(len(deltas), 3), ports[-1]


class NatProbe:
    """Sans-I/O: query every STUN endpoint from one socket, then ``report()``.

    Transactions run in parallel but start ``stagger`` seconds apart, so a sequential NAT
    allocates in list order even though the answers may come back in any order.
    """

    def __init__(
        self,
        local: Addr,
        servers: Sequence[Addr],
        now: float,
        *,
        stagger: float = 0.02,
        rto: float = 0.25,
        rc: int = 4,
        rm: int = 4,
    ):
        if not 1 <= len(servers) <= 8:
            raise ValueError("between 1 and 8 STUN endpoints")
        self.local = normalize(local)
        self._servers = [normalize(s) for s in servers]
        self._starts = [now + i * stagger for i in range(len(servers))]
        self._params = (rto, rc, rm)
        self._tx: list[StunTransaction | None] = [None] * len(servers)
        self.handle_timer(now)

    @property
    def done(self) -> bool:
        return all(t is not None and t.done for t in self._tx)

    @property
    def rtt(self) -> float | None:
        """The fastest answered transaction's round-trip time (None until one answers)."""
        rtts = [t.rtt for t in self._tx if t is not None and t.rtt is not None]
        return min(rtts) if rtts else None

    def report(self) -> NatReport:
        obs = [Observation(s, t.result if t else None) for s, t in zip(self._servers, self._tx)]
        return classify(self.local, obs)

    def get_timer(self) -> float | None:
        times = [t.get_timer() if t else s for s, t in zip(self._starts, self._tx)]
        pending = [x for x in times if x is not None]
        return min(pending) if pending else None

    def handle_timer(self, now: float) -> None:
        rto, rc, rm = self._params
        for i, (server, start) in enumerate(zip(self._servers, self._starts)):
            tx = self._tx[i]
            if tx is None:
                if now >= start:
                    self._tx[i] = StunTransaction(server, now, rto=rto, rc=rc, rm=rm)
            else:
                tx.handle_timer(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out: list[tuple[bytes, Addr]] = []
        for tx in self._tx:
            if tx is not None:
                out += tx.datagrams_to_send(now)
        return out

    def receive(self, datagram: bytes, addr: Addr, now: float) -> bool:
        """True if the datagram answered one of our transactions."""
        return any(tx is not None and tx.receive(datagram, addr, now) for tx in self._tx)

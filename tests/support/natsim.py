"""Deterministic in-memory UDP internet with RFC 4787 NATs, driving the real ``overlay.nat`` cores.

The approach of Tailscale's natlab and pion's vnet, reduced to what path discovery needs:

- ``Network``: an event queue with an injected clock (``now``); nothing sleeps, so hours of
  keepalives run in milliseconds. Seeded randomness (loss on the internet leg, random port
  allocation).
- ``Host``: one or more UDP sockets, each driven by a sans-I/O *app* (``datagram_received``,
  ``datagrams_to_send``, ``get_timer``, ``handle_timer``); either on the public internet or on
  the LAN behind a ``Nat``.
- ``Nat``: mapping behaviour (endpoint-independent, address-dependent, address-and-port-
  dependent) x filtering behaviour (same three), sequential (with a delta) or random port
  allocation, optional port preservation, mapping timeout refreshed by outbound packets only
  (RFC 4787 REQ-6 allows inbound refresh; not doing it is the stricter case), no hairpinning,
  ``flush()`` to forget every mapping (a router reboot: NAT rebinding).
- ``StunServer`` (RFC 8489 responder from ``overlay.nat.stun``), ``Mediator`` (the mediation
  server's out-of-band control channel and relay) and ``SimNode`` (the node-side glue: STUN
  probe, discovery codec, one ``PeerPath`` per peer).
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from overlay import crypto
from overlay.nat import (
    DISCO,
    STUN,
    Candidate,
    DiscoCodec,
    DiscoError,
    NatProbe,
    NatReport,
    PathChanged,
    PeerPath,
    TraversalConfig,
    binding_response,
    classify_datagram,
)
from overlay.nat.candidate import LAN, PREDICTED, SRFLX

Addr = tuple[str, int]

EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"
SEQUENTIAL = "sequential"
RANDOM = "random"

LAN_LATENCY = 0.0005


class App(Protocol):
    def datagram_received(self, data: bytes, addr: Addr, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


class Network:
    def __init__(self, *, seed: int = 0, loss: float = 0.0):
        self.now = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.public: dict[str, Host | Nat] = {}
        self._blocked: set[frozenset[str]] = set()
        self.sent = 0
        self.dropped = 0

    # -------------------------------------------------------------- topology

    def host(self, ip: str, *, nat: Nat | None = None, latency: float = 0.010) -> Host:
        h = Host(self, ip, nat, latency)
        if nat is None:
            self.public[ip] = h
        else:
            nat.hosts[ip] = h
        return h

    def nat(self, public_ip: str, config: NatConfig | None = None, *, latency: float = 0.010) -> Nat:
        n = Nat(self, public_ip, config or NatConfig(), latency)
        self.public[public_ip] = n
        return n

    def block(self, ip_a: str, ip_b: str) -> None:
        """Drop every packet between two public addresses (a firewall in the way)."""
        self._blocked.add(frozenset((ip_a, ip_b)))

    def unblock(self, ip_a: str, ip_b: str) -> None:
        self._blocked.discard(frozenset((ip_a, ip_b)))

    # -------------------------------------------------------------- clock

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(t, self.now), self._seq, fn, args))

    def run_until(self, t: float, *, max_events: int = 2_000_000) -> None:
        n = 0
        while self._queue and self._queue[0][0] <= t:
            when, _, fn, args = heapq.heappop(self._queue)
            self.now = when
            fn(*args)
            n += 1
            if n > max_events:
                raise RuntimeError("simulation does not settle (event storm)")
        self.now = max(self.now, t)

    # -------------------------------------------------------------- routing

    def send(self, host: Host, sport: int, dst: Addr, data: bytes) -> None:
        self.sent += 1
        src = (host.ip, sport)
        nat = host.nat
        if nat is None:
            self._to_internet(src, dst, data, host.latency)
        elif dst[0] in nat.hosts:
            self.at(self.now + 2 * LAN_LATENCY, nat.hosts[dst[0]].deliver, dst[1], src, data)
        else:
            self.at(self.now + LAN_LATENCY, nat.outbound, src, dst, data)

    def _to_internet(self, src: Addr, dst: Addr, data: bytes, latency: float) -> None:
        target = self.public.get(dst[0])
        if target is None or frozenset((src[0], dst[0])) in self._blocked:
            self.dropped += 1
            return
        # random loss on the internet leg, after NAT translation, where it happens in practice
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.at(self.now + latency + target.latency, self._arrive, target, src, dst, data)

    def _arrive(self, target: Host | Nat, src: Addr, dst: Addr, data: bytes) -> None:
        if isinstance(target, Host):
            target.deliver(dst[1], src, data)
        else:
            target.inbound(src, dst, data)


class Host:
    def __init__(self, net: Network, ip: str, nat: Nat | None, latency: float):
        self.net, self.ip, self.nat, self.latency = net, ip, nat, latency
        self.sockets: dict[int, Socket] = {}

    def bind(self, port: int, app: App) -> Socket:
        s = Socket(self, port, app)
        self.sockets[port] = s
        return s

    def deliver(self, port: int, src: Addr, data: bytes) -> None:
        sock = self.sockets.get(port)
        if sock is None:
            self.net.dropped += 1
            return
        sock.app.datagram_received(data, src, self.net.now)
        sock.kick()


class Socket:
    """Binds an app to a port and runs it: flushes its output, keeps its one timer scheduled."""

    def __init__(self, host: Host, port: int, app: App):
        self.host, self.port, self.app = host, port, app
        self._gen = 0
        self._timer_at: float | None = None

    def kick(self) -> None:
        net = self.host.net
        for data, dst in self.app.datagrams_to_send(net.now):
            net.send(self.host, self.port, dst, data)
        t = self.app.get_timer()
        if t is not None and t != self._timer_at:
            self._timer_at = t
            self._gen += 1
            net.at(t, self._fire, self._gen)

    def _fire(self, gen: int) -> None:
        if gen != self._gen:
            return
        self._timer_at = None
        self.app.handle_timer(self.host.net.now)
        self.kick()


@dataclass
class NatConfig:
    mapping: str = EI
    filtering: str = APD
    allocation: str = SEQUENTIAL
    delta: int = 1
    port_preservation: bool = False
    timeout: float = 30.0
    first_port: int = 40000


@dataclass
class _Mapping:
    internal: Addr
    port: int
    expires: float
    permits: dict[Any, float] = field(default_factory=dict)


class Nat:
    def __init__(self, net: Network, public_ip: str, config: NatConfig, latency: float):
        self.net, self.ip, self.config, self.latency = net, public_ip, config, latency
        self.hosts: dict[str, Host] = {}
        self._by_key: dict[tuple[Any, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._next_port = config.first_port

    def flush(self) -> None:
        """Forget every mapping, as a rebooting router does (conntrack -F)."""
        self._by_key.clear()
        self._by_port.clear()

    @property
    def mappings(self) -> int:
        return sum(1 for m in self._by_port.values() if m.expires > self.net.now)

    def _key(self, internal: Addr, dst: Addr) -> tuple[Any, ...]:
        m = self.config.mapping
        return (internal,) if m == EI else (internal, dst[0]) if m == AD else (internal, dst)

    def _permit_key(self, remote: Addr) -> Any:
        f = self.config.filtering
        return None if f == EI else remote[0] if f == AD else remote

    def _alive(self, m: _Mapping | None) -> bool:
        if m is None:
            return False
        if m.expires <= self.net.now:
            self._by_port.pop(m.port, None)
            self._by_key = {k: v for k, v in self._by_key.items() if v is not m}
            return False
        return True

    def _allocate(self, internal: Addr) -> int:
        c = self.config
        if c.port_preservation and not self._alive(self._by_port.get(internal[1])):
            return internal[1]
        for _ in range(65536):
            if c.allocation == RANDOM:
                port = self.net.rng.randrange(1024, 65536)
            else:
                port = self._next_port
                self._next_port = 1024 + (self._next_port + c.delta - 1024) % (65536 - 1024)
            if not self._alive(self._by_port.get(port)):
                return port
        raise RuntimeError("NAT out of ports")

    def outbound(self, src: Addr, dst: Addr, data: bytes) -> None:
        now = self.net.now
        if dst[0] == self.ip:
            self.net.dropped += 1  # no hairpinning
            return
        key = self._key(src, dst)
        m = self._by_key.get(key)
        if not self._alive(m):
            m = _Mapping(src, self._allocate(src), now)
            self._by_key[key] = m
            self._by_port[m.port] = m
        assert m is not None
        m.expires = now + self.config.timeout
        m.permits[self._permit_key(dst)] = now + self.config.timeout
        self.net._to_internet((self.ip, m.port), dst, data, self.latency)

    def inbound(self, src: Addr, dst: Addr, data: bytes) -> None:
        m = self._by_port.get(dst[1])
        if not self._alive(m):
            self.net.dropped += 1
            return
        assert m is not None
        if m.permits.get(self._permit_key(src), 0.0) <= self.net.now:
            self.net.dropped += 1
            return
        host = self.hosts.get(m.internal[0])
        if host is None:
            self.net.dropped += 1
            return
        self.net.at(self.net.now + LAN_LATENCY, host.deliver, m.internal[1], src, data)


# ------------------------------------------------------------------ NAT classes by common name

NAT_TYPES: dict[str, NatConfig | None] = {
    "none": None,
    "full-cone": NatConfig(EI, EI),
    "restricted": NatConfig(EI, AD),
    "port-restricted": NatConfig(EI, APD),
    "symmetric-seq": NatConfig(APD, APD, SEQUENTIAL),
    "symmetric-random": NatConfig(APD, APD, RANDOM),
}


class StunServer:
    """The mediation server's STUN port (one instance per socket)."""

    def __init__(self) -> None:
        self._out: list[tuple[bytes, Addr]] = []

    def datagram_received(self, data: bytes, addr: Addr, now: float) -> None:
        reply = binding_response(data, addr)
        if reply is not None:
            self._out.append((reply, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def stun_servers(net: Network, ips: tuple[str, str] = ("203.0.113.1", "203.0.113.2"), ports: tuple[int, int] = (3478, 3479)) -> list[Addr]:
    """STUN on two addresses x two ports; returns the four endpoints in probing order."""
    endpoints = []
    for ip in ips:
        h = net.host(ip, latency=0.005)
        for port in ports:
            h.bind(port, StunServer())
    for ip in ips:
        for port in ports:
            endpoints.append((ip, port))
    return endpoints


class Mediator:
    """Out-of-band control channel (reliable, ``latency`` one way) and relay of the server."""

    def __init__(self, net: Network, latency: float = 0.05):
        self.net, self.latency = net, latency
        self.nodes: dict[bytes, SimNode] = {}
        self.relayed = 0

    def register(self, node: SimNode) -> None:
        self.nodes[node.public_key] = node
        node.mediator = self

    def introduce(self, a: SimNode, b: SimNode, punch_delay: float = 0.5) -> float:
        """Exchange candidates and give both a common punch start time; returns it."""
        at = self.net.now + self.latency + punch_delay
        for me, other in ((a, b), (b, a)):
            self.net.at(self.net.now + self.latency, me.introduced, other.public_key, other.candidates(), at)
        return at

    def relay(self, src: SimNode, dst: bytes, data: bytes) -> None:
        self.relayed += 1
        node = self.nodes.get(dst)
        if node is not None:
            self.net.at(self.net.now + 2 * self.latency, node.relay_received, data)


class SimNode:
    """Node-side glue over one UDP socket: STUN probe, discovery codec, a PeerPath per peer.

    Policy (what the real node glue should do too): when a path is lost, re-run the STUN probe
    and send a CallMeMaybe with the fresh candidates over the relay. With ``stun_refresh`` set,
    re-probe that often (which also keeps the server-reflexive mapping alive, as the real node's
    traffic to the server does) and tell peers without a direct path when the candidates change.
    """

    def __init__(
        self,
        net: Network,
        host: Host,
        port: int,
        servers: list[Addr],
        *,
        config: TraversalConfig | None = None,
        predict_window: int = 8,
        stun_refresh: float | None = None,
    ):
        self.net = net
        self.stun_refresh = stun_refresh
        self._next_refresh: float | None = None
        self.local = (host.ip, port)
        self.servers = servers
        self.config = config or TraversalConfig()
        self.predict_window = predict_window
        self.disco = DiscoCodec(crypto.generate_private_key(), accept_sender=lambda k: k in self.paths)
        self.public_key = self.disco.public_key
        self.paths: dict[bytes, PeerPath] = {}
        self.events: list[tuple[float, bytes, PathChanged]] = []
        self.first_direct: dict[bytes, float] = {}
        self.rejected = 0
        self.probe: NatProbe | None = None
        self.report: NatReport | None = None
        self.mediator: Mediator | None = None
        self._reprobe_for: set[bytes] = set()
        self.sock = host.bind(port, self)

    # -------------------------------------------------------------- glue actions

    def start_probe(self) -> None:
        self.probe = NatProbe(self.local, self.servers, self.net.now)
        self.report = None
        self.sock.kick()

    def candidates(self) -> list[Candidate]:
        out = [Candidate(self.local, LAN)]
        r = self.report
        if r is not None and r.public is not None and r.behind_nat:
            out += [Candidate((r.public[0], p), PREDICTED) for p in r.predicted_ports(self.predict_window)]
            out.append(Candidate(r.public, SRFLX))
        return out

    def introduced(self, peer: bytes, candidates: list[Candidate], at: float) -> None:
        path = self.paths.get(peer)
        if path is None:
            path = self.paths[peer] = PeerPath(self.disco, peer, self.config)
        path.set_remote_candidates(candidates)
        path.start_punch(at)
        self.sock.kick()

    def relay_received(self, data: bytes) -> None:
        try:
            sender, msg = self.disco.open(data)
        except DiscoError:
            self.rejected += 1
            return
        self.paths[sender].receive(msg, None, self.net.now)
        self._after(self.net.now)
        self.sock.kick()

    # -------------------------------------------------------------- App

    def datagram_received(self, data: bytes, addr: Addr, now: float) -> None:
        kind = classify_datagram(data)
        if kind == STUN and self.probe is not None:
            self.probe.receive(data, addr, now)
        elif kind == DISCO:
            try:
                sender, msg = self.disco.open(data)
            except DiscoError:
                self.rejected += 1
                return
            self.paths[sender].receive(msg, addr, now)
        self._after(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out = self.probe.datagrams_to_send(now) if self.probe is not None else []
        for p in self.paths.values():
            out += p.datagrams_to_send(now)
        return out

    def get_timer(self) -> float | None:
        times = [p.get_timer() for p in self.paths.values()]
        if self.probe is not None:
            times.append(self.probe.get_timer())
        times.append(self._next_refresh)
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def handle_timer(self, now: float) -> None:
        if self._next_refresh is not None and now >= self._next_refresh:
            self._next_refresh = None
            if self.probe is None:
                self.probe = NatProbe(self.local, self.servers, now)
        if self.probe is not None:
            self.probe.handle_timer(now)
        for p in self.paths.values():
            t = p.get_timer()
            if t is not None and t <= now:
                p.handle_timer(now)
        self._after(now)

    def _after(self, now: float) -> None:
        if self.probe is not None and self.probe.done:
            before = self.candidates()
            self.report = self.probe.report()
            self.probe = None
            if self.stun_refresh is not None:
                self._next_refresh = now + self.stun_refresh
            tell = set(self._reprobe_for)
            if self.candidates() != before:
                tell.update(self.paths)
            for peer in tell:
                path = self.paths[peer]
                if path.current_path is None and self.mediator is not None:
                    self.mediator.relay(self, peer, path.call_me_maybe(self.candidates(), now))
            self._reprobe_for.clear()
        for peer, path in self.paths.items():
            while (ev := path.next_event()) is not None:
                self.events.append((now, peer, ev))
                if ev.path is not None:
                    self.first_direct.setdefault(peer, now)
                elif ev.reason == "lost":
                    self._reprobe_for.add(peer)
                    if self.probe is None:
                        self.probe = NatProbe(self.local, self.servers, now)


def node_behind(
    net: Network,
    nat_type: str,
    index: int,
    servers: list[Addr],
    *,
    config: TraversalConfig | None = None,
    timeout: float = 30.0,
    port: int = 41641,
    stun_refresh: float | None = None,
) -> tuple[SimNode, Nat | None]:
    """A node at 10.0.<index>.2 behind a NAT of ``NAT_TYPES[nat_type]`` on 198.51.100.<10+index>."""
    public_ip = f"198.51.100.{10 + index}"
    cfg = NAT_TYPES[nat_type]
    if cfg is None:
        return SimNode(net, net.host(public_ip), port, servers, config=config, stun_refresh=stun_refresh), None
    nat = net.nat(public_ip, dataclasses.replace(cfg, timeout=timeout, first_port=40000 + 5000 * index))
    node = SimNode(net, net.host(f"10.0.{index}.2", nat=nat), port, servers, config=config, stun_refresh=stun_refresh)
    return node, nat


def connect(net: Network, a: SimNode, b: SimNode, *, probe_time: float = 4.0) -> tuple[Mediator, float]:
    """Probe both NATs, then introduce the nodes; returns the mediator and the punch start time."""
    med = Mediator(net)
    for n in (a, b):
        med.register(n)
        n.start_probe()
    net.run_until(net.now + probe_time)
    assert a.report is not None and b.report is not None
    return med, med.introduce(a, b)

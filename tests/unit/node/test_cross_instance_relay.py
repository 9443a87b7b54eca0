"""A pair of nodes on two server instances (one PostgreSQL) relaying through one of them, sans-I/O.

Two ``RelayServer`` built from one server key (as two instances of one deployment are) and two
nodes' ``ServerPath``, wired together by an in-memory "network" that hands each datagram to
whoever owns its destination address. Node a is on instance A, node b on instance B; each learns
the other's instance relay from its member record. The pair rule (the instance of the smaller key)
decides which relay carries them; the other node registers there too.
"""

from __future__ import annotations

import itertools

import pytest

from overlay import crypto
from overlay.node.server_path import MAX_FOREIGN, ServerPath, relays_through_peer
from overlay.node.state import NodeState
from overlay.relay import frames
from overlay.relay.server import RelayServer, relay_secret
from overlay.server.mediator import Mediator
from overlay.server.store import Store

RELAY_A = ("198.51.100.1", 7777)
RELAY_B = ("198.51.100.2", 7777)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Node:
    """One node's ServerPath, at its own addresses (its NAT gives it another port per relay)."""

    ports = itertools.count(40000)

    def __init__(self, key: bytes, server: tuple[str, int], token: bytes, clock: Clock, ip: str):
        self.key, self.ip = key, ip
        self.out: list = []
        self.control: list[dict] = []
        self.stats = {"not_ours": 0, "relay_tcp_tx": 0}
        self.path = ServerPath(key, now=clock, out=self.out, schedule_flush=lambda: None,
                               send_control=self.control.append, on_public=lambda: None, stats=self.stats)
        self.path.server_udp = server
        self.path.set_token(token)
        self.addr_toward: dict[tuple, tuple] = {}      # a symmetric NAT: one mapping per destination
        self.received: list[tuple[bytes, bytes]] = []

    def mapped(self, dst: tuple) -> tuple:
        if dst not in self.addr_toward:
            self.addr_toward[dst] = (self.ip, next(self.ports))
        return self.addr_toward[dst]


class World:
    def __init__(self, small_on_a: bool = True, may_relay=None):
        server_key = crypto.generate_private_key()
        self.clock = Clock()
        secret = relay_secret(server_key)
        allow = may_relay or (lambda s, d: True)
        self.relays = {RELAY_A: RelayServer(allow, secret=secret), RELAY_B: RelayServer(allow, secret=secret)}
        k1, k2 = sorted(crypto.public_key(crypto.generate_private_key()) for _ in range(2))
        ka, kb = (k1, k2) if small_on_a else (k2, k1)
        a_relay = self.relays[RELAY_A]
        self.a = Node(ka, RELAY_A, a_relay.token_for(ka), self.clock, "203.0.113.1")
        self.b = Node(kb, RELAY_B, self.relays[RELAY_B].token_for(kb), self.clock, "203.0.113.2")
        self.nodes = [self.a, self.b]

    def pump(self, rounds: int = 20) -> None:
        """Deliver datagrams until nothing moves: nodes -> relays -> nodes."""
        for _ in range(rounds):
            moved = False
            for n in self.nodes:
                n.path.register_tick(self.clock.t)
                batch, n.out[:] = list(n.out), []
                for data, dst in batch:
                    moved = True
                    self._to_relay(n, data, dst)
            if not moved:
                return

    def _to_relay(self, n: Node, data: bytes, dst: tuple) -> None:
        relay = self.relays.get(dst)
        if relay is None:
            return
        src = n.mapped(dst)
        for reply, to in relay.receive(data, src, self.clock.t):
            for m in self.nodes:
                if m.addr_toward.get(dst) == to:
                    got = m.path.relay_receive(reply, dst)
                    if got is not None:
                        m.received.append(got)

    def send(self, frm: Node, to: Node, payload: bytes) -> None:
        batch: list = []
        frm.path.relay_send(to.key, payload, batch)
        for data, dst in batch:
            self._to_relay(frm, data, dst)

    def learn_records(self) -> None:
        """Each node's member record of the other says which instance's relay it is on."""
        self.a.path.set_peer_relays({self.b.key: RELAY_B})
        self.b.path.set_peer_relays({self.a.key: RELAY_A})


def test_a_token_is_valid_on_every_relay_built_from_one_server_key():
    server_key = crypto.generate_private_key()
    one, two = (RelayServer(lambda s, d: True, secret=relay_secret(server_key)) for _ in range(2))
    other = RelayServer(lambda s, d: True, secret=relay_secret(crypto.generate_private_key()))
    node = crypto.public_key(crypto.generate_private_key())
    token = one.token_for(node)
    assert two.token_for(node) == token and other.token_for(node) != token
    assert relay_secret(server_key) != server_key and len(relay_secret(server_key)) == 32
    addr, now = ("203.0.113.5", 5000), 100.0
    for relay, ok in ((one, True), (two, True), (other, False)):
        nonce = relay.nonce_for(addr, now)
        out = relay.receive(frames.register(node, token, nonce), addr, now)
        assert (out == [(frames.registered(), addr)]) is ok, out
        assert (relay.udp_address(node) == addr) is ok
    # a nonce one instance made is good on the other (same secret), never on another deployment's
    nonce = one.nonce_for(addr, now)
    assert two.receive(frames.register(node, token, nonce), addr, now) == [(frames.registered(), addr)]
    assert other.receive(frames.register(node, token, nonce), addr, now)[0][0][4] == frames.CHALLENGE


def test_pair_rule_is_the_same_on_both_sides():
    k1, k2 = sorted(crypto.public_key(crypto.generate_private_key()) for _ in range(2))
    assert relays_through_peer(k2, k1) and not relays_through_peer(k1, k2)   # through k1's instance
    for small_on_a, carrier in ((True, RELAY_A), (False, RELAY_B)):
        w = World(small_on_a)
        w.learn_records()
        larger, smaller = (w.b, w.a) if small_on_a else (w.a, w.b)
        assert larger.path.via == {smaller.key: carrier} and list(larger.path.foreign) == [carrier]
        assert smaller.path.via == {} and smaller.path.foreign == {}


@pytest.mark.parametrize("small_on_a", [True, False])
def test_a_pair_on_two_instances_relays_through_the_smaller_keys_instance(small_on_a):
    w = World(small_on_a)
    carrier = RELAY_A if small_on_a else RELAY_B
    other = RELAY_B if small_on_a else RELAY_A
    w.pump()
    assert w.a.path.udp_ok and w.b.path.udp_ok            # each registered at its own instance
    w.learn_records()
    w.pump()                                              # the larger key registers at the carrier
    larger = w.b if small_on_a else w.a
    assert larger.path.foreign[carrier].ok
    assert w.relays[carrier].udp_address(larger.key) == larger.addr_toward[carrier]
    assert w.relays[carrier].udp_address(w.a.key if small_on_a else w.b.key) is not None
    assert larger.path.foreign_summary() == [{"address": f"{carrier[0]}:{carrier[1]}", "registered": True,
                                              "peers": 1}]

    w.send(w.a, w.b, b"wireguard a->b")
    w.send(w.b, w.a, b"wireguard b->a")
    assert w.b.received == [(w.a.key, b"wireguard a->b")]
    assert w.a.received == [(w.b.key, b"wireguard b->a")]
    assert w.relays[carrier].stats["forwarded"] == 2 and w.relays[other].stats["forwarded"] == 0
    assert w.a.control == [] and w.b.control == []        # nothing over the control connections

    # the registration is kept alive like the first (the relay's TTL is far longer)
    for _ in range(12):
        w.clock.t += 10.0
        w.pump()
    assert larger.path.foreign[carrier].ok
    w.send(w.a, w.b, b"later")
    assert w.b.received[-1] == (w.a.key, b"later")

    # the peer no longer on another instance (it left, or both now share one): no registration there
    larger.path.set_peer_relays({})
    assert larger.path.foreign == {} and larger.path.via == {}
    sent = len(larger.out)
    w.clock.t += 30.0
    larger.path.register_tick(w.clock.t)
    assert all(dst != carrier for _, dst in larger.out[sent:])


def test_before_the_foreign_relay_answers_frames_go_the_old_way():
    w = World(True)
    w.pump()
    w.learn_records()             # b (the larger) has not registered at A yet
    batch: list = []
    w.b.path.relay_send(w.a.key, b"x", batch)
    assert batch == [(frames.data(w.a.key, b"x"), RELAY_B)]


def test_frames_from_an_unknown_relay_are_not_ours_and_the_foreign_ones_are_bounded():
    w = World(True)
    w.learn_records()
    assert w.b.path.relay_receive(frames.data(w.a.key, b"x"), ("192.0.2.9", 7777)) is None
    assert w.b.stats["not_ours"] == 1
    assert w.b.path.relay_receive(frames.data(w.a.key, b"x"), RELAY_A) == (w.a.key, b"x")
    many = {crypto.public_key(crypto.generate_private_key()): ("192.0.2.1", 1000 + i) for i in range(40)}
    keys = {k: v for k, v in many.items() if relays_through_peer(w.b.key, k)}
    w.b.path.set_peer_relays({**keys, w.a.key: RELAY_B})        # our own server: never "foreign"
    assert len(w.b.path.foreign) == min(len(keys), MAX_FOREIGN)
    assert RELAY_B not in w.b.path.foreign
    # a loopback relay address (a node on the other server's own machine reached it there) is no
    # relay for a node whose server is not on loopback
    w.b.path.set_peer_relays({w.a.key: ("127.0.0.1", 7777)})
    assert w.b.path.foreign == {} and w.b.path.via == {}
    w.b.path.server_is_loopback = True
    w.b.path.set_peer_relays({w.a.key: ("127.0.0.1", 7777)})
    assert w.b.path.via == {w.a.key: ("127.0.0.1", 7777)}


def test_a_stranger_registered_at_the_carrier_is_refused():
    """c is registered at instance A with a good token but shares no network with b: A refuses it."""
    w = World(True)
    c_key = crypto.public_key(crypto.generate_private_key())
    pair = {w.a.key, w.b.key}
    for relay in w.relays.values():
        relay.may_relay = lambda s, d: s in pair and d in pair and s != d
    c = Node(c_key, RELAY_A, w.relays[RELAY_A].token_for(c_key), w.clock, "203.0.113.3")
    w.nodes.append(c)
    w.pump()
    w.learn_records()
    w.pump()
    assert c.path.udp_ok
    before = w.relays[RELAY_A].stats["refused"]
    w.send(c, w.b, b"let me in")
    assert w.b.received == [] and w.relays[RELAY_A].stats["refused"] == before + 1
    # a forged token (another deployment's) registers nothing
    forged = Node(c_key, RELAY_A, b"\x00" * frames.TOKEN_LEN, w.clock, "203.0.113.4")
    w.nodes.append(forged)
    w.pump()
    assert not forged.path.udp_ok


def test_the_member_record_names_the_other_instances_relay_and_the_node_reads_it():
    store = Store(":memory:")
    m = Mediator(store, identity_bits=0)
    a, b = crypto.public_key(crypto.generate_private_key()), crypto.public_key(crypto.generate_private_key())
    elsewhere = {b: "198.51.100.2:7777"}
    m.relay_of = elsewhere.get
    m.hello(a, {"t": "hello", "id": 1, "name": "alice", "version": 1}, 0.0)
    m.handle(a, {"t": "create", "id": 2, "network": "lan", "password": "pw"}, 0.0, password_hash=b"h")
    m.hello(b, {"t": "hello", "id": 1, "name": "bob", "version": 1}, 0.0)
    m.handle(b, {"t": "join", "id": 2, "network": "lan", "password": "pw"}, 0.0, password_ok=True)
    net = store.network("lan")
    assert m._member_record(net, b)["relay"] == "198.51.100.2:7777"
    assert "relay" not in m._member_record(net, a)        # on this instance
    m.disconnect(b, 1.0)
    assert "relay" not in m._member_record(net, b)        # offline: no relay

    st = NodeState()
    st.me = {"key": "me"}
    rec = {"name": "bob", "key": "Ym9i", "ip": "100.64.0.2", "online": True, "role": "member"}
    st.apply({"t": "members", "network": "lan", "members": [{**rec, "relay": "198.51.100.2:7777"}]})
    (peer,) = st.peers().values()
    assert peer.relay == ("198.51.100.2", 7777)
    for bad in ("relay.example:7777", "198.51.100.2", 7777, "1" * 100, "[::1]:0"):
        st.apply({"t": "members", "network": "lan", "members": [{**rec, "relay": bad}]})
        assert next(iter(st.peers().values())).relay is None, bad
    st.apply({"t": "members", "network": "lan", "members": [{**rec, "relay": "[2001:db8::2]:7777"}]})
    assert next(iter(st.peers().values())).relay == ("2001:db8::2", 7777)

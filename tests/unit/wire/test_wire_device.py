"""Two or more Devices on a simulated network with an injected clock: protocol behaviour over time."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Hashable

import pytest

from overlay import crypto
from overlay.wire import Device, EndpointChanged, HandshakeCompleted, PacketReceived, PeerUnreachable
from overlay.wire.constants import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from overlay.wire.device import UNDER_LOAD_HANDSHAKES_PER_SECOND
from overlay.wire.messages import MSG_INITIATION, MSG_TRANSPORT
from overlay.wire.peer import MAX_STAGED_PACKETS

WALL_EPOCH = 1_700_000_000.0


def ipv4(payload: bytes, src: int = 1, dst: int = 2) -> bytes:
    """A minimal IPv4 packet (protocol 253, experimental) around ``payload``."""
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 253, 0,
                         bytes([10, 0, 0, src]), bytes([10, 0, 0, dst]))
    return header + payload


class Sim:
    """An in-memory network: each device lives at an address; datagrams are delivered in order."""

    def __init__(self, seed: int = 1):
        self.now = 0.0
        self.rng = random.Random(seed)
        self.devices: dict[Hashable, Device] = {}
        self.addr_of: dict[int, Hashable] = {}
        self.events: dict[int, list] = {}
        self.wire: list[tuple[float, Hashable, Hashable, bytes]] = []
        self.drop: Callable[[Hashable, Hashable, bytes], bool] = lambda src, dst, data: False

    def device(self, addr: Hashable, **kw) -> Device:
        dev = Device(crypto.generate_private_key(), wallclock=lambda: WALL_EPOCH + self.now,
                     rng=random.Random(self.rng.random()), **kw)
        self.devices[addr] = dev
        self.addr_of[id(dev)] = addr
        self.events[id(dev)] = []
        return dev

    def move(self, dev: Device, addr: Hashable) -> None:
        """The device's traffic now comes from ``addr`` (a NAT rebinding, say)."""
        del self.devices[self.addr_of[id(dev)]]
        self.devices[addr] = dev
        self.addr_of[id(dev)] = addr

    def pair(self, **kw) -> tuple[Device, Device]:
        a, b = self.device(("10.0.0.1", 51820)), self.device(("10.0.0.2", 51820))
        a.add_peer(b.public_key, endpoint=("10.0.0.2", 51820), **kw)
        b.add_peer(a.public_key, endpoint=("10.0.0.1", 51820), **kw)
        return a, b

    def pump(self) -> None:
        """Deliver until no device has anything left to send."""
        moved = True
        while moved:
            moved = False
            for dev in list(self.devices.values()):
                self.collect(dev)
                src = self.addr_of[id(dev)]
                for data, dst in dev.datagrams_to_send():
                    moved = True
                    self.wire.append((self.now, src, dst, data))
                    target = self.devices.get(dst)
                    if target is not None and not self.drop(src, dst, data):
                        target.receive(data, src, self.now)
        for dev in self.devices.values():
            self.collect(dev)

    def collect(self, dev: Device) -> None:
        while (event := dev.next_event()) is not None:
            self.events[id(dev)].append((self.now, event))

    def run_until(self, t: float) -> None:
        """Advance the clock to ``t``, firing every timer on the way."""
        self.pump()
        while True:
            due = [d.get_timer() for d in self.devices.values()]
            due = [x for x in due if x is not None]
            nxt = min(due) if due else None
            if nxt is None or nxt > t:
                self.now = t
                return
            self.now = max(self.now, nxt)
            for dev in list(self.devices.values()):
                timer = dev.get_timer()
                if timer is not None and timer <= self.now:
                    dev.handle_timer(self.now)
            self.pump()

    def send(self, src: Device, dst: Device, packet: bytes) -> None:
        src.send(dst.public_key, packet, self.now)
        self.pump()

    def received(self, dev: Device, kind: type = PacketReceived) -> list:
        return [e for _, e in self.events[id(dev)] if isinstance(e, kind)]

    def sent(self, src: Device, msg_type: int, size: int | None = None) -> list[tuple[float, bytes]]:
        addr = self.addr_of[id(src)]
        return [(t, d) for t, s, _, d in self.wire
                if s == addr and d[0] == msg_type and (size is None or len(d) == size)]


def test_handshake_then_packets_both_ways():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"hello"))
    assert [e.packet for e in sim.received(b)] == [ipv4(b"hello")]
    assert sim.received(b)[0].public_key == a.public_key
    assert len(sim.received(a, HandshakeCompleted)) == 1 and len(sim.received(b, HandshakeCompleted)) == 1
    sim.send(b, a, ipv4(b"world", 2, 1))
    assert [e.packet for e in sim.received(a)] == [ipv4(b"world", 2, 1)]
    assert a.stats["initiations_tx"] == 1 and b.stats["responses_tx"] == 1
    assert b.peer_stats(a.public_key)["last_handshake"] == 0.0
    assert a.peer_stats(b.public_key)["tx_packets"] == 1


def test_padding_to_16_and_trimmed_on_receipt():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"x" * 5))  # 25-byte packet
    sizes = [len(d) for _, d in sim.sent(a, MSG_TRANSPORT)]
    assert sizes == [16 + 32 + 16]
    assert sim.received(b)[0].packet == ipv4(b"x" * 5)
    other = b"\x01non-ip frame"  # a non-IP inner type travels unpadded and unchanged
    sim.send(a, b, other)
    assert len(sim.sent(a, MSG_TRANSPORT)[-1][1]) == 16 + len(other) + 16
    assert sim.received(b)[-1].packet == other


def test_bad_inner_ipv4_length_dropped():
    sim = Sim()
    a, b = sim.pair()
    bad = bytearray(ipv4(b"abc"))
    bad[2:4] = (200).to_bytes(2, "big")
    sim.send(a, b, bytes(bad))
    assert sim.received(b) == [] and b.stats["bad_inner_packet"] == 1


def test_staged_queue_is_bounded_and_flushed_in_order():
    sim = Sim()
    a, b = sim.pair()
    sim.drop = lambda src, dst, data: True  # hold the handshake back
    for i in range(MAX_STAGED_PACKETS + 50):
        sim.send(a, b, ipv4(i.to_bytes(4, "big")))
    assert a.stats["staged_dropped"] == 50
    assert a.peer_stats(b.public_key)["staged"] == MAX_STAGED_PACKETS
    sim.drop = lambda src, dst, data: False
    sim.run_until(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)  # the retry gets through
    got = [int.from_bytes(e.packet[20:], "big") for e in sim.received(b)]
    assert got == list(range(50, MAX_STAGED_PACKETS + 50))
    assert a.stats["packets_tx"] == MAX_STAGED_PACKETS == b.stats["packets_rx"]


def test_rekey_after_120s_while_traffic_continues():
    sim = Sim()
    a, b = sim.pair()
    sent = 0
    first_key = None
    for second in range(0, 400):
        sim.run_until(float(second))
        sim.send(a, b, ipv4(b"a%d" % second))
        sim.send(b, a, ipv4(b"b%d" % second, 2, 1))
        sent += 1
        if first_key is None:
            first_key = a._peers[b.public_key].keypairs.current
    sim.run_until(400.5)
    assert len(sim.received(b)) == sent and len(sim.received(a)) == sent  # nothing lost across rekeys
    # The initiator rekeys once its keypair is REKEY_AFTER_TIME old: at ~120, ~240, ~360 s.
    times = [t for t, _ in sim.sent(a, MSG_INITIATION)]
    assert len(times) == 4
    for t, expected in zip(times[1:], (REKEY_AFTER_TIME, 2 * REKEY_AFTER_TIME, 3 * REKEY_AFTER_TIME)):
        assert expected <= t <= expected + 1.0
    assert a._peers[b.public_key].keypairs.current is not first_key
    assert a.stats["auth_failed"] == b.stats["auth_failed"] == 0
    assert b.stats["handshake_replay"] == 0


def test_reject_after_180s():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"early"))
    stale = sim.sent(a, MSG_TRANSPORT)[-1][1]
    sim.run_until(REJECT_AFTER_TIME + 1)
    # A datagram under a keypair older than REJECT_AFTER_TIME is refused...
    b.receive(stale[:8] + (99).to_bytes(8, "little") + stale[16:], sim.addr_of[id(a)], sim.now)
    assert b.stats["expired_key"] == 1
    # ...and the sender does not use such a keypair: it handshakes first.
    before = len(sim.sent(a, MSG_INITIATION))
    a.send(b.public_key, ipv4(b"late"), sim.now)
    out = a.datagrams_to_send()
    assert [d[0] for d, _ in out] == [MSG_INITIATION]
    for data, _ in out:
        b.receive(data, sim.addr_of[id(a)], sim.now)
    sim.pump()
    assert len(sim.sent(a, MSG_INITIATION)) == before  # (sent directly above, not through the sim)
    assert [e.packet for e in sim.received(b)] == [ipv4(b"early"), ipv4(b"late")]


def test_previous_keypair_still_decrypts_packets_in_flight():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"one"))
    sim.run_until(REKEY_AFTER_TIME + 1)
    a.send(b.public_key, ipv4(b"in flight"), sim.now)  # old key; this send also triggers the rekey
    out = a.datagrams_to_send()
    assert [d[0] for d, _ in out] == [MSG_TRANSPORT, MSG_INITIATION]
    in_flight = out[0][0]
    for data, _ in out[1:]:
        b.receive(data, sim.addr_of[id(a)], sim.now)
    sim.pump()  # response, then a's confirming keepalive: b rotates to the new keypair
    assert len(sim.received(b, HandshakeCompleted)) == 2
    b.receive(in_flight, sim.addr_of[id(a)], sim.now)
    sim.collect(b)
    assert [e.packet for e in sim.received(b)][-1] == ipv4(b"in flight")


def test_passive_keepalive_after_10s_of_one_way_traffic():
    sim = Sim()
    a, b = sim.pair()
    for second in range(0, 31):
        sim.run_until(float(second))
        sim.send(a, b, ipv4(b"%d" % second))
    sim.run_until(31.0)
    keepalives = sim.sent(b, MSG_TRANSPORT, size=32)
    # b only receives, so it confirms liveness with an empty packet every KEEPALIVE_TIMEOUT.
    assert [round(t) for t, _ in keepalives] == [10, 20, 30]
    assert a.stats["keepalives_rx"] == 3
    # Those keepalives are why a never suspects the session: one handshake in total.
    assert len(sim.sent(a, MSG_INITIATION)) == 1
    # Once a falls silent, the keepalive timer runs out within two more rounds, then nothing.
    sim.run_until(100.0)
    assert [round(t) for t, _ in sim.sent(b, MSG_TRANSPORT, size=32)] == [10, 20, 30, 40, 50]


def test_new_handshake_when_data_goes_unanswered():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"x"))
    sim.drop = lambda src, dst, data: src == sim.addr_of[id(b)]  # b's replies are lost
    sim.run_until(1.0)
    sim.send(a, b, ipv4(b"y"))
    sim.run_until(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    times = [t for t, _ in sim.sent(a, MSG_INITIATION)]
    # Armed by the first data packet at t=0 and never cleared, since nothing came back.
    assert len(times) == 2 and 15.0 <= times[1] <= 15.0 + REKEY_TIMEOUT_JITTER_MAX


def test_handshake_retries_every_5s_then_gives_up_after_90s():
    sim = Sim()
    a = sim.device(("10.0.0.1", 1))
    silent = crypto.public_key(crypto.generate_private_key())
    a.add_peer(silent, endpoint=("10.0.0.9", 1))  # nobody lives there
    a.send(silent, ipv4(b"lost"), 0.0)
    sim.run_until(3600.0)
    times = [t for t, _ in sim.sent(a, MSG_INITIATION)]
    assert len(times) == int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 initiations
    gaps = [y - x for x, y in zip(times, times[1:])]
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps), gaps
    unreachable = [(t, e) for t, e in sim.events[id(a)] if isinstance(e, PeerUnreachable)]
    assert len(unreachable) == 1
    assert REKEY_ATTEMPT_TIME <= unreachable[0][0] <= REKEY_ATTEMPT_TIME + 18 * REKEY_TIMEOUT_JITTER_MAX
    assert a.peer_stats(silent)["staged"] == 0
    assert a.get_timer() is None  # everything wound down; nothing left to do for an hour
    a.send(silent, ipv4(b"again"), sim.now)  # new traffic starts over
    assert len(sim.sent(a, MSG_INITIATION)) == 18 and a.datagrams_to_send()[0][0][0] == MSG_INITIATION


def test_cookie_reply_under_load_then_mac2_accepted():
    sim = Sim()
    a, b = sim.pair()
    b.force_under_load = True
    sim.send(a, b, ipv4(b"hi"))
    assert b.stats["cookie_sent"] == 1 and a.stats["cookie_received"] == 1
    assert b.stats["initiations_rx"] == 0 and sim.received(b) == []
    sim.run_until(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    # The retry carries mac2 from the cookie: b spends its DH work and answers.
    assert b.stats["initiations_rx"] == 1 and b.stats["cookie_sent"] == 1
    assert [e.packet for e in sim.received(b)] == [ipv4(b"hi")]


def test_cookie_is_bound_to_the_source_address():
    sim = Sim()
    a, b = sim.pair()
    b.force_under_load = True
    sim.send(a, b, ipv4(b"hi"))
    assert a.stats["cookie_received"] == 1
    sim.move(a, ("10.0.0.77", 4000))  # the retry comes from elsewhere: its mac2 does not verify
    sim.run_until(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    assert b.stats["cookie_sent"] == 2 and b.stats["initiations_rx"] == 0


def test_under_load_one_ip_gets_a_bounded_handshake_rate():
    sim = Sim()
    b = sim.device(("10.0.0.2", 51820))
    b.force_under_load = True
    clients = []
    for port in range(1, 11):  # ten peers behind one IP, each with its own port and cookie
        c = sim.device(("192.0.2.1", port))
        c.add_peer(b.public_key, endpoint=("10.0.0.2", 51820))
        b.add_peer(c.public_key)
        c.initiate_handshake(b.public_key, 0.0)
        clients.append(c)
    sim.pump()
    assert b.stats["cookie_sent"] == 10 and all(c.stats["cookie_received"] == 1 for c in clients)
    retries = []
    for c in clients:  # each retries with a valid mac2, all within the same instant at b
        c.handle_timer(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
        retries += c.datagrams_to_send()
    for (data, _), c in zip(retries, clients):
        b.receive(data, sim.addr_of[id(c)], 10.0)
    assert b.stats["initiations_rx"] == 5 and b.stats["handshake_rate_limited"] == 5
    # Another IP is not affected, and the first IP's bucket refills with time.
    other = sim.device(("198.51.100.7", 1))
    other.add_peer(b.public_key, endpoint=("10.0.0.2", 51820))
    b.add_peer(other.public_key)
    sim.now = 20.0
    sim.send(other, b, ipv4(b"x"))
    sim.run_until(20.0 + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    assert [e.public_key for e in sim.received(b)] == [other.public_key]


def test_flood_of_initiations_turns_on_cookies():
    sim = Sim()
    a, b = sim.pair()
    a.send(b.public_key, ipv4(b"x"), 0.0)
    (init, _), = a.datagrams_to_send()
    for _ in range(UNDER_LOAD_HANDSHAKES_PER_SECOND + 10):
        b.receive(init, ("10.0.0.1", 51820), 0.5)
    assert b.stats["initiations_rx"] == 1 and b.stats["handshake_replay"] == UNDER_LOAD_HANDSHAKES_PER_SECOND - 1
    assert b.stats["cookie_sent"] == 10
    # Load subsides: a second later cookies are no longer demanded.
    b.receive(init, ("10.0.0.1", 51820), 3.0)
    assert b.stats["cookie_sent"] == 10 and b.stats["handshake_replay"] == UNDER_LOAD_HANDSHAKES_PER_SECOND


def test_old_initiation_replay_rejected_and_flood_limited():
    sim = Sim()
    a, b = sim.pair()
    a_addr = sim.addr_of[id(a)]
    a.send(b.public_key, ipv4(b"x"), 0.0)
    (first, _), = a.datagrams_to_send()
    a.handle_timer(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    (second, _), = a.datagrams_to_send()
    assert first[0] == second[0] == MSG_INITIATION
    b.receive(second, a_addr, 10.0)
    assert b.stats["initiations_rx"] == 1
    b.receive(first, a_addr, 20.0)  # older TAI64N timestamp
    b.receive(second, a_addr, 30.0)  # same timestamp
    assert b.stats["handshake_replay"] == 2 and b.stats["initiations_rx"] == 1
    # Two fresh initiations consumed within 20 ms: the second is a flood, accepted a bit later.
    a.initiate_handshake(b.public_key, 100.0)
    a.initiate_handshake(b.public_key, 106.0)
    (third, _), (fourth, _) = a.datagrams_to_send()
    b.receive(third, a_addr, 200.0)
    b.receive(fourth, a_addr, 200.01)
    assert b.stats["handshake_flood"] == 1 and b.stats["initiations_rx"] == 2
    b.receive(fourth, a_addr, 200.05)
    assert b.stats["initiations_rx"] == 3


def test_roaming_moves_the_endpoint():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"1"))
    sim.move(a, ("192.0.2.50", 3333))
    sim.send(a, b, ipv4(b"2"))
    assert sim.received(b, EndpointChanged) == [EndpointChanged(a.public_key, ("192.0.2.50", 3333))]
    assert b.peer_stats(a.public_key)["endpoint"] == ("192.0.2.50", 3333)
    sim.send(b, a, ipv4(b"3", 2, 1))  # replies follow the peer to its new address
    assert [e.packet for e in sim.received(a)] == [ipv4(b"3", 2, 1)]


def test_unauthenticated_packets_do_not_move_the_endpoint():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"1"))
    good = sim.sent(a, MSG_TRANSPORT)[-1][1]
    forged = bytearray(good)
    forged[-1] ^= 1
    b.receive(bytes(forged), ("198.51.100.66", 1), sim.now)
    b.receive(good, ("198.51.100.66", 1), sim.now)  # replayed: authentic but not fresh
    assert b.stats["auth_failed"] == 1 and b.stats["replayed"] == 1
    assert b.peer_stats(a.public_key)["endpoint"] == ("10.0.0.1", 51820)
    sim.collect(b)
    assert sim.received(b, EndpointChanged) == []


def test_set_endpoint_redirects_traffic():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"1"))
    relay = ("relay", b.public_key)  # an opaque non-IP address is fine
    a.set_endpoint(b.public_key, relay)
    a.send(b.public_key, ipv4(b"2"), sim.now)
    assert [addr for _, addr in a.datagrams_to_send()] == [relay]


def test_simultaneous_initiations_converge():
    sim = Sim()
    a, b = sim.pair()
    a.send(b.public_key, ipv4(b"from a"), 0.0)
    b.send(a.public_key, ipv4(b"from b", 2, 1), 0.0)
    sim.run_until(2 * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX))
    assert [e.packet for e in sim.received(b)] == [ipv4(b"from a")]
    assert [e.packet for e in sim.received(a)] == [ipv4(b"from b", 2, 1)]


def test_unknown_peer_and_bad_mac1_are_counted():
    sim = Sim()
    a, b = sim.pair()
    stranger = sim.device(("10.0.0.3", 1))
    stranger.add_peer(b.public_key, endpoint=("10.0.0.2", 51820))
    sim.send(stranger, b, ipv4(b"?"))
    assert b.stats["handshake_invalid"] == 1 and b.stats["responses_tx"] == 0
    # An initiation meant for someone else fails mac1 before any DH is spent on it.
    a.send(b.public_key, ipv4(b"x"), sim.now)
    (init, _), = a.datagrams_to_send()
    stranger.receive(init, ("10.0.0.1", 51820), sim.now)
    assert stranger.stats["bad_mac1"] == 1


def test_preshared_key_must_match():
    sim = Sim()
    a = sim.device(("10.0.0.1", 1))
    b = sim.device(("10.0.0.2", 1))
    a.add_peer(b.public_key, endpoint=("10.0.0.2", 1), preshared_key=b"k" * 32)
    b.add_peer(a.public_key, endpoint=("10.0.0.1", 1), preshared_key=b"j" * 32)
    sim.send(a, b, ipv4(b"x"))
    assert a.stats["handshake_invalid"] == 1 and sim.received(b) == []
    c = sim.device(("10.0.0.3", 1))
    d = sim.device(("10.0.0.4", 1))
    c.add_peer(d.public_key, endpoint=("10.0.0.4", 1), preshared_key=b"k" * 32)
    d.add_peer(c.public_key, endpoint=("10.0.0.3", 1), preshared_key=b"k" * 32)
    sim.send(c, d, ipv4(b"y"))
    assert [e.packet for e in sim.received(d)] == [ipv4(b"y")]


def test_add_peer_validation_and_remove():
    sim = Sim()
    a, b = sim.pair()
    with pytest.raises(ValueError):
        a.add_peer(b.public_key)
    with pytest.raises(ValueError):
        a.add_peer(a.public_key)
    with pytest.raises(ValueError):
        a.add_peer(bytes(32))  # low-order point
    sim.send(a, b, ipv4(b"x"))
    a.remove_peer(b.public_key)
    assert a._index == {}
    sim.send(b, a, ipv4(b"y", 2, 1))
    assert a.stats["unknown_index"] == 1


def test_persistent_keepalive_for_hours_of_simulated_time():
    sim = Sim()
    a, b = sim.pair(persistent_keepalive=25.0)
    hours = 6
    for minute in range(0, hours * 60, 7):  # a packet every 7 minutes, far apart
        sim.run_until(minute * 60.0)
        sim.send(a, b, ipv4(b"m%d" % minute))
    sim.run_until(hours * 3600.0)
    assert len(sim.received(b)) == len(range(0, hours * 60, 7))
    assert sim.received(a, PeerUnreachable) == [] and sim.received(b, PeerUnreachable) == []
    # Keepalives every 25 s from whichever side's timer fires: the gaps never exceed 25 s.
    traffic = sorted(t for t, s, _, _ in sim.wire)
    assert max(y - x for x, y in zip(traffic, traffic[1:])) <= 25.0 + 1e-9
    # Sessions roll over instead of piling up: at most three keypairs and one handshake each.
    assert len(a._index) <= 4 and len(b._index) <= 4
    assert a.stats["auth_failed"] == b.stats["auth_failed"] == 0


def test_idle_peers_wind_down_their_keys():
    sim = Sim()
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"x"))
    sim.run_until(3 * 3600.0)
    assert a._index == {} and b._index == {}  # zeroed after 3 * REJECT_AFTER_TIME of silence
    assert a.get_timer() is None and b.get_timer() is None
    sim.send(a, b, ipv4(b"later"))
    assert [e.packet for e in sim.received(b)][-1] == ipv4(b"later")


def test_plaintext_transport_is_authenticated_not_encrypted_and_never_a_downgrade():
    """Unencrypted networks: payload readable on the wire, still authenticated (an altered byte is
    dropped); a peer not marked plaintext refuses plain messages, and both ends must agree."""
    from overlay.wire.messages import MSG_TRANSPORT_PLAIN
    a, b = Device(crypto.generate_private_key()), Device(crypto.generate_private_key())
    a.add_peer(b.public_key, endpoint=("b", 1))
    b.add_peer(a.public_key, endpoint=("a", 1))
    a.initiate_handshake(b.public_key, 0.0)
    for _ in range(3):
        for src, dst, addr in ((a, b, ("a", 1)), (b, a, ("b", 1))):
            for data, _ in src.datagrams_to_send():
                dst.receive(data, addr, 0.0)
    while b.next_event() is not None:
        pass
    secret = bytes([0x45]) + bytes(1) + (35).to_bytes(2, "big") + bytes(16) + b"visible payload"

    def send(packet):
        a.send(b.public_key, packet, 1.0)
        (data, _), = a.datagrams_to_send()
        return bytearray(data)

    enc = send(secret)
    assert enc[0] == 4 and b"visible payload" not in enc            # standard WireGuard by default
    a.set_plaintext(b.public_key, True)
    plain = send(secret)
    assert plain[0] == MSG_TRANSPORT_PLAIN and b"visible payload" in plain
    b.receive(bytes(plain), ("a", 1), 1.0)                            # b has not agreed: refused
    assert b.stats["plain_refused"] == 1 and b.next_event() is None
    b.set_plaintext(a.public_key, True)
    plain = send(secret)
    b.receive(bytes(plain), ("a", 1), 1.0)
    ev = b.next_event()
    assert ev.packet == secret
    altered = send(secret)
    altered[altered.index(b"visible")] ^= 1
    b.receive(bytes(altered), ("a", 1), 1.0)
    assert b.stats["auth_failed"] == 1 and b.next_event() is None
    relabelled = send(secret)
    relabelled[0] = 4                                                 # passed off as an encrypted message
    b.receive(bytes(relabelled), ("a", 1), 1.0)
    assert b.stats["auth_failed"] == 2 and b.next_event() is None
    a.set_plaintext(b.public_key, False)                              # encrypted messages still work
    b.receive(bytes(send(secret)), ("a", 1), 1.0)
    assert b.next_event().packet == secret

"""PeerPath state machine, driven by hand: confirmation, selection, hysteresis, timers, bounds."""

from __future__ import annotations

import pytest

from overlay import crypto
from overlay.nat import Candidate, DiscoCodec, PathChanged, PeerPath, TraversalConfig
from overlay.nat.candidate import LAN, PEER, PREDICTED, SRFLX
from overlay.nat.disco import CallMeMaybe, Ping, Pong, new_tx_id
from overlay.nat.traversal import DIRECT, IDLE, PUNCHING, RELAY

WAN = ("198.51.100.20", 41641)
WAN2 = ("198.51.100.20", 40007)
LANADDR = ("192.168.1.20", 41641)
V6 = ("2001:db8::20", 41641)


class Peer:
    """The far side, played by the test: opens what our PeerPath sends, answers by hand."""

    def __init__(self, local: DiscoCodec):
        self.codec = DiscoCodec(crypto.generate_private_key())
        self.local = local

    def pings(self, out):
        got = []
        for data, addr in out:
            sender, msg = self.codec.open(data)
            assert sender == self.local.public_key
            if isinstance(msg, Ping):
                got.append((msg, addr))
        return got

    def pong_for(self, ping: Ping, observed=("10.0.0.1", 41641)) -> Pong:
        return self.local_open(self.codec.seal(self.local.public_key, Pong(ping.tx_id, observed)))

    def ping(self) -> Ping:
        return self.local_open(self.codec.seal(self.local.public_key, Ping(new_tx_id())))

    def local_open(self, data):
        sender, msg = self.local.open(data)
        assert sender == self.codec.public_key
        return msg


def make(config: TraversalConfig | None = None, candidates=(Candidate(WAN, SRFLX),)):
    codec = DiscoCodec(crypto.generate_private_key())
    peer = Peer(codec)
    path = PeerPath(codec, peer.codec.public_key, config)
    path.set_remote_candidates(candidates)
    return path, peer


def events(path):
    out = []
    while (e := path.next_event()) is not None:
        out.append(e)
    return out


def confirm(path, peer, addr, now, rtt):
    """Ping ``addr`` through a punch round at ``now`` and answer it after ``rtt``."""
    pings = [p for p, a in peer.pings(path.datagrams_to_send(now)) if a == addr]
    assert pings, f"no ping to {addr}"
    path.receive_pong(peer.pong_for(pings[-1]), addr, now + rtt)


def test_punch_rounds_probe_every_candidate_predicted_first():
    cands = [Candidate(LANADDR, LAN), Candidate(WAN, SRFLX)] + [Candidate(("198.51.100.20", 40000 + i), PREDICTED) for i in range(3)]
    path, peer = make(candidates=cands)
    assert path.state == IDLE and path.get_timer() is None
    path.start_punch(10.0)
    assert path.state == PUNCHING and path.get_timer() == 10.0
    rounds = []
    now = 0.0
    while (t := path.get_timer()) is not None and t < 14.9:
        now = t
        path.handle_timer(now)
        sent = path.datagrams_to_send(now)
        rounds.append((now, [a for _, a in sent]))
    assert [r[0] for r in rounds] == [10.0, 10.2, 10.5, 11.0, 12.0, 13.0, 14.0]
    first = rounds[0][1]
    assert first[:3] == [("198.51.100.20", 40000 + i) for i in range(3)]  # predicted ports first
    assert set(first) == {c.addr for c in cands}
    # every ping carries a fresh tx id
    assert len({p.tx_id for p, _ in peer.pings(path.datagrams_to_send(now))}) == 0
    path.handle_timer(15.0)
    assert path.state == RELAY and events(path) == [PathChanged(None, None, "no direct path")]


def test_pong_confirms_path_with_rtt():
    path, peer = make()
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, WAN, 0.0, 0.040)
    assert path.state == DIRECT and path.current_path == WAN and path.rtt == pytest.approx(0.040)
    assert path.observed_by_peer == ("10.0.0.1", 41641)
    assert events(path) == [PathChanged(WAN, pytest.approx(0.040), "confirmed")]


def test_pong_replay_and_unsolicited_pongs_are_ignored():
    path, peer = make()
    path.start_punch(0.0)
    path.handle_timer(0.0)
    (ping, addr), = peer.pings(path.datagrams_to_send(0.0))
    path.receive_pong(peer.pong_for(Ping(new_tx_id())), WAN, 0.01)  # a tx id we never sent
    assert path.current_path is None
    pong = peer.pong_for(ping)
    path.receive_pong(pong, ("203.0.113.66", 1), 0.02)  # right tx, wrong source: not confirmed...
    assert path.current_path is None
    challenged = peer.pings(path.datagrams_to_send(0.02))
    assert [a for _, a in challenged] == [("203.0.113.66", 1)]  # ...but that source gets challenged
    path.receive_pong(pong, WAN, 0.03)  # the tx id was consumed
    assert path.current_path is None and events(path) == []


def test_ping_is_answered_and_its_source_challenged_but_never_trusted():
    path, peer = make()
    ping = peer.ping()
    path.receive_ping(ping, WAN2, 1.0)
    out = path.datagrams_to_send(1.0)
    pong_wire, to = out[0]
    assert to == WAN2
    _, pong = peer.codec.open(pong_wire)
    assert pong == Pong(ping.tx_id, WAN2)  # tells the peer where its ping came from
    assert [a for _, a in peer.pings(out[1:])] == [WAN2]  # challenge
    assert path.current_path is None and path.state == IDLE  # a ping alone proves nothing
    assert Candidate(WAN2, PEER) in path.remote_candidates


def test_hysteresis_and_better_path():
    cands = [Candidate(WAN, SRFLX), Candidate(WAN2, PREDICTED)]
    path, peer = make(candidates=cands)
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = peer.pings(path.datagrams_to_send(0.0))
    by_addr = {a: p for p, a in out}
    path.receive_pong(peer.pong_for(by_addr[WAN]), WAN, 0.050)
    path.receive_pong(peer.pong_for(by_addr[WAN2]), WAN2, 0.045)  # 5 ms better: not enough
    assert path.current_path == WAN
    switched_at = None
    for _ in range(6):  # the remaining punch rounds: WAN2 keeps answering in 20 ms, WAN in 50 ms
        t = path.get_timer()
        path.handle_timer(t)
        out = {a: p for p, a in peer.pings(path.datagrams_to_send(t))}
        path.receive_pong(peer.pong_for(out[WAN]), WAN, t + 0.050)
        path.receive_pong(peer.pong_for(out[WAN2]), WAN2, t + 0.020)
        if switched_at is None and path.current_path == WAN2:
            switched_at = t
    # the smoothed RTT of WAN2 had to fall below 40 ms (50 ms - max(10 ms, 20 %)) first
    assert switched_at is not None and switched_at > 0.2
    assert path.current_path == WAN2
    assert [e.reason for e in events(path)] == ["confirmed", "better"]


def rounds(path, peer, rtts, until, jitter=None):
    """Run punch rounds up to ``until``, answering every ping to an address of ``rtts`` (address ->
    RTT, or a callable giving each sample) after that long; returns [(time, current path)]."""
    seen = []
    while (t := path.get_timer()) is not None and t <= until:
        path.handle_timer(t)
        for p, a in peer.pings(path.datagrams_to_send(t)):
            if a in rtts:
                r = rtts[a]
                path.receive_pong(peer.pong_for(p), a, t + (r() if callable(r) else r))
        seen.append((t, path.current_path))
    return seen


VPN10 = ("10.8.0.20", 41641)        # another VPN's private address, not this site
CGNAT = ("100.64.3.20", 41641)       # carrier-grade NAT: not LAN at all


def test_cgnat_is_not_lan_and_private_ranges_are():
    from overlay.nat.candidate import is_lan
    assert not is_lan(CGNAT) and not is_lan(("100.127.255.254", 1)) and not is_lan(WAN)
    assert is_lan(VPN10) and is_lan(LANADDR) and is_lan(("172.16.0.1", 1)) and is_lan(("fd00::1", 1))
    assert is_lan(("169.254.1.1", 1)) and not is_lan(("100.63.255.255", 1))


@pytest.mark.parametrize("slow", [VPN10, CGNAT, LANADDR])
def test_faster_public_path_beats_slower_private_or_cgnat_one(slow):
    path, peer = make(candidates=[Candidate(slow, LAN), Candidate(WAN, SRFLX)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = {a: p for p, a in peer.pings(path.datagrams_to_send(0.0))}
    # the private path answers first (say it was pinged first) and takes the path at once...
    path.receive_pong(peer.pong_for(out[slow]), slow, 0.030)
    path.receive_pong(peer.pong_for(out[WAN]), WAN, 0.031)
    assert path.current_path == slow
    # ...but over the next rounds the public one is clearly faster (10 ms vs 30 ms): it takes over
    rounds(path, peer, {slow: 0.030, WAN: 0.010}, 4.5)
    assert path.current_path == WAN
    assert [e.reason for e in events(path)] == ["confirmed", "better"]
    # and when both answer at once at the start, the faster public one wins straight away
    path, peer = make(candidates=[Candidate(slow, LAN), Candidate(WAN, SRFLX)])
    path.start_punch(0.0)
    rounds(path, peer, {slow: 0.030, WAN: 0.010}, 4.5)
    assert path.current_path == WAN and path.rtt == pytest.approx(0.010)


def test_near_tie_prefers_private_but_cgnat_is_not_private():
    path, peer = make(candidates=[Candidate(WAN, SRFLX), Candidate(LANADDR, LAN)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = {a: p for p, a in peer.pings(path.datagrams_to_send(0.0))}
    path.receive_pong(peer.pong_for(out[WAN]), WAN, 0.010)
    path.receive_pong(peer.pong_for(out[LANADDR]), LANADDR, 0.012)
    assert path.current_path == WAN   # the first confirmed path, taken at once
    rounds(path, peer, {WAN: 0.010, LANADDR: 0.012}, 4.5)
    assert path.current_path == LANADDR   # 2 ms slower: a tie, broken for the private path
    assert [e.reason for e in events(path)] == ["confirmed", "better"]
    # the same tie with a CGNAT address: nothing to break it, the current path stays
    path, peer = make(candidates=[Candidate(WAN, SRFLX), Candidate(CGNAT, LAN)])
    path.start_punch(0.0)
    rounds(path, peer, {WAN: 0.010, CGNAT: 0.009}, 4.5)
    assert path.current_path == WAN


def test_current_path_kept_unless_clearly_better_and_ipv6_credit():
    path, peer = make(candidates=[Candidate(WAN, SRFLX), Candidate(WAN2, SRFLX)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = {a: p for p, a in peer.pings(path.datagrams_to_send(0.0))}
    path.receive_pong(peer.pong_for(out[WAN]), WAN, 0.030)
    rounds(path, peer, {WAN: 0.030, WAN2: 0.022}, 4.5)   # 8 ms better: under the 10 ms margin
    assert path.current_path == WAN and [e.reason for e in events(path)] == ["confirmed"]

    path, peer = make(candidates=[Candidate(WAN, SRFLX), Candidate(V6, SRFLX)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = {a: p for p, a in peer.pings(path.datagrams_to_send(0.0))}
    path.receive_pong(peer.pong_for(out[WAN]), WAN, 0.050)
    # 48 ms vs 50 ms would not beat the 10 ms hysteresis, but IPv6 gets a 10 ms credit
    rounds(path, peer, {WAN: 0.050, V6: 0.048}, 4.5)
    assert path.current_path == V6
    assert [e.reason for e in events(path)] == ["confirmed", "better"]


def test_one_lucky_sample_does_not_switch():
    """A challenger must stay clearly better over several of its own samples."""
    path, peer = make(candidates=[Candidate(WAN, SRFLX), Candidate(WAN2, SRFLX)])
    path.start_punch(0.0)
    path.handle_timer(0.0)
    out = {a: p for p, a in peer.pings(path.datagrams_to_send(0.0))}
    path.receive_pong(peer.pong_for(out[WAN]), WAN, 0.030)
    path.receive_pong(peer.pong_for(out[WAN2]), WAN2, 0.002)   # one lucky 2 ms sample
    assert path.current_path == WAN
    samples = iter([0.040, 0.002, 0.040, 0.040, 0.002, 0.040])
    rounds(path, peer, {WAN: 0.030, WAN2: lambda: next(samples)}, 4.5)
    assert path.current_path == WAN and [e.reason for e in events(path)] == ["confirmed"]


@pytest.mark.parametrize("seed", range(10))
def test_no_flapping_under_jittery_samples(seed):
    """Three paths (two public, one private) of equal mean RTT, each sample jittered by up to
    +-15 ms, over 20 punches (7 rounds each, ~140 samples per path): the first punch may settle
    (its first samples are few), after that at most the one tie-break switch to the private path
    and never away from it."""
    import random
    rng = random.Random(seed)
    cfg = TraversalConfig(min_punch_interval=0.5)
    path, peer = make(cfg, candidates=[Candidate(WAN, SRFLX), Candidate(VPN10, LAN), Candidate(WAN2, SRFLX)])
    jitter = {a: (lambda: 0.025 + rng.uniform(-0.015, 0.015)) for a in (WAN, VPN10, WAN2)}
    path.start_punch(0.0)
    rounds(path, peer, jitter, 4.5)
    settling = events(path)
    assert settling[0].reason == "confirmed" and len(settling) <= 3, settling
    for k in range(1, 20):
        path.start_punch(k * 5.0)
        rounds(path, peer, jitter, k * 5.0 + 4.5)
    later = events(path)
    assert len(later) <= 1, later
    if later or settling[-1].path == VPN10:
        assert path.current_path == VPN10


def test_keepalive_then_loss_falls_back_to_relay_and_reprobes():
    cfg = TraversalConfig(keepalive_interval=25.0, retry_interval=1.0, dead_after=5.0)
    path, peer = make(cfg)
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, WAN, 0.0, 0.01)
    events(path)
    while (t := path.get_timer()) is not None and t < 4.5:  # drain the remaining punch rounds, answering
        path.handle_timer(t)
        for p, a in peer.pings(path.datagrams_to_send(t)):
            path.receive_pong(peer.pong_for(p), a, t + 0.01)
    last = 4.0
    keepalives = []
    for _ in range(4):  # answered keepalives every 25 s
        t = path.get_timer()
        path.handle_timer(t)
        sent = peer.pings(path.datagrams_to_send(t))
        assert [a for _, a in sent] == [WAN]
        keepalives.append(t)
        path.receive_pong(peer.pong_for(sent[0][0]), WAN, t + 0.01)
    assert keepalives == pytest.approx([last + 25 * i for i in range(1, 5)])
    # now the peer goes silent: retries every second, dead after 5 s
    sends = []
    while path.current_path is not None:
        t = path.get_timer()
        path.handle_timer(t)
        if path.current_path is not None:
            sends += [t for _ in peer.pings(path.datagrams_to_send(t))]
    start = keepalives[-1] + 25
    assert sends == pytest.approx([start + i for i in range(5)])
    assert path.state == RELAY and events(path) == [PathChanged(None, None, "lost")]
    # re-probing starts right away
    assert path.get_timer() == t
    path.handle_timer(t)
    assert WAN in [a for _, a in peer.pings(path.datagrams_to_send(t))]


def test_relay_backoff_then_upgrade():
    path, peer = make()
    path.start_punch(0.0)
    probe_times = []
    t = 0.0
    while t < 200:
        t = path.get_timer()
        path.handle_timer(t)
        if peer.pings(path.datagrams_to_send(t)):
            probe_times.append(round(t, 3))
    assert probe_times[:7] == [0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0]
    gaps = [round(b - a, 3) for a, b in zip(probe_times[6:], probe_times[7:])]
    assert gaps[:3] == [6.0, 10.0, 20.0] and set(gaps[3:]) == {20.0}  # 5 s deadline, then 5, 10, 20 cap
    assert path.state == RELAY
    # a path appears: the next probe is answered
    t = path.get_timer()
    path.handle_timer(t)
    (ping, addr), = peer.pings(path.datagrams_to_send(t))
    path.receive_pong(peer.pong_for(ping), addr, t + 0.02)
    assert path.state == DIRECT and [e.reason for e in events(path)] == ["no direct path", "confirmed"]


def test_roaming_moves_path_after_old_one_fails_its_check():
    path, peer = make()
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, WAN, 0.0, 0.01)
    path._rounds.clear()  # no more punch rounds: look at roaming alone
    events(path)
    # at t=10 the peer's NAT rebinds: its pings now come from WAN2
    path.receive_ping(peer.ping(), WAN2, 10.0)
    out = path.datagrams_to_send(10.0)
    pings = {a: p for p, a in peer.pings(out)}
    assert set(pings) == {WAN2, WAN}  # challenge the new source, check the current path
    path.receive_pong(peer.pong_for(pings[WAN2]), WAN2, 10.02)
    assert path.current_path == WAN  # not yet: the old path may well be fine
    t = path.get_timer()
    assert t == pytest.approx(11.0)
    path.handle_timer(t)  # WAN's check went unanswered for a retry interval: move
    assert path.current_path == WAN2
    assert [e.reason for e in events(path)] == ["roamed"]


def test_tunnel_data_from_a_new_source_starts_the_same_checks():
    """The WireGuard layer authenticated data from a new source (the peer's NAT rebound, before
    any discovery ping came from there): challenge it and check the current path, answer nothing."""
    path, peer = make()
    path.start_punch(0.0)
    path.handle_timer(0.0)
    confirm(path, peer, WAN, 0.0, 0.01)
    path._rounds.clear()
    events(path)
    path.peer_seen_at(WAN2, 10.0)
    out = path.datagrams_to_send(10.0)
    pings = {a: p for p, a in peer.pings(out)}
    assert set(pings) == {WAN2, WAN} and len(out) == 2   # two pings, no pong: there was no ping
    path.peer_seen_at(WAN2, 10.01)                        # more data from there: no second challenge yet
    assert path.datagrams_to_send(10.01) == []
    path.receive_pong(peer.pong_for(pings[WAN2]), WAN2, 10.02)
    assert path.current_path == WAN
    path.handle_timer(path.get_timer())                   # the old path's check went unanswered
    assert path.current_path == WAN2 and [e.reason for e in events(path)] == ["roamed"]


def test_call_me_maybe_round_trip():
    path, peer = make()
    wire = path.call_me_maybe([Candidate(("10.0.0.1", 41641), LAN)], 5.0)
    _, cmm = peer.codec.open(wire)
    assert cmm.candidates == (Candidate(("10.0.0.1", 41641), LAN),)
    assert path.get_timer() == 5.0  # punching right away
    other, other_peer = make(candidates=[])
    other.receive(other_peer.local_open(other_peer.codec.seal(other_peer.local.public_key,
                                                              CallMeMaybe(new_tx_id(), (Candidate(WAN, SRFLX),)))), None, 7.0)
    assert other.get_timer() == 7.0 and other.remote_candidates == [Candidate(WAN, SRFLX)]
    other.receive(Ping(new_tx_id()), None, 7.0)  # pings via the relay say nothing about addresses
    assert other.datagrams_to_send(7.0) == []


def test_bounds_on_candidates_and_learned_addresses():
    cfg = TraversalConfig(max_candidates=8, max_peer_reflexive=4)
    path, peer = make(cfg, candidates=[Candidate(("198.51.100.20", 1000 + i), PREDICTED) for i in range(20)])
    assert len(path.remote_candidates) == 8
    for i in range(50):
        path.receive_ping(peer.ping(), ("203.0.113.50", 2000 + i), float(i))
    kinds = [c.kind for c in path.remote_candidates]
    assert kinds.count(PEER) == 4 and len(kinds) == 12
    assert len(path.datagrams_to_send(100.0)) == 100  # one pong + one challenge each


def test_config_validation():
    with pytest.raises(ValueError):
        TraversalConfig(keepalive_interval=3.0, dead_after=5.0)
    with pytest.raises(ValueError):
        TraversalConfig(punch_offsets=())

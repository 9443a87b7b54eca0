"""Sequential <-> sequential punching core (``nat.seqpunch``), driven by hand with an injected clock;
the windows' meeting checked against a model of two port counters with unknown offsets."""

from __future__ import annotations

import itertools

import pytest

from overlay.nat import seqpunch
from overlay.nat.seqpunch import IDLE, MEASURING, READY, SPRAYING, SeqConfig, SeqPunch

APDM, ADM, EIM = "address-and-port-dependent", "address-dependent", "endpoint-independent"


def test_applies_only_when_both_sides_are_sequential_and_destination_dependent():
    assert seqpunch.applies(APDM, "sequential", APDM, "sequential")
    assert seqpunch.applies(ADM, "sequential", "endpoint-dependent", "sequential")
    assert not seqpunch.applies(APDM, "sequential", APDM, "random")
    assert not seqpunch.applies(APDM, "random", APDM, "sequential")
    assert not seqpunch.applies(EIM, None, APDM, "sequential")
    assert not seqpunch.applies(APDM, "sequential", None, None)


def run_to_spray(lower: bool, own=(40003, 1), peer=(50010, 1), cfg: SeqConfig | None = None) -> SeqPunch:
    s = SeqPunch(cfg, lower=lower)
    s.start(10.0)
    assert s.state == MEASURING and s.get_timer() == 10.0 + s.config.measure_timeout
    s.measured(own[0], own[1], 10.05)          # the fresh socket's mapping; next port = that + step
    assert s.state == READY and s.base == (own[0] + own[1], own[1])
    s.peer_ready(*peer, 10.1)
    assert s.state == SPRAYING
    return s


def test_windows_strides_and_wrap():
    upper = run_to_spray(False)
    assert upper.targets == list(range(50010, 50026))                  # stride 1
    lower = run_to_spray(True)
    assert lower.targets == list(range(50010, 50042, 2))               # stride 2
    down = run_to_spray(True, peer=(1030, -1))
    assert down.targets[:4] == [1030, 1028, 1026, 1024] and down.targets[4] == 65534   # wraps to the top
    # the peer's base may come first: spraying starts once our own measurement is in
    s = SeqPunch(lower=False)
    s.start(0.0)
    s.peer_ready(50010, 1, 0.01)
    assert s.state == MEASURING
    s.measured(40003, 1, 0.02)
    assert s.state == SPRAYING and s.targets[0] == 50010


def test_bursts_then_timeout_and_backoff():
    cfg = SeqConfig(window=4, resends=(0.0, 0.5, 1.5), duration=3.0, backoff_initial=30.0, backoff_max=100.0)
    s = run_to_spray(False, cfg=cfg)
    sends = []
    while (t := s.get_timer()) is not None:
        ports = s.due(t)
        if ports:
            sends.append((round(t - 10.1, 3), ports))
    assert [t for t, _ in sends] == [0.0, 0.5, 1.5]
    assert all(p == [50010, 50011, 50012, 50013] for _, p in sends)
    assert s.state == IDLE and s.probes_sent == 12 and s.mappings == 1 + 4 and s.hits == 0
    assert not s.may_start(13.2) and not s.may_start(13.1 + 29.9) and s.may_start(13.1 + 30.0)
    # a second failure doubles the back-off, capped
    s.start(50.0)
    s.due(50.0 + cfg.measure_timeout)                     # no measurement came: ends as a failure
    assert s.state == IDLE and not s.may_start(50.0 + 4.0 + 59.9) and s.may_start(50.0 + 4.0 + 60.0)
    s.start(200.0)
    s.abort(201.0)
    assert not s.may_start(201.0 + 99.9) and s.may_start(201.0 + 100.0)
    assert s.attempts == 3


def test_joining_the_peers_attempt_overrides_backoff_at_most_every_join_interval():
    cfg = SeqConfig(backoff_initial=30.0, join_interval=10.0)
    s = SeqPunch(cfg)
    s.start(0.0)
    s.abort(1.0)                                   # back-off until 31
    assert not s.may_start(5.0) and not s.may_join(5.0)      # started 5 s ago: too soon
    assert s.may_join(10.0) and not s.may_start(10.0)
    with pytest.raises(RuntimeError):
        s.start(10.0)
    s.start(10.0, join=True)
    assert s.state == MEASURING and s.attempts == 2
    s.abort(14.0)
    assert not s.may_join(19.9) and s.may_join(20.0)


def test_hit_ends_attempt_and_resets_backoff():
    s = run_to_spray(True)
    assert s.due(10.1) == s.targets
    s.hit(10.4)
    assert s.state == IDLE and s.hits == 1 and s.last_time_to_hit == pytest.approx(0.4)
    assert s.may_start(10.4) and s.due(11.0) == [] and s.get_timer() is None
    # a direct path found otherwise while still measuring is not a hit of this attempt
    s.start(20.0)
    s.hit(20.1)
    assert s.hits == 1 and s.state == IDLE and s.may_start(20.1)


def test_bad_inputs_are_ignored_and_config_is_bounded():
    s = SeqPunch()
    s.start(0.0)
    s.measured(40000, 0, 0.1)                 # a step of 0 predicts nothing
    assert s.state == MEASURING
    s.peer_ready(80000, 1, 0.1)               # not a port
    s.measured(40000, 1, 0.2)
    assert s.state == READY
    with pytest.raises(RuntimeError):
        s.start(0.3)
    with pytest.raises(ValueError):
        SeqConfig(window=65)
    with pytest.raises(ValueError):
        SeqConfig(resends=(0.0, 5.0), duration=4.0)


def flows(s: SeqPunch, own_next: int, own_step: int, offset: int, peer_ip: str, own_ip: str) -> set:
    """The flows a sequential NAT (counter at ``own_next``, ``offset`` ports taken by other flows
    since the measurement) creates for the burst: (own public address, peer address), in order."""
    return {((own_ip, seqpunch.wrap(own_next + own_step * (offset + k))), (peer_ip, p))
            for k, p in enumerate(s.targets)}


def meet(offset_a: int, offset_b: int, step_a: int, step_b: int, lower_a: bool, lower_b: bool) -> bool:
    a, b = SeqPunch(lower=lower_a), SeqPunch(lower=lower_b)
    for s in (a, b):
        s.start(0.0)
    a.measured(40000, step_a, 0.1)
    b.measured(51000, step_b, 0.1)
    a.peer_ready(*b.base, 0.2)
    b.peer_ready(*a.base, 0.2)
    fa = flows(a, a.base[0], step_a, offset_a, "198.51.100.2", "198.51.100.1")
    fb = {(x, y) for y, x in flows(b, b.base[0], step_b, offset_b, "198.51.100.1", "198.51.100.2")}
    return bool(fa & fb)   # one flow both NATs hold: each side's ping passes the other's NAT


@pytest.mark.parametrize("step_a,step_b", [(1, 1), (2, 1), (-1, 3)])
def test_windows_meet_for_any_offsets_within_the_window(step_a, step_b):
    """Whatever other flows took on either side between measurement and burst (up to what the
    16-port windows cover: o_lower + o_upper <= 15 and 2 o_lower + o_upper <= 15), the bursts
    share a flow; with equal strides they only meet when both offsets are equal."""
    for oa, ob in itertools.product(range(8), range(8)):
        if 2 * oa + ob <= 15:
            assert meet(oa, ob, step_a, step_b, True, False), (oa, ob)
        if oa + 2 * ob <= 15:
            assert meet(oa, ob, step_a, step_b, False, True), (oa, ob)
        assert meet(oa, ob, step_a, step_b, False, False) == (oa == ob == 0), (oa, ob)
    assert not meet(0, 2, step_a, step_b, True, True)


def test_role_of_each_side():
    assert seqpunch.role(APDM, "sequential", APDM, "sequential") == seqpunch.BOTH
    assert seqpunch.role(APDM, "sequential", EIM, None) == seqpunch.SEQ
    assert seqpunch.role(EIM, None, ADM, "sequential") == seqpunch.EASY
    assert seqpunch.role(EIM, None, EIM, None) is None                 # ordinary punching
    assert seqpunch.role(APDM, "random", EIM, None) is None            # birthday punching
    assert seqpunch.role(APDM, "sequential", APDM, "random") is None
    assert seqpunch.role(APDM, "sequential", None, None) is None


def test_sequential_and_easy_sides_meet_for_any_offset_within_the_window():
    """The sequential side aims its fresh socket at the easy side's one port; the easy side sprays
    the window of the sequential side's ports from its own (endpoint-independent) socket: the
    sequential NAT's mapping for that flow is among them whatever other flows took before it."""
    for offset in range(16):
        for step in (1, 2, -1):
            seq, easy = SeqPunch(role=seqpunch.SEQ, lower=True), SeqPunch(role=seqpunch.EASY)
            seq.start(0.0)
            seq.peer_ready(41641, 0, 0.0)                 # the easy side's server-reflexive port
            assert seq.state == MEASURING
            seq.measured(40000, step, 0.1)
            assert seq.state == SPRAYING and seq.targets == [41641]
            easy.start(0.2, join=True)
            assert easy.state == READY and easy.base is None
            easy.peer_ready(*seq.base, 0.2)
            assert easy.state == SPRAYING and len(easy.targets) == 16
            assert seqpunch.wrap(seq.base[0] + step * offset) in easy.targets, (offset, step)
    # the easy side has no step of its own: only the sequential side takes a port with step 0
    e = SeqPunch(role=seqpunch.EASY)
    e.start(0.0, join=True)
    e.peer_ready(40000, 0, 0.1)
    assert e.state == READY


def test_a_missed_prediction_is_retried_with_fresh_port_data_backing_off_a_bounded_number_of_times():
    """Sequential side of a relayed sequential <-> easy pair: each attempt that misses schedules
    the next one after the back-off (30, 60, 120 ... s), measured anew (the NAT's counter moved on:
    a fresh base), until ``max_failures`` attempts in a row missed; a hit resets the count."""
    cfg = SeqConfig(backoff_initial=30.0, backoff_max=600.0, max_failures=4)
    s = SeqPunch(cfg, role=seqpunch.SEQ)
    now, counter, bases, gaps = 0.0, 40000, [], []
    while True:
        s.start(now)
        s.peer_ready(41641, 0, now)
        counter += 25                      # other flows of this host took ports meanwhile
        s.measured(counter, 1, now + 0.1)
        bases.append(s.base)
        while (t := s.get_timer()) is not None:    # the bursts go out, nothing comes back
            s.due(t)
            now = t
        assert s.state == IDLE
        at = s.retry_at()
        if at is None:
            break
        gaps.append(at - now)
        now = at
    assert s.attempts == 4 and s.failures == 4 and gaps == pytest.approx([30.0, 60.0, 120.0])
    assert bases == [(40026, 1), (40051, 1), (40076, 1), (40101, 1)]     # fresh port data each time
    s.start(now + 1000.0)              # a new introduction may still start one; a hit resets the count
    s.peer_ready(41641, 0, now + 1000.0)
    s.measured(40200, 1, now + 1000.1)
    s.hit(now + 1000.2)
    assert s.failures == 0 and s.retry_at() == now + 1000.2
    # the easy side never schedules attempts of its own: it answers the sequential side's base
    e = SeqPunch(cfg, role=seqpunch.EASY)
    e.start(0.0, join=True)
    e.abort(4.0)
    assert e.retry_at() is None

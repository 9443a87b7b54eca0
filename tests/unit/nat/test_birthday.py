"""The birthday-punching core (``overlay.nat.birthday``): who plays which side, caps, rate, back-off."""

from __future__ import annotations

import random

import pytest

from overlay.nat import birthday
from overlay.nat.birthday import EASY, HARD, BirthdayConfig, BirthdayPunch

EIM, APDM, ADM = "endpoint-independent", "address-and-port-dependent", "address-dependent"


@pytest.mark.parametrize("own,peer,expected", [
    ((APDM, "random"), (EIM, None), HARD),
    ((ADM, "random"), (EIM, None), HARD),
    ((EIM, None), (APDM, "random"), EASY),
    ((APDM, "random"), (APDM, "random"), None),         # hard-hard: nothing fixed to aim at
    ((APDM, "sequential"), (EIM, None), None),          # prediction does better
    ((EIM, None), (APDM, "sequential"), None),
    ((EIM, None), (EIM, None), None),                   # ordinary punching works
    ((EIM, None), (None, None), None),                  # peer's NAT unknown
    (("unknown", None), (APDM, "random"), None),
])
def test_role_only_where_it_can_help(own, peer, expected):
    assert birthday.role(*own, *peer) == expected


def test_default_config_odds_and_bounds():
    c = BirthdayConfig()
    assert c.sockets <= 256 and c.probes <= 1024
    assert c.hit_probability() > 0.97
    with pytest.raises(ValueError):
        BirthdayConfig(sockets=5000)
    with pytest.raises(ValueError):
        BirthdayConfig(probes=0)


def drive(b: BirthdayPunch, until: float) -> list[tuple[float, object]]:
    out = []
    while (t := b.get_timer()) is not None and t <= until:
        d = b.due(t)
        if d:
            out.append((t, d))
    return out


def test_easy_side_probes_distinct_ports_at_the_rate_and_stops_at_the_cap():
    c = BirthdayConfig(probes=1024, probe_rate=512, duration=4.0)
    b = BirthdayPunch(c, random.Random(1))
    assert b.start(EASY, ("198.51.100.7", 12345), 100.0) == 0   # no extra sockets on the easy side
    sent = drive(b, 100.0 + 1.0)
    addrs = [a for _, batch in sent for a in batch]
    # rate: about 512 in the first second (plus the first), never more
    assert 500 <= len(addrs) <= 514
    for t, batch in sent:
        assert len([a for tt, bb in sent if tt <= t for a in bb]) <= int((t - 100.0) * 512) + 1
    sent += drive(b, 200.0)
    addrs = [a for _, batch in sent for a in batch]
    assert len(addrs) == 1024 == len(set(addrs)) == b.probes_sent
    assert all(a[0] == "198.51.100.7" and c.port_low <= a[1] <= c.port_high for a in addrs)
    assert b.state == birthday.IDLE     # timed out: failed


def test_hard_side_resends_from_all_sockets_until_the_end():
    c = BirthdayConfig(sockets=256, resend=1.0, duration=4.0)
    b = BirthdayPunch(c)
    assert b.start(HARD, ("198.51.100.9", 20001), 0.0) == 256
    sent = drive(b, 60.0)
    assert [t for t, _ in sent] == [0.0, 1.0, 2.0, 3.0]
    assert b.probes_sent == 4 * 256 and b.sockets_opened == 256 and b.state == birthday.IDLE


def test_backoff_after_failure_doubles_and_resets_after_a_hit():
    c = BirthdayConfig(duration=4.0, backoff_initial=30.0, backoff_max=100.0)
    b = BirthdayPunch(c)
    b.start(EASY, ("198.51.100.7", 1), 0.0)
    assert not b.may_start(1.0)                 # one attempt at a time
    drive(b, 10.0)                              # fails at 4.0
    assert not b.may_start(33.9) and b.may_start(34.0)
    b.start(EASY, ("198.51.100.7", 1), 34.0)
    drive(b, 100.0)                             # fails at 38.0: next back-off 60 s
    assert not b.may_start(97.9) and b.may_start(98.0)
    b.start(EASY, ("198.51.100.7", 1), 98.0)
    drive(b, 200.0)                             # fails at 102: capped at 100 s
    assert not b.may_start(201.9) and b.may_start(202.0)
    b.start(EASY, ("198.51.100.7", 1), 202.0)
    b.due(202.5)
    b.hit(202.6)
    assert b.hits == 1 and b.last_time_to_hit == pytest.approx(0.6) and b.state == birthday.IDLE
    assert b.get_timer() is None and b.due(203.0) == []
    assert b.may_start(202.6)
    b.start(EASY, ("198.51.100.7", 1), 202.7)
    with pytest.raises(RuntimeError):
        b.start(EASY, ("198.51.100.7", 1), 202.8)     # already active


def test_a_hit_stops_probing_early():
    b = BirthdayPunch(BirthdayConfig(), random.Random(2))
    b.start(EASY, ("198.51.100.7", 1), 0.0)
    drive(b, 0.5)
    before = b.probes_sent
    b.hit(0.5)
    assert drive(b, 10.0) == [] and b.probes_sent == before < 300

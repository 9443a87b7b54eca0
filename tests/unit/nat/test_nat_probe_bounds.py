"""A member cannot make its peers probe an arbitrary address at will (issue 9.11).

The attacker is the peer: it advertises a victim's address (16 ports of it) and asks to be
punched ten times a second, through CallMeMaybe and server introductions, for a minute. What our
PeerPath sends to the victim is counted; the victim never answers.
"""

from __future__ import annotations

from tests.unit.nat.test_nat_traversal import WAN, make

from overlay import crypto
from overlay.nat import Candidate, DiscoCodec, PeerPath, TraversalConfig
from overlay.nat.candidate import SRFLX
from overlay.nat.disco import CallMeMaybe, new_tx_id

VICTIM = "203.0.113.99"


def run_flood(path: PeerPath, seconds: float, step: float = 0.1) -> int:
    victims = [Candidate((VICTIM, 1000 + i), SRFLX) for i in range(16)]
    sent = 0
    now = 0.0
    while now < seconds:
        path.receive_call_me_maybe(CallMeMaybe(new_tx_id(), tuple(victims)), now)
        path.set_remote_candidates(victims)     # and a server introduction with the same list
        path.start_punch(now)
        t = path.get_timer()
        while t is not None and t <= now:
            path.handle_timer(now)
            t = path.get_timer()
        sent += sum(1 for _, addr in path.datagrams_to_send(now) if addr[0] == VICTIM)
        now += step
    return sent


def test_probes_to_an_advertised_address_are_bounded():
    path, _ = make()
    c = path.config
    sent = run_flood(path, 60.0)
    assert sent <= c.probe_burst + c.probe_rate * 60.0, sent      # before: 9,600 (16 x a round every 0.1 s)
    assert path.probes_suppressed > 0


def test_a_normal_punch_is_within_the_budget():
    """One introduction with 16 candidates: every candidate gets every round, nothing is held back."""
    codec = DiscoCodec(crypto.generate_private_key())
    path = PeerPath(codec, DiscoCodec(crypto.generate_private_key()).public_key, TraversalConfig())
    path.set_remote_candidates([Candidate((WAN[0], 40000 + i), SRFLX) for i in range(16)])
    path.start_punch(0.0)
    sent = 0
    for step in range(50):
        now = step * 0.1
        t = path.get_timer()
        if t is not None and t <= now:
            path.handle_timer(now)
        sent += len(path.datagrams_to_send(now))
    assert sent == 16 * len(path.config.punch_offsets) and path.probes_suppressed == 0

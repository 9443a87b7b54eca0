"""A flood of handshake initiations with a valid mac1 stays cheap (issue 9.8).

The attacker knows the node's public key, so its initiations pass mac1; under load they need a
cookie (mac2). WireGuard's answer, checked here: a per-source budget before any cryptography
(one flooding host costs a counter per datagram), a ceiling on handshake work per second from all
sources together, and real peers still get through.
"""

from __future__ import annotations

import os

from tests.unit.wire.test_wire_device import Sim, ipv4

from overlay.wire.cookie import CookieGenerator
from overlay.wire.device import (
    HANDSHAKE_SOURCE_BURST, HANDSHAKE_SOURCE_RATE, HANDSHAKE_WORK_PER_SECOND, UNDER_LOAD_HANDSHAKES_PER_SECOND,
)
from overlay.wire.messages import pack_initiation


def forged_initiations(target_public: bytes, n: int) -> list[bytes]:
    """Initiations of random content with a correct mac1 (what anyone knowing the key can send)."""
    gen = CookieGenerator(target_public)
    out = []
    for i in range(n):
        msg = pack_initiation(i, os.urandom(32), os.urandom(48), os.urandom(28))
        gen.add_macs(msg, 0.0)
        out.append(bytes(msg))
    return out


def count_mac1(dev) -> list[int]:
    calls = [0]
    real = dev._checker.check_mac1

    def counting(msg):
        calls[0] += 1
        return real(msg)
    dev._checker.check_mac1 = counting
    return calls


def test_one_source_flood_costs_no_crypto_and_peers_get_through():
    sim = Sim()
    a, b = sim.pair()
    mac1 = count_mac1(b)
    flood = forged_initiations(b.public_key, 2000)
    attacker = ("192.0.2.66", 4444)
    n = 100_000                                  # in one second
    sim.send(a, b, ipv4(b"before"))              # a's session exists; the flood starts now
    for i in range(n):
        now = sim.now + i / n
        b.receive(flood[i % len(flood)], attacker, now)
        if i % 5000 == 0:
            b.datagrams_to_send()                # the cookie replies b would send
    replies = b.stats["cookie_sent"]
    assert replies <= HANDSHAKE_SOURCE_BURST + HANDSHAKE_SOURCE_RATE + 1, replies   # before: ~99,700
    assert mac1[0] <= UNDER_LOAD_HANDSHAKES_PER_SECOND + HANDSHAKE_SOURCE_BURST + HANDSHAKE_SOURCE_RATE + 1
    assert b.stats["handshake_source_limited"] >= n - 400
    # transport packets of the existing session flow; a new peer elsewhere completes a handshake
    sim.now += 1.0
    sim.send(a, b, ipv4(b"during"))
    c = sim.device(("10.0.0.3", 51820))
    c.add_peer(b.public_key, endpoint=("10.0.0.2", 51820))
    b.add_peer(c.public_key, endpoint=("10.0.0.3", 51820))
    b.force_under_load = True                    # still flooded: c needs a cookie first
    sim.send(c, b, ipv4(b"newcomer"))
    sim.run_until(sim.now + 6.0)
    assert [e.packet for e in sim.received(b)] == [ipv4(b"before"), ipv4(b"during"), ipv4(b"newcomer")]


def test_many_source_flood_has_a_ceiling():
    sim = Sim()
    _, b = sim.pair()
    mac1 = count_mac1(b)
    flood = forged_initiations(b.public_key, 1000)
    n = 100_000
    for i in range(n):                           # 100,000 sources, one datagram each, in one second
        b.receive(flood[i % len(flood)], (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 9), i / n)
    b.datagrams_to_send()
    assert mac1[0] <= HANDSHAKE_WORK_PER_SECOND, mac1[0]             # before: 100,000
    assert b.stats["cookie_sent"] <= HANDSHAKE_WORK_PER_SECOND
    dropped = b.stats["handshake_shed"] + b.stats["handshake_source_limited"]
    assert dropped >= n - HANDSHAKE_WORK_PER_SECOND

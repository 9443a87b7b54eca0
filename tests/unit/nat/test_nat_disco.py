"""Discovery messages: seal/open round trips, forgery, reflection, replay, bounds, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import crypto
from overlay.nat import Candidate, is_disco, is_stun
from overlay.nat.candidate import LAN, PEER, PREDICTED, SRFLX
from overlay.nat.disco import MAGIC, MAX_CANDIDATES, CallMeMaybe, DiscoCodec, DiscoError, Ping, Pong, new_tx_id


def codec(**kw) -> DiscoCodec:
    return DiscoCodec(crypto.generate_private_key(), **kw)


@pytest.fixture
def pair():
    return codec(), codec()


def test_round_trip_all_messages(pair):
    a, b = pair
    msgs = [
        Ping(new_tx_id()),
        Pong(new_tx_id(), ("198.51.100.7", 40001)),
        Pong(new_tx_id(), ("2001:db8::7", 41641)),
        CallMeMaybe(
            new_tx_id(),
            (
                Candidate(("10.0.0.2", 41641), LAN),
                Candidate(("198.51.100.7", 40001), SRFLX),
                Candidate(("198.51.100.7", 40002), PREDICTED),
                Candidate(("2001:db8::7", 41641), PEER),
            ),
        ),
        CallMeMaybe(new_tx_id(), ()),
    ]
    for m in msgs:
        wire = a.seal(b.public_key, m)
        assert is_disco(wire) and not is_stun(wire) and wire[:4] == MAGIC
        assert wire[4:36] == a.public_key
        sender, got = b.open(wire)
        assert sender == a.public_key and got == m


def test_ciphertext_differs_each_time(pair):
    a, b = pair
    m = Ping(new_tx_id())
    assert a.seal(b.public_key, m) != a.seal(b.public_key, m)  # random nonce


def test_any_bit_flip_is_rejected(pair):
    a, b = pair
    wire = a.seal(b.public_key, Pong(new_tx_id(), ("198.51.100.7", 40001)))
    for pos in range(len(wire)):
        bad = bytearray(wire)
        bad[pos] ^= 0x80
        with pytest.raises(DiscoError):
            b.open(bytes(bad))


def test_wrong_recipient_and_forged_sender(pair):
    a, b = pair
    c = codec()
    wire = a.seal(b.public_key, Ping(new_tx_id()))
    with pytest.raises(DiscoError, match="authentication"):
        c.open(wire)  # not for c
    # an attacker with its own key claims to be a
    forged = c.seal(b.public_key, Ping(new_tx_id()))
    forged = forged[:4] + a.public_key + forged[36:]
    with pytest.raises(DiscoError):
        b.open(forged)


def test_reflection_back_to_sender_rejected(pair):
    """A box key is symmetric: a's message to b, bounced to a as if from b, must not open."""
    a, b = pair
    wire = a.seal(b.public_key, Ping(new_tx_id()))
    with pytest.raises(DiscoError, match="ourselves"):
        a.open(wire)
    reflected = wire[:4] + b.public_key + wire[36:]
    with pytest.raises(DiscoError, match="reflected"):
        a.open(reflected)


def test_replay_rejected_and_cache_bounded():
    a = codec()
    b = codec(replay_cache_size=8)
    wires = [a.seal(b.public_key, Ping(new_tx_id())) for _ in range(9)]
    b.open(wires[0])
    with pytest.raises(DiscoError, match="replayed"):
        b.open(wires[0])
    # the same tx_id resealed (new nonce) by the sender is a replay too
    tx = new_tx_id()
    b.open(a.seal(b.public_key, Ping(tx)))
    with pytest.raises(DiscoError, match="replayed"):
        b.open(a.seal(b.public_key, Ping(tx)))
    # a pong may echo the tx_id of a ping: different type, not a replay
    b.open(a.seal(b.public_key, Pong(tx, ("192.0.2.1", 5))))
    for w in wires[1:]:
        b.open(w)
    assert len(b._seen) == 8  # bounded: the oldest entries were evicted


def test_unknown_sender_filtered_before_crypto():
    a = codec()
    allowed: set[bytes] = set()
    b = codec(accept_sender=allowed.__contains__)
    wire = a.seal(b.public_key, Ping(new_tx_id()))
    with pytest.raises(DiscoError, match="unknown sender"):
        b.open(wire)
    allowed.add(a.public_key)
    assert b.open(wire)[0] == a.public_key


def test_bounds_and_malformed(pair):
    a, b = pair
    with pytest.raises(ValueError):
        a.seal(b.public_key, CallMeMaybe(new_tx_id(), tuple(Candidate(("192.0.2.1", i + 1), LAN) for i in range(MAX_CANDIDATES + 1))))
    with pytest.raises(DiscoError, match="short"):
        b.open(MAGIC + bytes(50))
    with pytest.raises(DiscoError, match="long"):
        b.open(MAGIC + bytes(2000))
    with pytest.raises(DiscoError, match="magic"):
        b.open(b"XXXX" + a.seal(b.public_key, Ping(new_tx_id()))[4:])
    with pytest.raises(DiscoError):
        b.open(MAGIC + bytes(32) + bytes(24) + bytes(80))  # low-order (all-zero) public key


def _raw_seal(a: DiscoCodec, b: DiscoCodec, plaintext: bytes) -> bytes:
    import os

    nonce = os.urandom(24)
    return MAGIC + a.public_key + nonce + a._box(b.public_key).encrypt(plaintext, nonce).ciphertext


@pytest.mark.parametrize(
    "body, why",
    [
        (bytes([9]), "unknown type"),
        (bytes([1]) + b"x", "ping trailing"),
        (bytes([2]) + bytes([7, 0, 1, 1, 2, 3, 4]), "bad family"),
        (bytes([2]) + bytes([4, 0, 0, 1, 2, 3, 4]), "port 0"),
        (bytes([2]) + bytes([4, 0, 1, 1, 2]), "truncated address"),
        (bytes([3]), "empty cmm"),
        (bytes([3, 2, 1, 4, 0, 1, 1, 2, 3, 4]), "count larger than list"),
        (bytes([3, 1, 99, 4, 0, 1, 1, 2, 3, 4]), "bad kind"),
        (bytes([3, MAX_CANDIDATES + 1]), "too many"),
    ],
)
def test_malformed_plaintext_rejected(pair, body, why):
    a, b = pair
    pt = body[:1] + a.public_key + new_tx_id() + body[1:]
    with pytest.raises(DiscoError):
        b.open(_raw_seal(a, b, pt))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_open_random(data):
    b = _FUZZ_B
    for d in (data, MAGIC + data, MAGIC + _FUZZ_A.public_key + data):
        with pytest.raises(DiscoError):
            b.open(d)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_fuzz_authentic_but_random_plaintext(body):
    """Even authenticated plaintext from a real peer is parsed with bounds: DiscoError or a message."""
    pt = body[:1] + _FUZZ_A.public_key + new_tx_id() + body[1:]
    try:
        _FUZZ_B.open(_raw_seal(_FUZZ_A, _FUZZ_B, pt))
    except DiscoError:
        pass


_FUZZ_A = codec()
_FUZZ_B = codec()

"""Hostile input: garbage, truncated and bit-flipped datagrams are counted and dropped, never raised."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from overlay.wire import is_wireguard
from overlay.wire.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    MalformedMessage,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
)
from tests.unit.wire.test_wire_device import Sim, ipv4


def established():
    sim = Sim(seed=3)
    a, b = sim.pair()
    sim.send(a, b, ipv4(b"x"))
    valid = [d for _, _, _, d in sim.wire]  # initiation, response, transport
    return sim, a, b, valid


SIM, A, B, VALID = established()


def test_is_wireguard_lengths_and_reserved_bytes():
    assert is_wireguard(bytes([1, 0, 0, 0]) + bytes(INITIATION_SIZE - 4))
    assert is_wireguard(bytes([2, 0, 0, 0]) + bytes(RESPONSE_SIZE - 4))
    assert is_wireguard(bytes([3, 0, 0, 0]) + bytes(COOKIE_REPLY_SIZE - 4))
    assert is_wireguard(bytes([4, 0, 0, 0]) + bytes(28))
    assert not is_wireguard(bytes([4, 0, 0, 0]) + bytes(27))  # shorter than a keepalive
    assert not is_wireguard(bytes([1, 0, 0, 0]) + bytes(INITIATION_SIZE - 3))
    assert not is_wireguard(bytes([1, 0, 1, 0]) + bytes(INITIATION_SIZE - 4))  # reserved byte set
    assert not is_wireguard(bytes([0, 1, 0, 0x21, 0x12, 0xA4, 0x42]) + bytes(13))  # a STUN header
    assert not is_wireguard(b"")
    assert all(is_wireguard(d) for d in VALID)


def test_parsers_reject_wrong_type_and_size():
    for parse in (parse_initiation, parse_response, parse_cookie_reply):
        with pytest.raises(MalformedMessage):
            parse(b"\x04\0\0\0" + bytes(60))
        with pytest.raises(MalformedMessage):
            parse(b"")


def assert_quiet(dev, before):
    """Nothing decrypted, no handshake completed, and the datagram was accounted for."""
    assert dev.stats["rx_datagrams"] == before["rx_datagrams"] + 1
    assert dev.stats["packets_rx"] == before["packets_rx"]
    assert dev.stats["handshakes_completed"] == before["handshakes_completed"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data):
    for dev in (A, B):
        before = dict(dev.stats)
        dev.receive(data, ("203.0.113.9", 9), SIM.now)
        dev.receive(memoryview(data), ("203.0.113.9", 9), SIM.now)
        assert dev.stats["packets_rx"] == before["packets_rx"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(range(3)), st.data())
def test_mutated_valid_messages_never_raise_or_authenticate(which, data):
    msg = bytearray(VALID[which])
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if mutation == "flip":
        pos = data.draw(st.integers(min_value=4, max_value=len(msg) - 1))
        msg[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif mutation == "truncate":
        del msg[data.draw(st.integers(min_value=0, max_value=len(msg) - 1)):]
    else:
        msg += data.draw(st.binary(min_size=1, max_size=64))
    for dev in (A, B):
        before = dict(dev.stats)
        dev.receive(memoryview(msg), ("203.0.113.9", 9), SIM.now + 1)
        assert_quiet(dev, before)
    assert A.peer_stats(B.public_key)["endpoint"] == ("10.0.0.2", 51820)
    assert B.peer_stats(A.public_key)["endpoint"] == ("10.0.0.1", 51820)


def test_valid_messages_replayed_are_dropped():
    for data in VALID:
        for dev in (A, B):
            before = dict(dev.stats)
            dev.receive(data, ("10.0.0.1", 51820), SIM.now + 2)
            assert_quiet(dev, before)

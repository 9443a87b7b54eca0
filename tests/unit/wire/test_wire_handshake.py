"""Noise IKpsk2 functions and TAI64N timestamps, without a Device around them."""

from __future__ import annotations

import struct

import pytest

from overlay import crypto
from overlay.wire.handshake import (
    Handshake,
    HandshakeError,
    State,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_transport_keys,
    next_timestamp,
    tai64n,
)
from overlay.wire.messages import INITIATION_SIZE, RESPONSE_SIZE, parse_initiation, parse_response


def test_tai64n_layout_and_whitening():
    ts = tai64n(1_700_000_000.123456789)
    seconds, nanos = struct.unpack(">QI", ts)
    assert seconds == 0x400000000000000A + 1_700_000_000
    assert nanos % (1 << 24) == 0 and nanos <= 123456789 < nanos + (1 << 24)


def test_timestamps_strictly_increase_even_if_the_clock_does_not():
    a = next_timestamp(1000.0, bytes(12))
    b = next_timestamp(1000.0, a)  # same whitened instant
    c = next_timestamp(900.0, b)  # wall clock stepped back
    assert a < b < c
    assert next_timestamp(1000.999, next_timestamp(1000.99, a)) > a  # carries into seconds


def keys():
    i_priv, r_priv = crypto.generate_private_key(), crypto.generate_private_key()
    return i_priv, crypto.public_key(i_priv), r_priv, crypto.public_key(r_priv)


@pytest.mark.parametrize("psk", [bytes(32), b"p" * 32])
def test_full_handshake_derives_matching_keys(psk):
    i_priv, i_pub, r_priv, r_pub = keys()
    initiator = Handshake(i_priv, r_pub, psk)
    responder = Handshake(r_priv, i_pub, psk)
    msg1 = create_initiation(initiator, i_pub, 7, tai64n(1e9))
    assert len(msg1) == INITIATION_SIZE
    consumed = consume_initiation(r_priv, r_pub, parse_initiation(bytes(msg1)),
                                  lambda pub: responder if pub == i_pub else None)
    assert consumed.handshake is responder and consumed.timestamp == tai64n(1e9) and consumed.sender == 7
    consumed.commit(0.0)
    msg2 = create_response(responder, 9)
    assert len(msg2) == RESPONSE_SIZE
    consume_response(initiator, i_priv, parse_response(bytes(msg2)))
    assert initiator.remote_index == 9
    i_send, i_recv, i_is_initiator = derive_transport_keys(initiator)
    r_send, r_recv, r_is_initiator = derive_transport_keys(responder)
    assert (i_send, i_recv) == (r_recv, r_send) and i_is_initiator and not r_is_initiator
    assert i_send != i_recv


def test_wrong_responder_or_state_is_refused():
    i_priv, i_pub, r_priv, r_pub = keys()
    initiator = Handshake(i_priv, r_pub, bytes(32))
    msg1 = parse_initiation(bytes(create_initiation(initiator, i_pub, 1, tai64n(1e9))))
    other = crypto.generate_private_key()
    with pytest.raises(HandshakeError):  # not addressed to this key
        consume_initiation(other, crypto.public_key(other), msg1, lambda pub: None)
    with pytest.raises(HandshakeError):  # addressed to us, but from a peer we do not know
        consume_initiation(r_priv, r_pub, msg1, lambda pub: None)
    responder = Handshake(r_priv, i_pub, bytes(32))
    with pytest.raises(HandshakeError):
        create_response(responder, 2)  # nothing consumed yet
    consume_initiation(r_priv, r_pub, msg1, lambda pub: responder).commit(0.0)
    msg2 = parse_response(bytes(create_response(responder, 2)))
    consume_response(initiator, i_priv, msg2)
    assert initiator.state == State.RESPONSE_CONSUMED
    with pytest.raises(HandshakeError):  # the same response twice
        consume_response(initiator, i_priv, msg2)


def test_low_order_peer_key_rejected():
    with pytest.raises(crypto.DecryptError):
        Handshake(crypto.generate_private_key(), bytes(32), bytes(32))

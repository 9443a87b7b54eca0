"""Unit tests of the control plane's sans-I/O pieces.

- ``XXHandshake`` against ``noiseprotocol`` (an independent Noise implementation) in both roles,
  byte-for-byte with fixed ephemerals, and transport messages both ways.
- ``Channel``: framing, handshake, every way a peer can break the protocol -> ``ProtocolError``.
- ``messages.validate_request`` / ``normalize_name`` / key text.
- ``NodeState.apply`` for each server event.
- Hypothesis: arbitrary bytes into a responder ``Channel`` only ever raise ``ProtocolError``.

Bugs these tests found were fixed; the tests stay as regressions.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from overlay import crypto
from overlay.control import messages, passwords
from overlay.control.channel import (
    MAX_PENDING_EVENTS, MAX_PLAINTEXT, PROLOGUE, Channel, Handshaked, Message, ProtocolError,
)
from overlay.control.messages import RequestError, validate_request
from overlay.control.noise import HandshakeError, XXHandshake
from overlay.node.state import NodeState, Peer

NOISE_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"


# ============================================================================ Noise XX vs oracle


def _oracle(initiator: bool, static: bytes, prologue: bytes, ephemeral: bytes | None = None) -> NoiseConnection:
    conn = NoiseConnection.from_name(NOISE_NAME)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if ephemeral is not None:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    conn.set_prologue(prologue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ephemeral keypair already set" (fine for vectors)
        conn.start_handshake()
    return conn


def _transport_both_ways(ours: XXHandshake, oracle: NoiseConnection) -> None:
    send, recv = ours.split()
    for i in range(5):  # several messages: the implicit nonce counter must advance in step
        pt = os.urandom(i * 37)
        assert oracle.decrypt(send.encrypt(b"", pt)) == pt
        pt2 = f"reply {i}".encode() * i
        assert recv.decrypt(b"", oracle.encrypt(pt2)) == pt2
    assert send.n == 5 and recv.n == 5


@pytest.mark.parametrize("prologue", [b"", b"overlay-control-v1"])
def test_xx_initiator_interoperates_with_noiseprotocol(prologue):
    si, sr = crypto.generate_private_key(), crypto.generate_private_key()
    ours = XXHandshake(True, si, prologue)
    them = _oracle(False, sr, prologue)
    assert them.read_message(ours.write_message(b"p1")) == b"p1"
    assert ours.read_message(bytes(them.write_message(b"payload two"))) == b"payload two"
    assert ours.remote_static == crypto.public_key(sr)
    assert not ours.complete
    assert them.read_message(ours.write_message(b"3")) == b"3"
    assert ours.complete and them.handshake_finished
    assert ours.handshake_hash == them.get_handshake_hash()
    _transport_both_ways(ours, them)


@pytest.mark.parametrize("prologue", [b"", b"overlay-control-v1"])
def test_xx_responder_interoperates_with_noiseprotocol(prologue):
    si, sr = crypto.generate_private_key(), crypto.generate_private_key()
    them = _oracle(True, si, prologue)
    ours = XXHandshake(False, sr, prologue)
    assert ours.read_message(bytes(them.write_message(b"hello"))) == b"hello"
    assert them.read_message(ours.write_message(b"")) == b""
    assert ours.remote_static is None  # the initiator's key only arrives in message 3
    assert ours.read_message(bytes(them.write_message(b"x" * 1000))) == b"x" * 1000
    assert ours.complete and them.handshake_finished
    assert ours.remote_static == crypto.public_key(si)
    assert ours.handshake_hash == them.get_handshake_hash()
    _transport_both_ways(ours, them)


@pytest.mark.parametrize("initiator", [True, False])
def test_xx_messages_byte_identical_to_noiseprotocol_with_fixed_keys(initiator):
    """Same keys, same ephemerals -> every handshake message and the hash are identical."""
    keys = [crypto.generate_private_key() for _ in range(4)]
    si, ei, sr, er = keys
    ours_i = XXHandshake(True, si, PROLOGUE, ephemeral_private=ei)
    ours_r = XXHandshake(False, sr, PROLOGUE, ephemeral_private=er)
    ref_i = _oracle(True, si, PROLOGUE, ei)
    ref_r = _oracle(False, sr, PROLOGUE, er)
    payloads = [b"one", b"", b"three" * 10]
    for step, p in enumerate(payloads):
        mine, ref = ((ours_i, ref_i), (ours_r, ref_r))[step % 2]
        peer_ours, peer_ref = ((ours_r, ref_r), (ours_i, ref_i))[step % 2]
        m = mine.write_message(p)
        assert m == bytes(ref.write_message(p)), f"message {step + 1} differs"
        assert peer_ours.read_message(m) == p
        assert peer_ref.read_message(m) == p
    assert ours_i.handshake_hash == ours_r.handshake_hash == ref_i.get_handshake_hash()
    # our side of either role talks transport with the oracle's opposite role
    if initiator:
        _transport_both_ways(ours_i, ref_r)
    else:
        _transport_both_ways(ours_r, ref_i)


def _xx_pair():
    i = XXHandshake(True, crypto.generate_private_key(), PROLOGUE)
    r = XXHandshake(False, crypto.generate_private_key(), PROLOGUE)
    return i, r


def test_xx_prologue_mismatch_fails_at_message_2():
    i = XXHandshake(True, crypto.generate_private_key(), b"a")
    r = XXHandshake(False, crypto.generate_private_key(), b"b")
    r.read_message(i.write_message())
    with pytest.raises(HandshakeError):
        i.read_message(r.write_message())


@pytest.mark.parametrize("which", [1, 2])
def test_xx_tampered_handshake_message_rejected(which):
    i, r = _xx_pair()
    m1 = i.write_message()
    r.read_message(m1)
    m2 = bytearray(r.write_message(b"pay"))
    if which == 1:
        m2[40] ^= 1       # inside the encrypted static key
    else:
        m2[-1] ^= 0x80    # inside the payload tag
    with pytest.raises(HandshakeError):
        i.read_message(bytes(m2))


def test_xx_tampered_message_3_rejected():
    i, r = _xx_pair()
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    m3 = bytearray(i.write_message())
    m3[5] ^= 4
    with pytest.raises(HandshakeError):
        r.read_message(bytes(m3))
    assert not r.complete and r.remote_static is None


def test_xx_out_of_turn_and_split_before_complete():
    i, r = _xx_pair()
    with pytest.raises(HandshakeError):
        r.write_message()             # responder never writes first
    with pytest.raises(HandshakeError):
        i.read_message(bytes(32))     # initiator must write first
    with pytest.raises(HandshakeError):
        i.split()
    r.read_message(i.write_message())
    with pytest.raises(HandshakeError):
        i.write_message()             # twice in a row
    i.read_message(r.write_message())
    r.read_message(i.write_message())
    with pytest.raises(HandshakeError):
        r.read_message(b"x" * 100)    # handshake is over
    with pytest.raises(HandshakeError):
        i.write_message()


@pytest.mark.parametrize("length", [0, 31])
def test_xx_short_message_1(length):
    _, r = _xx_pair()
    with pytest.raises(HandshakeError):
        r.read_message(bytes(length))


@pytest.mark.parametrize("length", [0, 32, 95])
def test_xx_short_message_2(length):
    i, r = _xx_pair()
    r.read_message(i.write_message())
    with pytest.raises(HandshakeError):
        i.read_message(r.write_message()[:length])


@pytest.mark.parametrize("length", [0, 48, 63])
def test_xx_short_message_3(length):
    i, r = _xx_pair()
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    with pytest.raises(HandshakeError):
        r.read_message(i.write_message()[:length])


def test_xx_low_order_ephemeral_in_message_2_rejected():
    i, r = _xx_pair()
    r.read_message(i.write_message())
    m2 = bytearray(r.write_message())
    m2[:32] = bytes(32)   # the all-zero point: DH output would be zero
    with pytest.raises(HandshakeError):
        i.read_message(bytes(m2))


def test_xx_oversized_payload_refused():
    i, _ = _xx_pair()
    with pytest.raises(HandshakeError):
        i.write_message(b"x" * 65535)


# ============================================================================ Channel


def _pump(a: Channel, b: Channel) -> None:
    for _ in range(4):
        b.receive_data(a.data_to_send())
        a.receive_data(b.data_to_send())


def _pair() -> tuple[Channel, Channel, bytes, bytes]:
    ki, kr = crypto.generate_private_key(), crypto.generate_private_key()
    a = Channel(initiator=True, static_private=ki)
    b = Channel(initiator=False, static_private=kr)
    _pump(a, b)
    assert a.established and b.established
    return a, b, ki, kr


def _established() -> tuple[Channel, Channel]:
    """A handshaked pair with the Handshaked events already taken."""
    a, b, _, _ = _pair()
    _events(a)
    _events(b)
    return a, b


def _events(ch: Channel) -> list:
    out = []
    while (ev := ch.next_event()) is not None:
        out.append(ev)
    return out


def _frames(data: bytes) -> list[bytes]:
    """Split a byte stream into its length-prefixed frames (each including its prefix)."""
    out = []
    while data:
        n = int.from_bytes(data[:2], "big")
        out.append(data[:2 + n])
        data = data[2 + n:]
    return out


def test_channel_handshake_reports_keys_and_carries_messages():
    a, b, ki, kr = _pair()
    assert _events(a) == [Handshaked(crypto.public_key(kr))]
    assert _events(b) == [Handshaked(crypto.public_key(ki))]
    assert a.remote_static == crypto.public_key(kr) and b.remote_static == crypto.public_key(ki)
    a.send({"t": "hello", "id": 1, "name": "zoë"})
    a.send({"t": "ping", "id": 2})
    b.receive_data(a.data_to_send())
    assert _events(b) == [Message({"t": "hello", "id": 1, "name": "zoë"}), Message({"t": "ping", "id": 2})]
    b.send({"t": "ok", "id": 1, "nested": {"a": [1, 2.5, None, True]}})
    a.receive_data(b.data_to_send())
    assert _events(a) == [Message({"t": "ok", "id": 1, "nested": {"a": [1, 2.5, None, True]}})]


def test_channel_initiator_learns_server_key_before_sending_message_3():
    """The pin check happens on Handshaked, before the initiator authenticates itself."""
    kr = crypto.generate_private_key()
    a = Channel(initiator=True, static_private=crypto.generate_private_key())
    b = Channel(initiator=False, static_private=kr)
    b.receive_data(a.data_to_send())
    assert _events(b) == []
    a.receive_data(b.data_to_send())
    assert _events(a) == [Handshaked(crypto.public_key(kr))]
    assert a.established
    assert not b.established


def test_channel_interoperates_with_noiseprotocol_over_framing():
    """A Channel initiator against a hand-framed noiseprotocol responder with our prologue."""
    kr = crypto.generate_private_key()
    a = Channel(initiator=True, static_private=crypto.generate_private_key())
    ref = _oracle(False, kr, PROLOGUE)
    ref.read_message(_frames(a.data_to_send())[0][2:])
    m2 = bytes(ref.write_message())
    a.receive_data(len(m2).to_bytes(2, "big") + m2)
    ref.read_message(_frames(a.data_to_send())[0][2:])
    assert ref.handshake_finished
    a.send({"t": "ping", "id": 7})
    (f,) = _frames(a.data_to_send())
    assert json.loads(ref.decrypt(f[2:])) == {"t": "ping", "id": 7}
    ct = ref.encrypt(b'{"t":"ok","id":7}')
    a.receive_data(len(ct).to_bytes(2, "big") + ct)
    assert _events(a)[-1] == Message({"t": "ok", "id": 7})


def test_channel_stream_fed_one_byte_at_a_time():
    ki, kr = crypto.generate_private_key(), crypto.generate_private_key()
    a = Channel(initiator=True, static_private=ki)
    b = Channel(initiator=False, static_private=kr)
    for _ in range(3):
        for byte in a.data_to_send():
            b.receive_data(bytes([byte]))
        for byte in b.data_to_send():
            a.receive_data(bytes([byte]))
    assert a.established and b.established
    sent = [{"t": "chat", "id": i, "text": "é" * i} for i in range(1, 6)]
    for m in sent:
        a.send(m)
    stream = a.data_to_send()
    got = []
    for i in range(len(stream)):
        b.receive_data(stream[i:i + 1])
        got += [e.body for e in _events(b) if isinstance(e, Message)]
    assert got == sent


def test_channel_frames_split_at_every_boundary():
    """Two frames in one stream, cut into two pieces at every possible offset (fresh pair each)."""
    sent = [{"t": "x", "pad": "y" * 40}, {"t": "z", "n": 2}]
    n_splits = None
    split = 0
    while n_splits is None or split <= n_splits:
        a, b, _, _ = _pair()
        _events(b)
        for m in sent:
            a.send(m)
        stream = a.data_to_send()
        n_splits = len(stream)
        f1_len = len(_frames(stream)[0])
        b.receive_data(stream[:split])
        first = [e.body for e in _events(b)]
        assert first == sent[:(split >= f1_len) + (split == len(stream))]
        b.receive_data(stream[split:])
        assert first + [e.body for e in _events(b)] == sent
        split += 1


def test_channel_tampered_ciphertext():
    a, b, _, _ = _pair()
    a.send({"t": "ping", "id": 1})
    data = bytearray(a.data_to_send())
    data[10] ^= 0x01
    with pytest.raises(ProtocolError):
        b.receive_data(bytes(data))


def test_channel_replayed_frame():
    a, b, _, _ = _pair()
    a.send({"t": "ping", "id": 1})
    frame = a.data_to_send()
    b.receive_data(frame)
    with pytest.raises(ProtocolError):
        b.receive_data(frame)


def test_channel_reordered_frames():
    a, b, _, _ = _pair()
    a.send({"t": "ping", "id": 1})
    a.send({"t": "ping", "id": 2})
    f1, f2 = _frames(a.data_to_send())
    with pytest.raises(ProtocolError):
        b.receive_data(f2 + f1)


def test_channel_frame_from_another_session_rejected():
    a, b, _, _ = _pair()
    c, _, _, _ = _pair()
    c.send({"t": "ping", "id": 1})
    with pytest.raises(ProtocolError):
        b.receive_data(c.data_to_send())


@pytest.mark.parametrize("established", [False, True])
def test_channel_zero_length_frame(established):
    if established:
        _, b, _, _ = _pair()
    else:
        b = Channel(initiator=False, static_private=crypto.generate_private_key())
    with pytest.raises(ProtocolError):
        b.receive_data(b"\x00\x00")


@pytest.mark.parametrize("garbage", [
    b"\x00\x05hello",                                   # a frame too short to be message 1
    b"\x00\x28" + b"G" * 40 + b"\x00\x50" + b"E" * 80,  # "message 1" then a forged message 3
])
def test_channel_garbage_before_handshake(garbage):
    b = Channel(initiator=False, static_private=crypto.generate_private_key())
    with pytest.raises(ProtocolError):
        b.receive_data(garbage)
    assert not b.established


def test_channel_garbage_to_initiator():
    a = Channel(initiator=True, static_private=crypto.generate_private_key())
    a.data_to_send()
    with pytest.raises(ProtocolError):
        a.receive_data(b"\x00\x60" + os.urandom(0x60))
    assert not a.established


def test_channel_low_order_ephemeral_in_message_1():
    b = Channel(initiator=False, static_private=crypto.generate_private_key())
    with pytest.raises(ProtocolError):
        b.receive_data(b"\x00\x20" + bytes(32))


def test_channel_send_size_limit():
    a, b = _established()
    overhead = len(json.dumps({"t": ""}, separators=(",", ":")))
    exact = {"t": "x" * (MAX_PLAINTEXT - overhead)}
    a.send(exact)
    data = a.data_to_send()
    assert len(data) == 2 + 65535
    b.receive_data(data)
    assert b.next_event() == Message(exact)
    with pytest.raises(ProtocolError):
        a.send({"t": "x" * (MAX_PLAINTEXT - overhead + 1)})
    with pytest.raises(ProtocolError):   # size counts UTF-8 bytes, not characters
        a.send({"t": "é" * (MAX_PLAINTEXT // 2)})
    assert a.data_to_send() == b""       # nothing half-queued
    a.send({"t": "still works"})         # and the nonce did not move
    b.receive_data(a.data_to_send())
    assert b.next_event() == Message({"t": "still works"})


def test_channel_send_before_established():
    a = Channel(initiator=True, static_private=crypto.generate_private_key())
    with pytest.raises(ProtocolError):
        a.send({"t": "ping"})


def _inject(a: Channel, plaintext: bytes) -> bytes:
    """Encrypt arbitrary plaintext as ``a``'s next transport frame (what a hostile peer can do)."""
    ct = a._send_cs.encrypt(b"", plaintext)
    return len(ct).to_bytes(2, "big") + ct


@pytest.mark.parametrize("plaintext", [
    b"[1,2]", b'"str"', b"3", b"null", b"true",      # JSON, but not an object
    b"{", b"", b"{'a': 1}", b"\xff\xfe{}",          # not JSON / not UTF-8
])
def test_channel_non_object_or_invalid_json(plaintext):
    a, b, _, _ = _pair()
    with pytest.raises(ProtocolError):
        b.receive_data(_inject(a, plaintext))


def test_channel_deeply_nested_json():
    a, b, _, _ = _pair()
    with pytest.raises(ProtocolError):
        b.receive_data(_inject(a, b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}"))


def test_channel_too_many_unprocessed_events():
    a, b, _, _ = _pair()
    _events(b)
    for i in range(MAX_PENDING_EVENTS + 1):
        a.send({"i": i})
    with pytest.raises(ProtocolError):
        b.receive_data(a.data_to_send())


def _channel_garbage_only_protocol_errors(chunks: list[bytes], prefix: bytes = b"") -> None:
    b = Channel(initiator=False, static_private=crypto.generate_private_key())
    try:
        if prefix:
            b.receive_data(prefix)
        for c in chunks:
            b.receive_data(c)
            while b.next_event() is not None:
                pass
    except ProtocolError:
        return


_frame = st.builds(lambda body: len(body).to_bytes(2, "big") + body, st.binary(min_size=1, max_size=200))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=300), _frame), max_size=6))
def test_channel_random_bytes_only_raise_protocol_error(chunks):
    _channel_garbage_only_protocol_errors(chunks)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.binary(max_size=300), _frame), max_size=4))
def test_channel_random_bytes_after_valid_message_1(chunks):
    """A real message 1 (so the responder has keyed up), then arbitrary bytes."""
    a = Channel(initiator=True, static_private=crypto.generate_private_key())
    _channel_garbage_only_protocol_errors(chunks, prefix=a.data_to_send())


# ============================================================================ messages

KEY = messages.key_to_text(bytes(range(32)))

GOOD = {
    "hello": {"name": "alice", "version": 1},
    "ping": {},
    "create": {"network": "lan", "password": "pw", "approval": True, "max_members": 10},
    "join": {"network": "lan", "password": "pw"},
    "leave": {"network": "lan"},
    "chat": {"network": "lan", "text": "hi"},
    "history": {"network": "lan"},
    "members": {"network": "lan"},
    "admin": {"network": "lan", "action": "kick", "target": "bob"},
    "rename": {"name": "laptop2"},
    "presence": {"network": "lan", "online": False},
    "endpoints": {"candidates": [{"addr": "10.0.0.1:5000", "kind": "lan"}], "nat": {"type": "cone"}},
    "punch": {"peer": KEY},
    "relay": {"to": KEY, "data": "AAAA"},
    "turn": {},
}


def test_every_request_type_has_a_good_example():
    assert set(GOOD) == set(messages.REQUEST_SCHEMA)


def _req(t: str, rid: int = 1, **over) -> dict:
    return {"t": t, "id": rid, **GOOD[t], **over}


@pytest.mark.parametrize("t", sorted(GOOD))
def test_validate_good_requests(t):
    msg = _req(t)
    assert validate_request(msg) is msg


@pytest.mark.parametrize("t,field", [(t, f) for t, s in messages.REQUEST_SCHEMA.items()
                                     for f, (_, req) in s.items() if req])
def test_validate_missing_required_field(t, field):
    msg = _req(t)
    del msg[field]
    with pytest.raises(RequestError) as e:
        validate_request(msg)
    assert e.value.code == "bad_request" and field in e.value.message


def test_validate_optional_fields_may_be_absent():
    validate_request({"t": "create", "id": 1, "network": "n", "password": "p"})
    validate_request({"t": "admin", "id": 1, "network": "n", "action": "lock"})


@pytest.mark.parametrize("t,field,value", [
    ("hello", "name", 5), ("hello", "version", "1"), ("hello", "version", 1.0),
    ("create", "approval", 1), ("create", "approval", "yes"), ("create", "max_members", "3"),
    ("join", "password", None), ("chat", "text", ["hi"]), ("leave", "network", {"n": 1}),
    ("admin", "target", 3), ("admin", "value", "5"),
    ("endpoints", "candidates", {"addr": "x"}), ("endpoints", "nat", []), ("punch", "peer", 1),
    ("relay", "data", 5),
])
def test_validate_wrong_type(t, field, value):
    with pytest.raises(RequestError) as e:
        validate_request(_req(t, **{field: value}))
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("t,field", [("hello", "version"), ("create", "max_members"), ("admin", "value")])
def test_validate_bool_is_not_int(t, field):
    msg = _req(t, **{field: True})
    if t == "admin":
        msg["action"] = "limit"
    with pytest.raises(RequestError) as e:
        validate_request(msg)
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("rid", [None, True, False, -1, 2**53, 1.0, "1", [1]])
def test_validate_bad_id(rid):
    msg = _req("ping")
    if rid is None:
        del msg["id"]
    else:
        msg["id"] = rid
    with pytest.raises(RequestError) as e:
        validate_request(msg)
    assert e.value.code == "bad_request"


def test_validate_id_bounds():
    validate_request(_req("ping", rid=0))
    validate_request(_req("ping", rid=2**53 - 1))


@pytest.mark.parametrize("t", sorted(GOOD))
def test_validate_extra_field(t):
    with pytest.raises(RequestError) as e:
        validate_request(_req(t, extra=1))
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("t", ["nope", "", "HELLO", "ok", "error", "__class__"])
def test_validate_unknown_type(t):
    with pytest.raises(RequestError) as e:
        validate_request({"t": t, "id": 1})
    assert e.value.code == "unknown_type"


@pytest.mark.parametrize("t", [None, 5, ["hello"]])
def test_validate_type_not_a_string(t):
    msg = {"id": 1} if t is None else {"t": t, "id": 1}
    with pytest.raises(RequestError) as e:
        validate_request(msg)
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("t", ["create", "join"])
def test_validate_password_length(t):
    validate_request(_req(t, password="p" * messages.MAX_PASSWORD))
    validate_request(_req(t, password="p"))
    for bad in ("", "p" * (messages.MAX_PASSWORD + 1)):
        with pytest.raises(RequestError) as e:
            validate_request(_req(t, password=bad))
        assert e.value.code == "bad_request"


def test_validate_chat_length():
    validate_request(_req("chat", text="c" * messages.MAX_CHAT))
    for bad in ("", "c" * (messages.MAX_CHAT + 1)):
        with pytest.raises(RequestError):
            validate_request(_req("chat", text=bad))


def _cand(**over) -> dict:
    return {"addr": "192.168.1.2:41641", "kind": "srflx", **over}


def test_validate_endpoints_bounds():
    validate_request(_req("endpoints", candidates=[]))
    validate_request(_req("endpoints", candidates=[_cand()] * messages.MAX_CANDIDATES))
    for kind in sorted(messages.CANDIDATE_KINDS):
        validate_request(_req("endpoints", candidates=[_cand(kind=kind)]))
    bad_lists = [
        [_cand()] * (messages.MAX_CANDIDATES + 1),
        ["192.168.1.2:41641"],
        [_cand(kind="relay")],
        [_cand(addr=5)],
        [_cand(addr="1" * 65)],
        [{"addr": "1.2.3.4:5"}],
        [_cand(extra=1)],
    ]
    for cands in bad_lists:
        with pytest.raises(RequestError) as e:
            validate_request(_req("endpoints", candidates=cands))
        assert e.value.code == "bad_request"
    with pytest.raises(RequestError):
        validate_request(_req("endpoints", nat={"x": "y" * 1100}))


@pytest.mark.parametrize("kind", [[], {}, ["lan"]])
def test_validate_endpoints_unhashable_kind(kind):
    with pytest.raises(RequestError) as e:
        validate_request(_req("endpoints", candidates=[_cand(kind=kind)]))
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("t,field", [("punch", "peer"), ("relay", "to")])
def test_validate_peer_keys(t, field):
    for bad in ("", "nope", messages.key_to_text(bytes(31)), KEY + "=", "A" * 44):
        with pytest.raises(RequestError) as e:
            validate_request(_req(t, **{field: bad}))
        assert e.value.code == "bad_request"


def test_validate_relay_size():
    validate_request(_req("relay", data="A" * messages.MAX_RELAY_B64))
    with pytest.raises(RequestError):
        validate_request(_req("relay", data="A" * (messages.MAX_RELAY_B64 + 1)))


@pytest.mark.parametrize("t,field", [("chat", "text"), ("join", "password")])
def test_validate_lone_surrogate_refused(t, field):
    msg = json.loads(json.dumps(_req(t)).replace(json.dumps(GOOD[t][field]), '"a\\ud800"'))
    with pytest.raises(RequestError) as e:
        validate_request(msg)
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("action", sorted(messages.ADMIN_ACTIONS))
def test_validate_admin_actions(action):
    msg = {"t": "admin", "id": 1, "network": "n", "action": action}
    if action in messages.ADMIN_NEEDS_TARGET:
        with pytest.raises(RequestError):
            validate_request(msg)
        msg["target"] = "bob"
    if action == "type":
        with pytest.raises(RequestError, match="network type must be"):
            validate_request(msg)
        msg["target"] = "hub-and-spoke"
    if action in ("route-approve", "route-remove"):
        with pytest.raises(RequestError, match="take a prefix"):
            validate_request(msg)
        msg["prefix"] = "192.168.1.0/24"
    if action == "limit":
        with pytest.raises(RequestError):
            validate_request(msg)
        msg["value"] = 0
    if action == "password":
        with pytest.raises(RequestError):
            validate_request(msg)
        msg["password"] = "new secret"
    else:
        with pytest.raises(RequestError, match="only it"):
            validate_request({**msg, "password": "x"})
    validate_request(msg)


@pytest.mark.parametrize("action", ["", "Kick", "nuke", "kick ", "approval"])
def test_validate_unknown_admin_action(action):
    with pytest.raises(RequestError) as e:
        validate_request(_req("admin", action=action))
    assert e.value.code == "bad_request"


@pytest.mark.parametrize("value,good", [(0, True), (65535, True), (-1, False), (65536, False)])
def test_validate_limit_and_max_members_range(value, good):
    for msg in ({"t": "admin", "id": 1, "network": "n", "action": "limit", "value": value},
                _req("create", max_members=value)):
        if good:
            validate_request(msg)
        else:
            with pytest.raises(RequestError):
                validate_request(msg)


@pytest.mark.parametrize("raw,norm", [
    ("alice", "alice"), ("Alice", "alice"), ("  Bob-2 \n", "bob-2"), ("a", "a"), ("0", "0"),
    ("a--b", "a--b"), ("x" * 32, "x" * 32), ("\u212a", "k"),   # Kelvin sign lowercases to ASCII 'k'
])
def test_normalize_name_accepts(raw, norm):
    assert messages.normalize_name(raw) == norm


@pytest.mark.parametrize("raw", [
    "", " ", "-a", "a-", "a_b", "a.b", "a b", "x" * 33, "é", "a\nb", "ab\n\n\x00", "a/b", "*",
])
def test_normalize_name_rejects(raw):
    with pytest.raises(RequestError) as e:
        messages.normalize_name(raw)
    assert e.value.code == "invalid_name"


@pytest.mark.parametrize("raw", [None, 5, b"abc", ["a"]])
def test_normalize_name_non_string(raw):
    with pytest.raises(RequestError) as e:
        messages.normalize_name(raw)
    assert e.value.code == "bad_request"


def test_key_text_roundtrip_and_errors():
    k = os.urandom(32)
    assert messages.key_from_text(messages.key_to_text(k)) == k
    for bad in ("", "not base64!", messages.key_to_text(os.urandom(31)), messages.key_to_text(k) + "AAAA"):
        with pytest.raises(ValueError):
            messages.key_from_text(bad)


def test_passwords_hash_and_verify():
    h = passwords.hash_password("correct horse")
    assert b"correct horse" not in h and h.startswith(b"$argon2id$")
    assert passwords.verify_password(h, "correct horse")
    assert not passwords.verify_password(h, "correct hors")
    assert not passwords.verify_password(h, "")


# ============================================================================ NodeState


def _k(label: str) -> str:
    """A well-formed member key (base64 of 32 bytes) named by a readable label."""
    return messages.key_to_text(label.encode().ljust(32, b"."))


def _peer(s: NodeState, label: str) -> Peer:
    return s.peers()[messages.key_from_text(_k(label))]


def _peer_keys(s: NodeState) -> set[str]:
    return {p.key_text for p in s.peers().values()}


def _member(name: str, key: str, online: bool = True, role: str = "member", ip: str | None = None) -> dict:
    return {"name": name, "key": key, "ip": ip or f"100.64.0.{len(name)}", "online": online, "role": role}


def _state() -> NodeState:
    s = NodeState()
    s.me = {"key": _k("ME"), "name": "me", "networks": ["lan"]}
    s.apply({"t": "network", "network": {"name": "lan", "owner": "me", "role": "owner", "locked": False,
                                         "approval": True, "max_members": 5, "count": 2}})
    s.apply({"t": "members", "network": "lan",
             "members": [_member("me", _k("ME"), role="owner"), _member("bob", _k("BOB"))]})
    return s


def test_state_network_and_members():
    s = _state()
    assert s.networks["lan"].info["approval"] is True
    (st_,) = s.status()
    assert st_["name"] == "lan" and st_["role"] == "owner" and st_["approval"] and st_["max_members"] == 5
    assert [(m["name"], m["self"]) for m in st_["members"]] == [("bob", False), ("me", True)]
    key = messages.key_from_text(_k("BOB"))
    assert s.peers() == {key: Peer("bob", key, _k("BOB"), "100.64.0.3", True, None, ("lan",))}
    assert s.peers()[key].to_json() == {"name": "bob", "key": _k("BOB"), "ip": "100.64.0.3", "online": True,
                                        "iface": None, "caps": [], "networks": ["lan"], "routes": [], "withdrawn": [],
                                        "encrypted": True}


def test_state_members_changes_are_described():
    s = _state()
    assert s.apply({"t": "members", "network": "lan", "members": [_member("bob", _k("BOB"))]}) is None
    assert "offline" in s.apply({"t": "members", "network": "lan",
                                 "members": [_member("bob", _k("BOB"), online=False)]})
    assert _peer(s, "BOB").online is False
    msg = s.apply({"t": "members", "network": "lan", "members": [_member("carol", _k("CAROL"))]})
    assert "carol" in msg and "lan" in msg
    assert set(s.networks["lan"].members) == {_k("ME"), _k("BOB"), _k("CAROL")}


def test_state_member_left_and_removed():
    s = _state()
    assert "bob" in s.apply({"t": "member_left", "network": "lan", "key": _k("BOB"), "reason": "kicked"})
    assert s.peers() == {}
    assert s.apply({"t": "member_left", "network": "lan", "key": _k("BOB")}) is None     # already gone
    assert s.apply({"t": "member_left", "network": "nope", "key": _k("BOB")}) is None    # unknown network
    assert "lan" in s.apply({"t": "removed", "network": "lan", "reason": "deleted"})
    assert s.networks == {} and s.status() == []
    assert s.apply({"t": "removed", "network": "lan", "reason": "deleted"})          # idempotent


def test_state_peers_merge_networks():
    s = _state()
    s.apply({"t": "members", "network": "games",
             "members": [_member("bob", _k("BOB")), _member("me", _k("ME")), _member("dan", _k("DAN"), online=False)]})
    assert _peer_keys(s) == {_k("BOB"), _k("DAN")}
    assert sorted(_peer(s, "BOB").networks) == ["games", "lan"]
    assert _peer(s, "DAN").networks == ("games",)


def _chat(cid: int, network: str = "lan") -> dict:
    return {"t": "chat", "network": network, "id": cid, "from": "bob", "from_key": _k("BOB"), "text": str(cid),
            "ts": float(cid)}


def test_state_chat_dedupe_order_and_cap():
    s = _state()
    assert s.apply(_chat(150)) is None
    for cid in range(51, 151):          # history arrives after a live message, including it
        s.apply({**_chat(cid), "history": True})
    ids = [c["id"] for c in s.networks["lan"].chat]
    assert ids == list(range(51, 151))
    for cid in range(151, 301):
        s.apply(_chat(cid))
    ids = [c["id"] for c in s.networks["lan"].chat]
    assert ids == list(range(201, 301))
    s.apply(_chat(5, network="unknown"))  # not a member: ignored, no crash
    assert "unknown" not in s.networks


def test_state_join_request_and_verdicts():
    s = _state()
    msg = s.apply({"t": "join_request", "network": "lan", "name": "eve", "key": KEY})
    assert "eve" in msg and "approve lan eve" in msg
    assert "approved" in s.apply({"t": "join_approved", "network": "lan"})
    assert "rejected" in s.apply({"t": "join_rejected", "network": "lan"})
    assert s.apply({"t": "something-new"}) is None


def test_hostname_as_node_name():
    from overlay.control.messages import normalize_name
    from overlay.node.prefs import hostname_label
    assert hostname_label("My_Laptop.example.org") == "my-laptop"
    assert hostname_label("--x--") == "x"
    assert hostname_label("___") is None
    long = hostname_label("a" * 40 + "-b")
    assert normalize_name(long) == long and len(long) == 32


def test_state_enforces_network_types_even_if_the_server_lists_more():
    """A spoke never takes another spoke as a peer, whatever member list it is handed."""
    s = NodeState()
    s.me = {"key": _k("ME"), "name": "me"}
    s.apply({"t": "network", "network": {"name": "star", "owner": "o", "role": "member", "type": "hub-and-spoke"}})
    s.apply({"t": "members", "network": "star", "members": [
        {**_member("me", _k("ME")), "kind": "spoke"}, {**_member("hub", _k("HUB")), "kind": "hub"},
        {**_member("other", _k("OTHER")), "kind": "spoke"}, _member("unknown", _k("UNK"))]})
    assert _peer_keys(s) == {_k("HUB")}
    (st_,) = s.status()
    assert st_["type"] == "hub-and-spoke"
    assert {m["name"]: m["kind"] for m in st_["members"]} == {"me": "spoke", "hub": "hub", "other": "spoke",
                                                              "unknown": None}
    # as a hub it reaches everyone; a member listed in a mesh network too is a peer through that one
    s.apply({"t": "members", "network": "star", "members": [{**_member("me", _k("ME")), "kind": "hub"}]})
    assert _peer_keys(s) == {_k("HUB"), _k("OTHER"), _k("UNK")}
    s.apply({"t": "members", "network": "star", "members": [{**_member("me", _k("ME")), "kind": "spoke"}]})
    s.apply({"t": "network", "network": {"name": "side", "owner": "o", "role": "member"}})
    s.apply({"t": "members", "network": "side", "members": [_member("me", _k("ME")), _member("other", _k("OTHER"))]})
    assert _peer_keys(s) == {_k("HUB"), _k("OTHER")} and _peer(s, "OTHER").networks == ("side",)
    # gateway networks: members reach only the gateway
    s.apply({"t": "network", "network": {"name": "gw", "owner": "o", "role": "member", "type": "gateway"}})
    s.apply({"t": "members", "network": "gw", "members": [
        {**_member("me", _k("ME")), "kind": "member"}, {**_member("g", _k("G")), "kind": "gateway"},
        {**_member("x", _k("X")), "kind": "member"}]})
    assert _peer_keys(s) == {_k("HUB"), _k("OTHER"), _k("G")}
    assert "out of reach" in s.apply({"t": "member_left", "network": "gw", "key": _k("G"), "reason": "out of reach"})


def test_state_peer_unencrypted_only_when_every_shared_network_is():
    s = NodeState()
    s.me = {"key": _k("ME"), "name": "me"}
    for net, enc in (("fast", False), ("fast2", False), ("safe", True)):
        s.apply({"t": "network", "network": {"name": net, "owner": "o", "role": "member", "encrypted": enc}})
    s.apply({"t": "members", "network": "fast", "members": [_member("me", _k("ME")), _member("bob", _k("BOB")),
                                                             _member("carol", _k("CAROL"))]})
    s.apply({"t": "members", "network": "fast2", "members": [_member("me", _k("ME")), _member("bob", _k("BOB"))]})
    s.apply({"t": "members", "network": "safe", "members": [_member("me", _k("ME")), _member("carol", _k("CAROL"))]})
    assert _peer(s, "BOB").encrypted is False            # fast and fast2: both unencrypted
    assert _peer(s, "CAROL").encrypted is True           # also shares "safe": mixed keeps encryption
    assert {n["name"]: n["encrypted"] for n in s.status()} == {"fast": False, "fast2": False, "safe": True}

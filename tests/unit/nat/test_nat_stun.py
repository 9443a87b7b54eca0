"""STUN codec (RFC 8489): RFC 5769 test vectors, round trips, server responder, client transaction, fuzz."""

from __future__ import annotations

import socket
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.nat import DISCO, OTHER, STUN, WIREGUARD, classify_datagram
from overlay.nat import stun

# RFC 5769 §2 test vectors (STUN test client / "test vector" server, short-term credentials).
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"  # SOFTWARE "STUN test client"
    "002400046e0001ff"  # PRIORITY
    "80290008932ff9b151263b36"  # ICE-CONTROLLED
    "000600096576746a3a68367659202020"  # USERNAME "evtj:h6vY" + padding
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"  # MESSAGE-INTEGRITY
    "80280004e57a3bcf"  # FINGERPRINT
)
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
# §2.4: long-term credentials, no FINGERPRINT
SAMPLE_LTC_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"  # USERNAME (UTF-8) + padding
    "0015001c" + b"f//499k954d6OL34oL9FSTvy64sA".hex()  # NONCE
    + "0014000b6578616d706c652e6f726700"  # REALM "example.org" + padding
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"  # MESSAGE-INTEGRITY
)


def test_rfc5769_sample_request():
    m = stun.parse(SAMPLE_REQUEST)
    assert m.msg_type == stun.BINDING_REQUEST and m.msg_class == stun.REQUEST and m.method == stun.BINDING
    assert m.transaction_id == TID
    assert m.software == "STUN test client"
    assert m.get(stun.USERNAME) == b"evtj:h6vY"
    assert m.has_fingerprint
    # PRIORITY (0x0024) is an ICE attribute: comprehension-required and unknown to a plain server
    assert m.unknown_required == (0x0024,)
    assert stun.is_stun(SAMPLE_REQUEST)


def test_rfc5769_ipv4_response():
    m = stun.parse(SAMPLE_IPV4_RESPONSE)
    assert m.msg_class == stun.SUCCESS and m.method == stun.BINDING
    assert m.xor_mapped_address == ("192.0.2.1", 32853)
    assert m.software == "test vector"
    assert m.has_fingerprint and m.unknown_required == ()


def test_rfc5769_ipv6_response():
    m = stun.parse(SAMPLE_IPV6_RESPONSE)
    assert m.xor_mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_rfc5769_long_term_credential_request():
    m = stun.parse(SAMPLE_LTC_REQUEST)
    assert m.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert m.get(stun.USERNAME).decode() == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert m.get(stun.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    assert m.get(stun.REALM) == b"example.org"
    assert not m.has_fingerprint and m.unknown_required == ()
    # a credential-less server answers it (it ignores the credential attributes)
    resp = stun.parse(stun.binding_response(SAMPLE_LTC_REQUEST, ("192.0.2.1", 32853)))
    assert resp.msg_class == stun.SUCCESS and resp.transaction_id == m.transaction_id


def test_encoder_reproduces_vector_address_attribute():
    # our XOR-MAPPED-ADDRESS encoding must produce the RFC's exact bytes
    assert stun.encode_address(("192.0.2.1", 32853), TID) == bytes.fromhex("0001a147e112a643")
    assert stun.encode_address(("2001:db8:1234:5678:11:2233:4455:6677", 32853), TID) == bytes.fromhex(
        "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    )


@pytest.mark.parametrize("vector", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_vector_fingerprint_is_checked(vector):
    for pos in (len(vector) - 1, 25, 9):  # in the CRC itself, in an attribute, in the transaction ID
        bad = bytearray(vector)
        bad[pos] ^= 0x01
        with pytest.raises(stun.StunError):
            stun.parse(bytes(bad))


def test_attributes_after_message_integrity_are_ignored():
    mi = (stun.MESSAGE_INTEGRITY, bytes(20))
    raw = stun.encode(stun.BINDING_REQUEST, TID, [mi, (stun.SOFTWARE, b"late"), (0x0033, b"xx")])
    m = stun.parse(raw)
    assert m.software is None and m.unknown_required == ()


def test_round_trip_success_ipv4_and_ipv6():
    for addr in [("203.0.113.7", 1), ("203.0.113.7", 65535), ("2001:db8::1", 41641), ("::ffff:10.1.2.3", 5)]:
        tid = stun.new_transaction_id()
        m = stun.parse(stun.binding_success(tid, addr))
        want = ("10.1.2.3", 5) if addr[0].startswith("::ffff") else addr
        assert m.xor_mapped_address == want
        assert m.transaction_id == tid and m.has_fingerprint and m.software == stun.SOFTWARE_NAME


def test_mapped_address_legacy_attribute_decodes():
    value = struct.pack("!BBH", 0, 1, 3478) + socket.inet_aton("192.0.2.9")
    m = stun.parse(stun.encode(stun.BINDING_SUCCESS, TID, [(stun.MAPPED_ADDRESS, value)]))
    assert m.mapped_address == ("192.0.2.9", 3478) and m.xor_mapped_address is None


def test_binding_response_answers_plain_request():
    req = stun.binding_request(TID)
    resp = stun.binding_response(req, ("198.51.100.4", 40001))
    m = stun.parse(resp)
    assert m.msg_type == stun.BINDING_SUCCESS and m.transaction_id == TID
    assert m.xor_mapped_address == ("198.51.100.4", 40001)
    # a request without FINGERPRINT (as minimal clients send) is answered too
    bare = struct.pack("!HHI12s", 1, 0, stun.MAGIC_COOKIE, TID)
    assert stun.parse(stun.binding_response(bare, ("2001:db8::2", 9))).xor_mapped_address == ("2001:db8::2", 9)


def test_binding_response_420_for_unknown_comprehension_required():
    resp = stun.binding_response(SAMPLE_REQUEST, ("192.0.2.1", 32853))
    m = stun.parse(resp)
    assert m.msg_type == stun.BINDING_ERROR and m.error == (420, "Unknown Attribute")
    assert m.unknown_attributes == (0x0024,)
    # unknown comprehension-optional attributes (>= 0x8000) are simply ignored
    opt = stun.encode(stun.BINDING_REQUEST, TID, [(0x8055, b"whatever")])
    assert stun.parse(stun.binding_response(opt, ("192.0.2.1", 1))).msg_class == stun.SUCCESS


def test_binding_response_ignores_non_requests_and_garbage():
    addr = ("192.0.2.1", 1)
    assert stun.binding_response(SAMPLE_IPV4_RESPONSE, addr) is None  # never answer a response
    indication = stun.encode(0x0011, TID, [])
    assert stun.binding_response(indication, addr) is None
    other_method = stun.encode(0x0003, TID, [])  # Allocate (TURN): not served here
    assert stun.binding_response(other_method, addr) is None
    assert stun.binding_response(b"\x01\x00\x00\x00" + bytes(28), addr) is None
    assert stun.binding_response(b"", addr) is None


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(11), "short"),
        (b"\x80\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), "top bits"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x43" + bytes(12), "cookie"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12), "length mismatch"),
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + bytes(12) + b"\x00\x00", "length not /4"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x80\x22\x00\x08", "attr overrun"),
        (b"\x00\x01\x00\x0c\x21\x12\xa4\x42" + bytes(12) + b"\x00\x20\x00\x08\x00\x03\x00\x01\x00\x00\x00\x00", "family"),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x20\x00\x04\x00\x01\x00\x01", "short address"),
        (b"\x01\x11\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x09\x00\x04\x00\x00\x07\x00", "error class 7"),
    ],
)
def test_malformed_rejected(raw, why):
    with pytest.raises(stun.StunError):
        stun.parse(raw)


def test_attribute_count_and_size_bounded():
    many = stun.encode(stun.BINDING_REQUEST, TID, [(0x8055, b"")] * (stun.MAX_ATTRIBUTES + 1), fingerprint=False)
    with pytest.raises(stun.StunError, match="attributes"):
        stun.parse(many)
    huge = struct.pack("!HHI12s", 1, 1500, stun.MAGIC_COOKIE, TID) + bytes(1500)
    with pytest.raises(stun.StunError, match="longer"):
        stun.parse(huge)


def test_fingerprint_must_be_last():
    raw = bytearray(stun.binding_request(TID))
    extra = struct.pack("!HH", stun.SOFTWARE, 4) + b"abcd"
    raw += extra
    raw[2:4] = (len(raw) - 20).to_bytes(2, "big")
    with pytest.raises(stun.StunError):
        stun.parse(bytes(raw))


def test_fingerprint_value_is_crc32_xor_stun():
    raw = stun.binding_request(TID)
    assert int.from_bytes(raw[-4:], "big") == zlib.crc32(raw[:-8]) ^ 0x5354554E


def test_demultiplexing():
    wg_init = b"\x01\x00\x00\x00" + stun.MAGIC_COOKIE.to_bytes(4, "big") + bytes(140)  # cookie-like sender index
    wg_keepalive = b"\x04\x00\x00\x00" + bytes(28)
    assert classify_datagram(wg_init) == WIREGUARD and not stun.is_stun(wg_init)
    assert classify_datagram(wg_keepalive) == WIREGUARD and not stun.is_stun(wg_keepalive)
    assert classify_datagram(SAMPLE_IPV4_RESPONSE) == STUN
    assert classify_datagram(b"OVD\x01" + bytes(100)) == DISCO
    assert classify_datagram(b"hello") == OTHER and classify_datagram(b"") == OTHER


def test_demultiplexing_sorts_everything_the_node_socket_carries():
    """The node's socket demux is ``classify_datagram`` too: WireGuard's plaintext transport (type
    5), relay frames, and the router's port-mapping answers (only from the router's PCP port)."""
    from overlay.nat import PORTMAP, RELAY
    from overlay.relay import frames

    plain = b"\x05\x00\x00\x00" + bytes(28)
    assert classify_datagram(plain) == WIREGUARD and classify_datagram(b"\x06\x00\x00\x00" + bytes(28)) == OTHER
    assert classify_datagram(frames.data(bytes(32), b"\x04wg")) == RELAY
    assert classify_datagram(memoryview(b"OVD\x01" + bytes(100))) == DISCO
    natpmp_answer = b"\x00\x80\x00\x00" + bytes(8)
    assert classify_datagram(natpmp_answer, ("192.168.1.1", 5351), "192.168.1.1") == PORTMAP
    assert classify_datagram(natpmp_answer, ("192.168.1.1", 5351), None) == OTHER
    assert classify_datagram(natpmp_answer, ("192.168.1.9", 5351), "192.168.1.1") == OTHER
    assert classify_datagram(SAMPLE_IPV4_RESPONSE, ("192.168.1.1", 3478), "192.168.1.1") == STUN


# ------------------------------------------------------------------ client transaction


def _respond_to(tx_out, addr=("198.51.100.4", 40001)):
    (req, server), = tx_out
    return stun.binding_response(req, addr), server


def test_transaction_success_and_rtt():
    tx = stun.StunTransaction(("203.0.113.1", 3478), 10.0)
    out = tx.datagrams_to_send(10.0)
    resp, server = _respond_to(out)
    assert not tx.receive(resp, ("203.0.113.9", 3478), 10.05)  # wrong source: not ours
    assert not tx.receive(stun.binding_success(stun.new_transaction_id(), ("1.1.1.1", 1)), server, 10.05)
    assert tx.receive(resp, server, 10.05)
    assert tx.done and tx.result == ("198.51.100.4", 40001)
    assert tx.rtt == pytest.approx(0.05)
    assert tx.get_timer() is None and tx.datagrams_to_send(11) == []


def test_transaction_rfc_retransmission_schedule():
    """RFC 8489 §6.2.1 example: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; fails at 39.5 s."""
    tx = stun.StunTransaction(("203.0.113.1", 3478), 0.0)
    sends = []
    now = 0.0
    while not tx.done:
        if tx.datagrams_to_send(now):
            sends.append(now)
        now = tx.get_timer()
        assert now is not None and now < 100
        tx.handle_timer(now)
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert now == 39.5 and tx.error == "timeout" and tx.result is None


def test_transaction_no_rtt_sample_after_retransmit_and_errors():
    tx = stun.StunTransaction(("203.0.113.1", 3478), 0.0, rto=0.1, rc=3, rm=2)
    first = tx.datagrams_to_send(0.0)
    tx.handle_timer(0.1)
    assert tx.datagrams_to_send(0.1) == first  # the same request, retransmitted
    resp, server = _respond_to(first)
    assert tx.receive(resp, server, 0.15) and tx.rtt is None and tx.result is not None

    tx = stun.StunTransaction(("203.0.113.1", 3478), 0.0)
    err = stun.binding_error(tx.transaction_id, 420, "Unknown Attribute", unknown=[0x24])
    assert tx.receive(err, ("203.0.113.1", 3478), 0.1)
    assert tx.done and tx.result is None and tx.error == "error 420 Unknown Attribute"

    tx = stun.StunTransaction(("203.0.113.1", 3478), 0.0)
    bad = stun.encode(stun.BINDING_SUCCESS, tx.transaction_id, [(0x0042, b"")])  # unknown required, no address
    assert tx.receive(bad, ("203.0.113.1", 3478), 0.1) and tx.error is not None


def test_transaction_parameters_bounded():
    with pytest.raises(ValueError):
        stun.StunTransaction(("203.0.113.1", 3478), 0.0, rc=1000)


# ------------------------------------------------------------------ fuzz


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parse_random_bytes(data):
    try:
        stun.parse(data)
    except stun.StunError:
        pass
    stun.binding_response(data, ("192.0.2.1", 1))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=8),
    st.integers(0, 0x3FFF),
    st.data(),
)
def test_fuzz_structured_mutations(attrs, msg_type, data):
    """Well-framed messages with random attributes, then a random byte flipped: never a crash."""
    try:
        raw = stun.encode(msg_type, TID, attrs, fingerprint=data.draw(st.booleans()))
    except ValueError:
        return
    try:
        m = stun.parse(raw)
        assert m.transaction_id == TID
    except stun.StunError:
        pass  # e.g. a random value in an address attribute
    if len(raw) > 20:
        pos = data.draw(st.integers(0, len(raw) - 1))
        mutated = bytearray(raw)
        mutated[pos] ^= data.draw(st.integers(1, 255))
        try:
            stun.parse(bytes(mutated))
        except stun.StunError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(), st.integers(1, 65535), st.binary(min_size=12, max_size=12))
def test_fuzz_xor_address_round_trip(ip, port, tid):
    addr = (str(ip), port)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return
    m = stun.parse(stun.binding_success(tid, addr))
    assert m.xor_mapped_address == addr

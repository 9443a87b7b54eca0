"""TURN client core (overlay/nat/turn.py): RFC 5769 vectors, the allocation's life, hostile input."""

from __future__ import annotations

import os
import random
import struct

import pytest

from overlay.nat import stun, turn
from overlay.nat.turn import (ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND, TurnClient,
                              TurnConfig, build, integrity_ok, long_term_key, stun_type)

SERVER = ("198.51.100.5", 3478)
PEER = ("198.51.100.5", 50001)
RELAYED = ("198.51.100.5", 50000)
REALM, NONCE = b"overlay.test", b"nonce-1"
USER, PASSWORD = "1700000000:node", "secret-password"
KEY = long_term_key(USER, REALM.decode(), PASSWORD)

# RFC 5769 §2.1, §2.2 and §2.4 (Appendix A), as printed there.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff"
    "80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249"
    "c1b571a280280004e57a3bcf")
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96")
RFC5769_SHORT_TERM = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_LONG_TERM = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b9000000150"
    "01c662f2f3439396b39353464364f4c33346f4c39465354767936347341001400" "0b6578616d706c652e6f72670000"
    "080014f67024656dd64a3e02b8e0712e85c9a28ca89666")
RFC5769_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"


def test_rfc5769_short_term_integrity_and_fingerprint():
    assert integrity_ok(RFC5769_REQUEST, RFC5769_SHORT_TERM)
    assert not integrity_ok(RFC5769_REQUEST, b"wrong")
    msg = stun.parse(RFC5769_REQUEST)                 # FINGERPRINT checked by the codec
    assert msg.has_fingerprint and msg.get(stun.USERNAME) == b"evtj:h6vY"
    resp = stun.parse(RFC5769_RESPONSE_V4)
    assert resp.xor_mapped_address == ("192.0.2.1", 32853)
    assert integrity_ok(RFC5769_RESPONSE_V4, RFC5769_SHORT_TERM)


def test_rfc5769_long_term_key_integrity_and_encoding():
    key = long_term_key(RFC5769_USERNAME, "example.org", "TheMatrIX")
    assert integrity_ok(RFC5769_LONG_TERM, key)
    assert not integrity_ok(RFC5769_LONG_TERM, long_term_key(RFC5769_USERNAME, "example.org", "x"))
    # our encoder writes the same bytes (the vector pads with zeros, has no FINGERPRINT)
    tid = RFC5769_LONG_TERM[8:20]
    built = build(stun.BINDING_REQUEST, tid, [(stun.USERNAME, RFC5769_USERNAME.encode()),
                                               (stun.NONCE, b"f//499k954d6OL34oL9FSTvy64sA"),
                                               (stun.REALM, b"example.org")], key, fingerprint=False)
    assert built == RFC5769_LONG_TERM


def test_message_types():
    assert stun_type(ALLOCATE, stun.REQUEST) == 0x0003
    assert stun_type(ALLOCATE, stun.SUCCESS) == 0x0103
    assert stun_type(ALLOCATE, stun.ERROR) == 0x0113
    assert stun_type(REFRESH, stun.REQUEST) == 0x0004
    assert stun_type(CREATE_PERMISSION, stun.REQUEST) == 0x0008
    assert stun_type(CHANNEL_BIND, stun.REQUEST) == 0x0009
    assert stun_type(SEND, stun.INDICATION) == 0x0016
    assert stun_type(DATA, stun.INDICATION) == 0x0017


# ---------------------------------------------------------------------- a scripted server


def answer(req: bytes, cls: int, attrs: list[tuple[int, bytes]], key: bytes | None = KEY) -> bytes:
    msg = stun.parse(req)
    return build(stun_type(msg.method, cls), msg.transaction_id, attrs, key)


def error(req: bytes, code: int, reason: str, *, realm: bytes | None = None, nonce: bytes | None = None) -> bytes:
    attrs = [(stun.ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode())]
    if realm is not None:
        attrs.append((stun.REALM, realm))
    if nonce is not None:
        attrs.append((stun.NONCE, nonce))
    return answer(req, stun.ERROR, attrs, key=None)


def one(c: TurnClient, now: float) -> bytes:
    out = c.datagrams_to_send(now)
    assert len(out) == 1, out
    return out[0]


def by_method(out: list[bytes]) -> dict[int, bytes]:
    return {stun.parse(d).method: d for d in out}


def allocated(now: float = 0.0, config: TurnConfig | None = None) -> TurnClient:
    c = TurnClient(SERVER, USER, PASSWORD, config=config)
    c.start(now)
    first = one(c, now)
    msg = stun.parse(first)
    assert msg.method == ALLOCATE and msg.get(stun.MESSAGE_INTEGRITY) is None
    assert msg.get(turn.REQUESTED_TRANSPORT) == bytes([17, 0, 0, 0])
    c.receive(error(first, 401, "Unauthorized", realm=REALM, nonce=NONCE), now)
    second = one(c, now)
    msg = stun.parse(second)
    assert msg.method == ALLOCATE and msg.get(stun.USERNAME) == USER.encode()
    assert msg.get(stun.REALM) == REALM and msg.get(stun.NONCE) == NONCE
    assert integrity_ok(second, KEY)
    tid = msg.transaction_id
    c.receive(answer(second, stun.SUCCESS, [(turn.XOR_RELAYED_ADDRESS, stun.encode_address(RELAYED, tid)),
                                            (stun.XOR_MAPPED_ADDRESS, stun.encode_address(("203.0.113.9", 4000), tid)),
                                            (turn.LIFETIME, struct.pack("!I", 600))]), now)
    assert c.state == turn.ALLOCATED and c.relayed == RELAYED and c.mapped == ("203.0.113.9", 4000)
    return c


QUIET = TurnConfig(keepalive_interval=1e6)   # no keepalives in the way of a test's exact datagram counts


def bound(now: float = 0.0, config: TurnConfig | None = QUIET) -> TurnClient:
    c = allocated(now, config)
    assert c.permit(PEER, now)
    reqs = by_method(c.datagrams_to_send(now))
    assert set(reqs) == {CREATE_PERMISSION, CHANNEL_BIND}
    for req in reqs.values():
        msg = stun.parse(req)
        assert stun.decode_address(msg.get(turn.XOR_PEER_ADDRESS), msg.transaction_id) == PEER
        assert integrity_ok(req, KEY)
    assert stun.parse(reqs[CHANNEL_BIND]).get(turn.CHANNEL_NUMBER) == b"\x40\x00\x00\x00"
    c.receive(answer(reqs[CREATE_PERMISSION], stun.SUCCESS, []), now)
    assert c.ready(PEER) and c.channel_of(PEER) is None
    c.receive(answer(reqs[CHANNEL_BIND], stun.SUCCESS, []), now)
    assert c.channel_of(PEER) == 0x4000
    return c


def test_allocate_permit_bind_and_data_both_ways():
    c = bound()
    assert c.wrap(PEER, b"wireguard") == b"\x40\x00\x00\x09wireguard"
    got = c.receive(b"\x40\x00\x00\x05hello\x00\x00\x00", 1.0)   # padding tolerated
    assert got is not None and got[0] == PEER and bytes(got[1]) == b"hello"
    assert c.stats.data_in == 1 and c.stats.data_out == 1


def test_send_indication_while_only_permitted_and_data_indication():
    c = allocated()
    c.permit(PEER, 0.0)
    reqs = by_method(c.datagrams_to_send(0.0))
    assert c.wrap(PEER, b"x") is None                # nothing installed yet: the caller uses another path
    c.receive(answer(reqs[CREATE_PERMISSION], stun.SUCCESS, []), 0.0)
    ind = stun.parse(c.wrap(PEER, b"payload"))
    assert ind.msg_type == stun_type(SEND, stun.INDICATION) and ind.get(turn.DATA_ATTR) == b"payload"
    assert stun.decode_address(ind.get(turn.XOR_PEER_ADDRESS), None) == PEER
    tid = os.urandom(12)
    data = build(stun_type(DATA, stun.INDICATION), tid, [(turn.XOR_PEER_ADDRESS, stun.encode_address(PEER, tid)),
                                                         (turn.DATA_ATTR, b"back")])
    assert c.receive(data, 0.0) == (PEER, b"back")
    other = build(stun_type(DATA, stun.INDICATION), tid,
                  [(turn.XOR_PEER_ADDRESS, stun.encode_address(("192.0.2.7", 9), tid)), (turn.DATA_ATTR, b"x")])
    assert c.receive(other, 0.0) is None and c.stats.unknown_peer == 1


def test_stale_nonce_is_retried_with_the_new_nonce_and_bounded():
    c = allocated()
    c.permit(PEER, 0.0)
    req = by_method(c.datagrams_to_send(0.0))[CREATE_PERMISSION]
    for i in range(c.config.max_stale):
        c.receive(error(req, 438, "Stale Nonce", realm=REALM, nonce=b"nonce-%d" % (i + 2)), 0.0)
        req = one(c, 0.0)
        assert stun.parse(req).get(stun.NONCE) == b"nonce-%d" % (i + 2) and integrity_ok(req, KEY)
    c.receive(error(req, 438, "Stale Nonce", realm=REALM, nonce=b"again"), 0.0)
    assert c.datagrams_to_send(0.0) == [] and c.stats.stale_nonce == c.config.max_stale
    assert c.state == turn.ALLOCATED and not c.peers[PEER].permitted   # the peer is retried later
    assert c.peers[PEER].perm_at == c.config.retry_after


def test_success_without_integrity_is_ignored():
    c = TurnClient(SERVER, USER, PASSWORD)
    c.start(0.0)
    first = one(c, 0.0)
    c.receive(error(first, 401, "Unauthorized", realm=REALM, nonce=NONCE), 0.0)
    second = one(c, 0.0)
    tid = stun.parse(second).transaction_id
    forged = answer(second, stun.SUCCESS, [(turn.XOR_RELAYED_ADDRESS, stun.encode_address(RELAYED, tid))], key=None)
    c.receive(forged, 0.0)
    wrong = answer(second, stun.SUCCESS, [(turn.XOR_RELAYED_ADDRESS, stun.encode_address(RELAYED, tid))],
                   key=b"x" * 16)
    c.receive(wrong, 0.0)
    assert c.state == turn.ALLOCATING and c.stats.integrity_failed == 2


def test_wrong_credentials_fail_the_allocation():
    c = TurnClient(SERVER, USER, PASSWORD)
    c.start(0.0)
    c.receive(error(one(c, 0.0), 401, "Unauthorized", realm=REALM, nonce=NONCE), 0.0)
    c.receive(error(one(c, 0.0), 401, "Unauthorized", realm=REALM, nonce=NONCE), 0.0)
    assert c.state == turn.FAILED and "401" in c.error and c.get_timer() is None


def test_unanswered_allocate_times_out_after_bounded_retransmissions():
    c = TurnClient(SERVER, USER, PASSWORD, config=TurnConfig(rto=0.5, rc=3, rm=4))
    c.start(0.0)
    sent = len(c.datagrams_to_send(0.0))
    now = 0.0
    while c.state == turn.ALLOCATING and now < 60:
        now = c.get_timer()
        c.handle_timer(now)
        sent += len(c.datagrams_to_send(now))
    assert c.state == turn.FAILED and sent == 3 and c.stats.retransmits == 2 and c.stats.timeouts == 1
    assert now == pytest.approx(0.5 + 1.0 + 4 * 0.5)


def test_refresh_keeps_the_allocation_and_peers_are_refreshed():
    c = bound()
    t = c.get_timer()
    assert t == pytest.approx(c.config.refresh_interval)        # permission / channel refresh first
    c.handle_timer(t)
    reqs = by_method(c.datagrams_to_send(t))
    assert set(reqs) == {CREATE_PERMISSION, CHANNEL_BIND}
    for r in reqs.values():
        c.receive(answer(r, stun.SUCCESS, []), t)
    t = c.get_timer()
    assert t == pytest.approx(480.0)                             # the allocation's refresh at 80 % of 600 s
    c.handle_timer(t)
    out = by_method(c.datagrams_to_send(t))
    req = out[REFRESH]
    assert stun.parse(req).get(turn.LIFETIME) == struct.pack("!I", 600) and integrity_ok(req, KEY)
    c.receive(answer(req, stun.SUCCESS, [(turn.LIFETIME, struct.pack("!I", 300))]), t)
    assert c.expires_at == pytest.approx(t + 300)
    for r in out.values():
        if r is not req:
            c.receive(answer(r, stun.SUCCESS, []), t)
    assert c.state == turn.ALLOCATED and c.channel_of(PEER) == 0x4000


def test_refused_refresh_fails_the_allocation():
    c = allocated(config=QUIET)
    c.handle_timer(480.0)
    c.receive(error(one(c, 480.0), 437, "Allocation Mismatch"), 480.0)
    assert c.state == turn.FAILED and "437" in c.error and c.wrap(PEER, b"x") is None


def test_keepalive_binding_indications_while_allocated():
    c = bound(config=TurnConfig(keepalive_interval=20.0))
    assert c.get_timer() == pytest.approx(20.0)
    c.handle_timer(20.0)
    out = c.datagrams_to_send(20.0)
    assert [stun.parse(d).msg_type for d in out] == [stun_type(stun.BINDING, stun.INDICATION)]
    assert c.get_timer() == pytest.approx(40.0)


def test_close_deallocates_once():
    c = bound()
    c.close(1.0)
    req = one(c, 1.0)
    msg = stun.parse(req)
    assert msg.method == REFRESH and msg.get(turn.LIFETIME) == b"\x00\x00\x00\x00" and integrity_ok(req, KEY)
    assert c.state == turn.CLOSED and c.get_timer() is None and c.wrap(PEER, b"x") is None


def test_peers_and_channels_are_bounded():
    c = allocated(config=TurnConfig(max_peers=3, max_pending=4))
    assert all(c.permit(("192.0.2.1", 1000 + i), 0.0) for i in range(3))
    assert not c.permit(("192.0.2.1", 2000), 0.0)
    assert len(c.datagrams_to_send(0.0)) == 4               # in-flight requests capped; the rest wait
    assert c.stats.extra["dropped_requests"] == 2
    c.forget(("192.0.2.1", 1000))
    assert c.permit(("192.0.2.1", 2000), 0.0)


def test_hostile_datagrams_are_counted_never_raised():
    c = bound()
    rng = random.Random(7)
    before = c.stats.as_dict()
    # truncated ChannelData, an unknown channel, a response to nothing, junk, a request from the server
    assert c.receive(b"\x40\x00\x00\x10abc", 0.0) is None
    assert c.receive(b"\x40\x05\x00\x01x", 0.0) is None
    assert c.receive(build(stun_type(ALLOCATE, stun.SUCCESS), os.urandom(12), []), 0.0) is None
    assert c.receive(b"\x00\x01\x00\x00" + b"\x00" * 16, 0.0) is None
    assert c.receive(build(stun_type(ALLOCATE, stun.REQUEST), os.urandom(12), []), 0.0) is None
    for _ in range(2000):
        n = rng.randrange(0, 80)
        data = bytes(rng.randrange(256) for _ in range(n))
        if rng.random() < 0.5 and n >= 20:     # a STUN-looking header with random attributes
            data = struct.pack("!HHI", rng.choice([0x0103, 0x0113, 0x0017, 0x0108]), n - 20,
                               stun.MAGIC_COOKIE) + data[8:]
        c.receive(data, 0.0)
    after = c.stats.as_dict()
    assert after["malformed"] > before["malformed"] and after["unexpected"] > before["unexpected"]
    assert after["unknown_peer"] > before["unknown_peer"]
    assert c.state == turn.ALLOCATED and c.channel_of(PEER) == 0x4000

"""The sans-I/O SOCKS5 server side (RFC 1928 / RFC 1929), driven byte by byte, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.proxy import socks5
from overlay.proxy.socks5 import Rejected, Request, ServerConnection, State

USERS = {"alice": "s3cret"}


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def auth(user: bytes, password: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def request(cmd: int, host: str, port: int) -> bytes:
    return bytes([5, cmd, 0]) + socks5.encode_address(host, port)


def feed(conn: ServerConnection, data: bytes) -> tuple[list, bytes]:
    events = conn.receive_data(data)
    return events, conn.data_to_send()


def test_no_auth_connect_by_domain_name():
    conn = ServerConnection()
    events, out = feed(conn, greeting(0x00))
    assert (events, out) == ([], b"\x05\x00")
    events, out = feed(conn, request(socks5.CMD_CONNECT, "peer-name", 8000))
    assert events == [Request(socks5.CMD_CONNECT, "peer-name", 8000)] and out == b""
    assert conn.state is State.WAIT_REPLY
    conn.reply(socks5.REP_SUCCEEDED, "10.7.0.2", 1234)
    assert conn.data_to_send() == b"\x05\x00\x00\x01\x0a\x07\x00\x02\x04\xd2"
    assert conn.state is State.ESTABLISHED


def test_byte_at_a_time_and_pipelined_data_are_kept():
    conn = ServerConnection()
    stream = greeting(0x02, 0x00) + request(socks5.CMD_CONNECT, "10.7.0.9", 22) + b"SSH-2.0-early"
    events = []
    for i in range(len(stream) - len(b"SSH-2.0-early")):
        events += conn.receive_data(stream[i : i + 1])
    events += conn.receive_data(b"SSH-2.0-early")
    assert events == [Request(socks5.CMD_CONNECT, "10.7.0.9", 22)]
    assert conn.data_to_send() == b"\x05\x00"
    conn.reply(socks5.REP_SUCCEEDED)
    assert conn.trailing_data() == b"SSH-2.0-early"


def test_udp_associate_with_unknown_client_address():
    conn = ServerConnection()
    events, _ = feed(conn, greeting(0) + request(socks5.CMD_UDP_ASSOCIATE, "0.0.0.0", 0))
    assert events == [Request(socks5.CMD_UDP_ASSOCIATE, "0.0.0.0", 0)]


def test_userpass_success():
    conn = ServerConnection(USERS)
    _, out = feed(conn, greeting(0x00, 0x02))
    assert out == b"\x05\x02"
    events, out = feed(conn, auth(b"alice", b"s3cret"))
    assert events == [] and out == b"\x01\x00"
    events, _ = feed(conn, request(socks5.CMD_CONNECT, "peer", 80))
    assert events == [Request(socks5.CMD_CONNECT, "peer", 80)]


@pytest.mark.parametrize("user,password", [(b"alice", b"wrong"), (b"mallory", b"s3cret"), (b"", b""), (b"alice", b"")])
def test_userpass_failure_answers_failure_and_rejects(user, password):
    conn = ServerConnection(USERS)
    feed(conn, greeting(0x02))
    events, out = feed(conn, auth(user, password) + request(socks5.CMD_CONNECT, "peer", 80))
    assert out == b"\x01\x01"
    assert len(events) == 1 and isinstance(events[0], Rejected) and "authentication failed" in events[0].message
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"more") == [] and conn.data_to_send() == b""


def test_auth_required_but_not_offered():
    conn = ServerConnection(USERS)
    events, out = feed(conn, greeting(0x00))
    assert out == b"\x05\xff" and isinstance(events[0], Rejected)


def test_userpass_offered_but_not_configured():
    conn = ServerConnection()
    events, out = feed(conn, greeting(0x02))
    assert out == b"\x05\xff" and isinstance(events[0], Rejected)


def test_no_methods_offered():
    events, out = feed(ServerConnection(), b"\x05\x00")
    assert out == b"\x05\xff" and isinstance(events[0], Rejected)


def test_socks4_client_is_closed_without_reply():
    events, out = feed(ServerConnection(), b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
    assert out == b"" and isinstance(events[0], Rejected) and "0x04" in events[0].message


def test_bad_auth_version():
    conn = ServerConnection(USERS)
    feed(conn, greeting(0x02))
    events, out = feed(conn, b"\x05\x05alice\x06s3cret")
    assert out == b"\x01\x01" and isinstance(events[0], Rejected)


def _reply_code(out: bytes) -> int:
    assert out[0] == 5 and out[2] == 0
    return out[1]


@pytest.mark.parametrize(
    "req,code",
    [
        (request(socks5.CMD_BIND, "peer", 80), socks5.REP_COMMAND_NOT_SUPPORTED),
        (request(0x09, "peer", 80), socks5.REP_COMMAND_NOT_SUPPORTED),
        (request(socks5.CMD_CONNECT, "fd00::1", 80), socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x07", socks5.REP_ADDRESS_TYPE_NOT_SUPPORTED),  # unknown ATYP: answered at once
        (b"\x05\x01\x00\x03\x00\x00\x50", socks5.REP_HOST_UNREACHABLE),  # empty domain name
        (b"\x05\x01\x00\x03\x03a b\x00\x50", socks5.REP_HOST_UNREACHABLE),  # space in name
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", socks5.REP_HOST_UNREACHABLE),  # not UTF-8
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", socks5.REP_GENERAL_FAILURE),  # bad version
    ],
)
def test_request_errors_get_the_rfc_reply(req, code):
    conn = ServerConnection()
    feed(conn, greeting(0))
    events, out = feed(conn, req)
    assert _reply_code(out) == code
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert conn.state is State.CLOSED


def test_error_reply_closes_and_reply_needs_a_request():
    conn = ServerConnection()
    with pytest.raises(RuntimeError):
        conn.reply(socks5.REP_SUCCEEDED)
    feed(conn, greeting(0) + request(socks5.CMD_CONNECT, "peer", 1))
    conn.reply(socks5.REP_CONNECTION_REFUSED)
    assert _reply_code(conn.data_to_send()) == socks5.REP_CONNECTION_REFUSED
    assert conn.state is State.CLOSED


def test_pending_data_is_bounded():
    conn = ServerConnection()
    feed(conn, greeting(0) + request(socks5.CMD_CONNECT, "peer", 1))
    events = conn.receive_data(b"x" * (socks5.MAX_PENDING + 1))
    assert isinstance(events[0], Rejected) and conn.state is State.CLOSED


def test_reply_encodes_ipv6_and_domain_bind_addresses():
    assert socks5.build_reply(0, "::1", 1) == b"\x05\x00\x00\x04" + b"\0" * 15 + b"\x01\x00\x01"
    assert socks5.build_reply(0, "relay", 2) == b"\x05\x00\x00\x03\x05relay\x00\x02"
    with pytest.raises(ValueError):
        socks5.encode_address("x" * 256, 1)


# -- UDP datagram header --------------------------------------------------------------------


def test_udp_header_round_trip():
    for host in ("10.7.0.3", "peer-name"):
        d = socks5.parse_udp_datagram(socks5.build_udp_header(host, 5353) + b"payload")
        assert (d.host, d.port, d.payload) == (host, 5353, b"payload")


@pytest.mark.parametrize(
    "data,why",
    [
        (b"\0\0\x01" + socks5.encode_address("10.0.0.1", 1) + b"x", "fragmented"),
        (b"\0\0\0", "shorter"),
        (b"\0\0\0\x01\x0a\0", "shorter"),
        (b"\0\0\0\x03\x09peer", "shorter"),
        (b"\0\0\0" + socks5.encode_address("fd00::1", 1), "IPv6"),
        (b"\0\0\0\x09abc", "address type"),
    ],
)
def test_udp_header_rejects(data, why):
    with pytest.raises(socks5.Socks5Error, match=why):
        socks5.parse_udp_datagram(data)


# -- fuzzing: whatever the client sends, the parser answers or rejects, never raises ---------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _drive(users, data: bytes, cuts: list[int]) -> None:
    conn = ServerConnection(users)
    pieces, last = [], 0
    for c in sorted(set(min(c, len(data)) for c in cuts)):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    events, out = [], b""
    for piece in pieces:
        events += conn.receive_data(piece)
        out += conn.data_to_send()
    assert all(isinstance(e, (Request, Rejected)) for e in events)
    assert len(events) <= 1, events  # one request or one rejection per connection
    assert len(out) <= 2 + 2 + 262  # method choice + auth status + the longest reply
    if events and isinstance(events[0], Rejected):
        assert conn.state is State.CLOSED
    if events and isinstance(events[0], Request):
        assert conn.state is State.WAIT_REPLY
        req = events[0]
        assert 0 <= req.port <= 65535 and req.host and req.command in (1, 3)
        conn.reply(socks5.REP_SUCCEEDED, "10.7.0.1", 1)
        assert _reply_code(conn.data_to_send()) == 0


@FUZZ
@given(
    users=st.sampled_from([None, USERS]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
)
def test_fuzz_random_input(users, data, cuts):
    _drive(users, data, cuts)


def _valid_stream(draw) -> tuple[dict | None, bytes]:
    users = draw(st.sampled_from([None, USERS]))
    host = draw(
        st.one_of(
            st.ip_addresses(v=4).map(str),
            st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{1,10})?", fullmatch=True),
        )
    )
    data = greeting(0x00, 0x02) if draw(st.booleans()) else greeting(0x02 if users else 0x00)
    if users:
        data += auth(b"alice", b"s3cret")
    data += request(draw(st.sampled_from([1, 3])), host, draw(st.integers(0, 65535)))
    return users, data


@st.composite
def mutated_streams(draw):
    users, data = _valid_stream(draw)
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "byte"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and buf:
            buf[pos] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del buf[pos:]
    return users, bytes(buf)


@FUZZ
@given(stream=mutated_streams(), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_fuzz_mutated_valid_input(stream, cuts):
    users, data = stream
    _drive(users, data, cuts)


@st.composite
def valid_streams(draw):
    return _valid_stream(draw)


@FUZZ
@given(stream=valid_streams(), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_valid_input_in_any_chunking_yields_the_request(stream, cuts):
    users, data = stream
    conn = ServerConnection(users)
    events = []
    last = 0
    for c in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        events += conn.receive_data(data[last:c])
        last = c
    assert len(events) == 1 and isinstance(events[0], Request)
    # the request the client encoded is the one parsed
    assert data.endswith(request(events[0].command, events[0].host, events[0].port))


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_udp_header(data):
    try:
        d = socks5.parse_udp_datagram(data)
    except socks5.Socks5Error:
        return
    assert data.endswith(d.payload) and 0 <= d.port <= 65535

"""The sans-I/O HTTP proxy pieces: request heads, rewriting, auth, body framing; fuzzed."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.proxy import http
from overlay.proxy.http import BodyFramer, HeadBuffer, HttpProxyError


def parse(text: str) -> http.ProxyRequest:
    return http.parse_request(text.encode("latin-1"))


def status_of(fn, *args) -> int:
    with pytest.raises(HttpProxyError) as e:
        fn(*args)
    return e.value.status


def test_absolute_form_is_rewritten_to_origin_form():
    req = parse(
        "GET http://peer-name:8000/a/b?q=1#frag HTTP/1.1\r\nHost: wrong\r\nUser-Agent: t\r\n"
        "Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        "Keep-Alive: 5\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers\r\nUpgrade: h2c\r\nAccept: */*"
    )
    assert (req.method, req.host, req.port, req.target, req.version) == ("GET", "peer-name", 8000, "/a/b?q=1", "HTTP/1.1")
    head = http.upstream_request_head(req).decode()
    assert head == (
        "GET /a/b?q=1 HTTP/1.1\r\nHost: peer-name:8000\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


def test_default_port_query_only_and_http10():
    req = parse("GET http://Peer?x HTTP/1.0")
    assert (req.host, req.port, req.target) == ("Peer", 80, "/?x")
    assert http.upstream_request_head(req).startswith(b"GET /?x HTTP/1.0\r\nHost: Peer\r\n")


def test_framing_headers_survive_a_hostile_connection_header():
    req = parse("POST http://p/ HTTP/1.1\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 3")
    assert b"Content-Length: 3" in http.upstream_request_head(req)


def test_connect():
    req = parse("CONNECT peer-name:443 HTTP/1.1\r\nHost: peer-name:443")
    assert req.is_connect and (req.host, req.port) == ("peer-name", 443)
    assert parse("CONNECT [fd00::1]:22 HTTP/1.1").host == "fd00::1"


@pytest.mark.parametrize(
    "head,status",
    [
        ("GET / HTTP/1.1\r\nHost: x", 400),  # origin-form: not a proxy request
        ("GET https://peer/ HTTP/1.1", 400),
        ("GET http://user:pw@peer/ HTTP/1.1", 400),
        ("GET http:///x HTTP/1.1", 400),
        ("GET http://peer:99999/ HTTP/1.1", 400),
        ("GET http://peer:/ HTTP/1.1", 400),
        ("CONNECT peer HTTP/1.1", 400),
        ("CONNECT peer:0 HTTP/1.1", 400),
        ("CONNECT [::1 HTTP/1.1", 400),
        ("GET  http://peer/ HTTP/1.1", 400),
        ("G(T http://peer/ HTTP/1.1", 400),
        ("GET http://peer/ HTTP/2.0", 505),
        ("GET http://peer/ FTP/1.0", 400),
        ("GET http://peer/ HTTP/1.1\r\nBad Header: x", 400),
        ("GET http://peer/ HTTP/1.1\r\nNoColon", 400),
        ("GET http://peer/ HTTP/1.1\r\nA: b\r\n folded", 400),
        ("GET http://peer/ HTTP/1.1\r\nA: b\nC: d", 400),
        ("GET http://peer/ HTTP/1.1\r\nA: b\0", 400),
        ("GET http://peer/ HTTP/1.1\r\n" + "A: b\r\n" * 101, 431),
    ],
)
def test_malformed_requests(head, status):
    assert status_of(parse, head) == status


def test_head_buffer_bounds_and_rest():
    hb = HeadBuffer()
    assert hb.feed(b"GET http://p/ HTTP/1.1\r\nA: b\r") is None
    assert hb.feed(b"\n\r") is None
    assert hb.feed(b"\nBODY") == b"GET http://p/ HTTP/1.1\r\nA: b"
    assert hb.rest() == b"BODY"
    big = HeadBuffer()
    big.feed(b"GET http://p/ HTTP/1.1\r\n")
    assert status_of(big.feed, b"X: " + b"a" * http.MAX_HEAD) == 431
    two = HeadBuffer(status=502)
    assert two.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nbody") == b"HTTP/1.1 100 Continue"
    assert two.feed(b"") == b"HTTP/1.1 200 OK" and two.rest() == b"body"


def _with_auth(value: str) -> http.ProxyRequest:
    return parse(f"GET http://p/ HTTP/1.1\r\nProxy-Authorization: {value}")


def test_proxy_auth():
    users = {"alice": "pa:ss"}
    good = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    http.check_proxy_auth(_with_auth(good), users)
    http.check_proxy_auth(parse("GET http://p/ HTTP/1.1"), None)
    for value in ("Basic " + base64.b64encode(b"alice:nope").decode(), "Basic !!!", "Bearer x", "Basic \xd9WxpY2U6cw==",
                  "Basic " + base64.b64encode(b"nobody").decode()):
        with pytest.raises(HttpProxyError) as e:
            http.check_proxy_auth(_with_auth(value), users)
        assert e.value.status == 407 and ("Proxy-Authenticate", 'Basic realm="overlay"') in e.value.headers
    assert status_of(http.check_proxy_auth, parse("GET http://p/ HTTP/1.1"), users) == 407


def test_error_response_is_one_line_and_complete():
    raw = http.error_response(502, "laptop does not share port 3389\r\nInjected: yes", (("X-A", "b"),))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"X-A: b" in head and b"Injected" not in head
    assert body == b"laptop does not share port 3389 Injected: yes\n"
    assert f"Content-Length: {len(body)}".encode() in head


def test_response_rewrite():
    resp = http.parse_response(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: t=5\r\nContent-Length: 2")
    assert http.downstream_response_head(resp) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    assert http.downstream_response_head(http.parse_response(b"HTTP/1.1 100 Continue")) == b"HTTP/1.1 100 Continue\r\n\r\n"
    for bad in (b"HTTP/1.1 2000 OK", b"ICY 200 OK", b"HTTP/1.1 OK", b"HTTP/1.1 200 OK\r\nBad Header: x"):
        assert status_of(http.parse_response, bad) == 502


# -- body framing ----------------------------------------------------------------------------


def framer_for(headers: str, method: str = "POST") -> BodyFramer:
    return BodyFramer.for_request(parse(f"{method} http://p/ HTTP/1.1\r\n{headers}".rstrip("\r\n")))


def test_content_length_body_stops_at_its_end():
    f = framer_for("Content-Length: 5")
    assert f.feed(b"abc") == 3 and not f.done
    assert f.feed(b"deGET http://p/ HTTP/1.1") == 2 and f.done
    assert f.feed(b"more") == 0


def test_no_body_without_framing_headers():
    assert framer_for("").done


def test_chunked_body_in_any_split():
    body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
    for step in (1, 2, 3, 7, len(body)):
        f = framer_for("Transfer-Encoding: chunked")
        taken = 0
        for i in range(0, len(body) + 5, step):
            taken += f.feed((body + b"NEXT")[i : i + step])
            if f.done:
                break
        assert f.done and taken == len(body)


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 3\r\nTransfer-Encoding: chunked",
        "Content-Length: 3\r\nContent-Length: 4",
        "Content-Length: -1",
        "Content-Length: 0x10",
        "Transfer-Encoding: gzip",
    ],
)
def test_ambiguous_request_framing_is_refused(headers):
    assert status_of(framer_for, headers) == 400


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"4\r\nWikiXX\r\n", b"4\nWiki\r\n", b"1" * (http.MAX_LINE + 2), b"0\r\n" + b"T: x\r\n" * 101],
)
def test_malformed_chunked_framing(body):
    f = framer_for("Transfer-Encoding: chunked")
    with pytest.raises(HttpProxyError):
        f.feed(body)


def test_response_framing():
    def resp(text: str) -> http.Response:
        return http.parse_response(text.encode())

    assert BodyFramer.for_response(resp("HTTP/1.1 200 OK\r\nContent-Length: 9"), "HEAD").done
    assert BodyFramer.for_response(resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 9"), "GET").done
    assert BodyFramer.for_response(resp("HTTP/1.1 204 No Content"), "GET").done
    f = BodyFramer.for_response(resp("HTTP/1.1 200 OK"), "GET")
    assert f.until_close and f.feed(b"x" * 100) == 100 and not f.done
    assert BodyFramer.for_response(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip"), "GET").until_close
    assert BodyFramer.for_response(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"), "GET").chunked


# -- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = [
    b"GET http://peer-name:8000/path?q HTTP/1.1\r\nHost: peer-name:8000\r\nAccept: */*\r\nProxy-Connection: keep-alive",
    b"CONNECT peer-name:443 HTTP/1.1\r\nHost: peer-name:443\r\nProxy-Authorization: Basic YWxpY2U6cw==",
    b"POST http://10.7.0.2/x HTTP/1.0\r\nContent-Length: 4\r\nConnection: close, X-A\r\nX-A: 1",
    b"PUT http://peer/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue",
]


def _check_request_head(head: bytes) -> None:
    try:
        req = http.parse_request(head)
        http.check_proxy_auth(req, {"alice": "s"})
    except HttpProxyError as e:
        assert e.status in (400, 407, 431, 505) and e.message
        http.error_response(e.status, e.message, e.headers)
        return
    assert 0 < req.port < 65536 and req.host
    if not req.is_connect:
        assert req.target.startswith("/")
        out = http.upstream_request_head(req)
        assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
        try:
            BodyFramer.for_request(req)
        except HttpProxyError as e:
            assert e.status == 400


@st.composite
def mutated_heads(draw):
    buf = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "special"]))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 6))]
        else:
            buf[pos:pos] = draw(st.sampled_from([b"\r\n", b":", b" ", b"[", b"]", b"@", b"\0", b"\n", b"%", b"\xff"]))
    return bytes(buf)


@FUZZ
@given(head=st.binary(max_size=400))
def test_fuzz_random_request_heads(head):
    _check_request_head(head)


@FUZZ
@given(head=mutated_heads())
def test_fuzz_mutated_request_heads(head):
    _check_request_head(head)


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_fuzz_head_buffer_and_chunked_framer(data, cuts):
    hb = HeadBuffer(limit=512)
    f = framer_for("Transfer-Encoding: chunked")
    last = 0
    for c in sorted(set(cuts)) + [len(data)]:
        piece = data[last:c]
        last = max(last, c)
        try:
            head = hb.feed(piece)
        except HttpProxyError as e:
            assert e.status == 431
            break
        if head is not None:
            assert b"\r\n\r\n" not in head and len(head) <= 512
        try:
            n = f.feed(piece)
        except HttpProxyError as e:
            assert e.status == 400
            return
        assert 0 <= n <= len(piece)


@st.composite
def chunked_bodies(draw):
    chunks = draw(st.lists(st.binary(min_size=1, max_size=50), max_size=6))
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return body, draw(st.lists(st.integers(0, len(body)), max_size=6))


@FUZZ
@given(case=chunked_bodies())
def test_valid_chunked_bodies_end_exactly(case):
    body, cuts = case
    f = framer_for("Transfer-Encoding: chunked")
    stream, taken, last = body + b"GET http://p/ HTTP/1.1\r\n\r\n", 0, 0
    for c in sorted(set(cuts)) + [len(stream)]:
        taken += f.feed(stream[last:c])
        last = c
    assert f.done and taken == len(body)

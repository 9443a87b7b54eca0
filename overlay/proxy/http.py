"""Sans-I/O pieces of an HTTP/1.1 forward proxy: request heads, response heads, body framing.

Two kinds of client requests are served:

- ``CONNECT host:port`` opens a tunnel (``curl -p``, browsers for https);
- absolute-form requests (``GET http://peer-name:8000/path HTTP/1.1``) are forwarded as
  origin-form (``GET /path``) with ``Host`` set from the URL, hop-by-hop headers removed and
  ``Connection: close``: one request per upstream connection, and the client connection is
  closed after the response (``Connection: close`` on the response too). That keeps keep-alive
  trivially correct: a client reopens for its next request.

Bodies are relayed unchanged; :class:`BodyFramer` only finds where each body ends (Content-Length
or chunked), so no byte of a second, pipelined request reaches the upstream, and a response that
ignores our ``Connection: close`` still ends the exchange. The client's HTTP version is kept on
the upstream request so an HTTP/1.0 client never receives a chunked body it cannot decode.

Everything is bounded (request head 16 KiB and 100 header fields, chunk-size lines 4 KiB) and
every malformed input raises :class:`HttpProxyError` carrying the status to answer with.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HEAD = 16 * 1024
MAX_RESPONSE_HEAD = 64 * 1024  # upstream responses carry cookies; still bounded
MAX_HEADERS = 100
MAX_LINE = 4096

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# RFC 9110 7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection curl and old browsers
# send. Transfer-Encoding stays: bodies are relayed as they are, chunked framing included.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "upgrade"}
)
# Never removed because a Connection header names them: the message framing depends on them.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class HttpProxyError(Exception):
    """Answer the client with ``status`` and the one-line ``message`` as body."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` response with ``message`` as a one-line text body."""
    body = (" ".join(message.split()) + "\n").encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HeadBuffer:
    """Accumulates bytes until a complete head (ending in CRLF CRLF), bounded by ``limit``."""

    def __init__(self, limit: int = MAX_HEAD, status: int = 431):
        self._buf = bytearray()
        self._scanned = 0  # bytes already searched for the end of head
        self._limit = limit
        self._status = status

    def feed(self, data: bytes) -> bytes | None:
        """Returns the head (without its final blank line) once complete; the rest stays buffered.

        Feeding ``b""`` looks for a further head already buffered (an interim 1xx response is
        often followed at once by the final one).
        """
        self._buf += data
        end = self._buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0 or end + 4 > self._limit:
            if len(self._buf) >= self._limit:
                raise HttpProxyError(self._status, f"message head larger than {self._limit} bytes")
            self._scanned = len(self._buf)
            return None
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        self._scanned = 0
        return head

    def rest(self) -> bytes:
        """Bytes received after the head (start of the body, or of a tunnelled stream)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


def _is_token(s: str) -> bool:
    return bool(s) and all(ord(c) in _TCHAR for c in s)


def _parse_fields(lines: list[str], status: int) -> list[tuple[str, str]]:
    if len(lines) > MAX_HEADERS:
        raise HttpProxyError(431 if status == 400 else status, f"more than {MAX_HEADERS} header fields")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _is_token(name):
            # Also catches obsolete line folding (a line starting with whitespace), RFC 9112 5.2.
            raise HttpProxyError(status, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return headers


def _split_head(head: bytes, status: int) -> list[str]:
    text = head.decode("latin-1")
    if "\0" in text or "\r" in text.replace("\r\n", "") or "\n" in text.replace("\r\n", ""):
        raise HttpProxyError(status, "stray CR, LF or NUL in message head")
    return text.split("\r\n")


def _parse_port(s: str) -> int:
    if not s.isdigit() or not s.isascii() or len(s) > 5 or not 0 < int(s) < 65536:
        raise HttpProxyError(400, f"invalid port {s[:16]!r}")
    return int(s)


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) -> (host, port)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise HttpProxyError(400, f"invalid authority {authority[:80]!r}")
        host, rest = authority[1:close], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise HttpProxyError(400, f"invalid authority {authority[:80]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = authority.rpartition(":")
        if not colon:
            host, port_text = authority, None
        else:
            port_text = port_text_
    if not host or any(c in "@/\\?#[]" or c <= " " or c == "\x7f" for c in host):
        raise HttpProxyError(400, f"invalid host in {authority[:80]!r}")
    if port_text is None:
        if default_port is None:
            raise HttpProxyError(400, f"CONNECT target {authority[:80]!r} lacks a port")
        return host, default_port
    return host, _parse_port(port_text)


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    """All values of header ``name`` (case-insensitive)."""
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


@dataclass(slots=True)
class ProxyRequest:
    """A parsed proxy request head.

    For CONNECT ``target`` is the authority; otherwise it is the origin-form target (``/path?q``)
    to send upstream. ``credentials`` is the (user, password) of a Basic Proxy-Authorization.
    """

    method: str
    host: str
    port: int
    target: str
    version: str
    headers: list[tuple[str, str]]
    credentials: tuple[str, str] | None

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"


def _basic_credentials(headers: list[tuple[str, str]]) -> tuple[str, str] | None:
    values = header(headers, "proxy-authorization")
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def parse_request(head: bytes) -> ProxyRequest:
    """Parse a proxy request head (request line + fields, without the final blank line)."""
    lines = _split_head(head, 400)
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpProxyError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if not _is_token(method):
        raise HttpProxyError(400, f"invalid method {method[:20]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpProxyError(505 if version.startswith("HTTP/") else 400, f"unsupported version {version[:20]!r}")
    headers = _parse_fields(lines[1:], 400)
    if method == "CONNECT":
        host, port = _parse_authority(target, None)
        origin = target
    else:
        scheme, sep, rest = target.partition("://")
        if not sep:
            raise HttpProxyError(400, "not a proxy request: use an absolute http:// URL or CONNECT")
        if scheme.lower() != "http":
            raise HttpProxyError(400, f"cannot forward {scheme[:10]!r} URLs; use CONNECT for https")
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        authority, origin = rest[:cut], rest[cut:].partition("#")[0]
        if "@" in authority:
            raise HttpProxyError(400, "credentials in the URL are not forwarded")
        host, port = _parse_authority(authority, 80)
        if not origin.startswith("/"):
            origin = "/" + origin
    return ProxyRequest(method, host, port, origin, version, headers, _basic_credentials(headers))


def check_proxy_auth(request: ProxyRequest, users: Mapping[str, str] | None) -> None:
    """Raise 407 unless ``users`` is None or the request carries matching Basic credentials."""
    if users is None:
        return
    creds = request.credentials
    expected = users.get(creds[0]) if creds else None
    if creds is None or expected is None or not hmac.compare_digest(creds[1].encode(), expected.encode()):
        raise HttpProxyError(
            407,
            "proxy authentication required" if creds is None else "proxy authentication failed",
            (("Proxy-Authenticate", 'Basic realm="overlay"'),),
        )


def _end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones and those a Connection header lists (framing kept)."""
    listed = {t.strip().lower() for v in header(headers, "connection") for t in v.split(",")}
    drop = HOP_BY_HOP | (listed - _FRAMING)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def upstream_request_head(request: ProxyRequest) -> bytes:
    """The head to send upstream: origin-form target, Host from the URL, Connection: close."""
    host = f"[{request.host}]" if ":" in request.host else request.host
    authority = host if request.port == 80 else f"{host}:{request.port}"
    lines = [f"{request.method} {request.target} {request.version}", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in _end_to_end(request.headers) if k.lower() != "host"]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(slots=True)
class Response:
    """A parsed upstream response head."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]


def parse_response(head: bytes) -> Response:
    """Parse an upstream response head; malformed input raises a 502 :class:`HttpProxyError`."""
    lines = _split_head(head, 502)
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(status_text) != 3 or not status_text.isdigit():
        raise HttpProxyError(502, f"upstream sent a malformed status line {lines[0][:80]!r}")
    return Response(version, int(status_text), reason, _parse_fields(lines[1:], 502))


def downstream_response_head(response: Response) -> bytes:
    """The response head for the client: hop-by-hop fields removed, Connection: close."""
    lines = [f"{response.version} {response.status} {response.reason}"]
    lines += [f"{k}: {v}" for k, v in _end_to_end(response.headers)]
    if response.status >= 200:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BodyFramer:
    """Finds the end of a message body in a byte stream without altering it (RFC 9112 6.3).

    ``feed(data)`` returns how many leading bytes of ``data`` belong to the body; ``done`` turns
    true at its end. A close-delimited body (``until_close``) never completes: it ends at EOF.
    """

    def __init__(self, length: int | None = 0, chunked: bool = False):
        self.chunked = chunked
        self.until_close = length is None and not chunked
        self._remaining = length or 0
        self.done = not chunked and length == 0
        self._line = bytearray()
        self._state = "size"  # chunked: size, data, data-crlf, trailer
        self._trailers = 0

    @staticmethod
    def _length(headers: list[tuple[str, str]], status: int) -> tuple[int | None, bool]:
        """(content length or None, chunked) from the framing headers; smuggling-safe."""
        te = header(headers, "transfer-encoding")
        cl = header(headers, "content-length")
        if te:
            codings = [c.strip().lower() for v in te for c in v.split(",")]
            if cl:
                raise HttpProxyError(status, "both Transfer-Encoding and Content-Length")
            if codings[-1] != "chunked":
                return None, False  # only valid on responses: delimited by close
            return None, True
        if cl:
            values = {v.strip() for v in cl}
            if len(values) != 1 or not (v := values.pop()).isdigit() or not v.isascii() or len(v) > 18:
                raise HttpProxyError(status, "invalid Content-Length")
            return int(v), False
        return None, False

    @classmethod
    def for_request(cls, request: ProxyRequest) -> BodyFramer:
        length, chunked = cls._length(request.headers, 400)
        if length is None and not chunked:
            if header(request.headers, "transfer-encoding"):
                raise HttpProxyError(400, "unsupported Transfer-Encoding on a request")
            length = 0  # a request without framing headers has no body
        return cls(length, chunked)

    @classmethod
    def for_response(cls, response: Response, method: str) -> BodyFramer:
        if method == "HEAD" or response.status < 200 or response.status in (204, 304):
            return cls(0)
        length, chunked = cls._length(response.headers, 502)
        return cls(length, chunked)

    def feed(self, data: bytes) -> int:
        if self.done:
            return 0
        if self.until_close:
            return len(data)
        if not self.chunked:
            take = min(len(data), self._remaining)
            self._remaining -= take
            self.done = self._remaining == 0
            return take
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._state == "data":
                take = min(n - i, self._remaining)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                i = n
                if len(self._line) > MAX_LINE:
                    raise HttpProxyError(400, "chunked framing line too long")
                break
            self._line += data[i:j]
            i = j + 1
            if len(self._line) > MAX_LINE or not self._line.endswith(b"\r"):
                raise HttpProxyError(400, "malformed chunked framing")
            line = bytes(self._line[:-1])
            self._line.clear()
            self._chunk_line(line)
        return i

    def _chunk_line(self, line: bytes) -> None:
        if self._state == "size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                raise HttpProxyError(400, f"invalid chunk size {size[:20]!r}")
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailer"
        elif self._state == "data-crlf":
            if line:
                raise HttpProxyError(400, "chunk data longer than its size")
            self._state = "size"
        else:  # trailer section: ends with an empty line
            if not line:
                self.done = True
            else:
                self._trailers += 1
                if self._trailers > MAX_HEADERS:
                    raise HttpProxyError(400, f"more than {MAX_HEADERS} trailer fields")

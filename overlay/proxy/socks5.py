"""Sans-I/O SOCKS5 server side (RFC 1928) with username/password authentication (RFC 1929).

:class:`ServerConnection` is fed the bytes a client sends and hands back the bytes to answer and
events (:class:`Request`, :class:`Rejected`); it never touches a socket, so it is tested and fuzzed
without any. The asyncio glue in ``overlay/proxy/server.py`` turns a :class:`Request` into a dial and calls
:meth:`ServerConnection.reply` with the outcome.

Supported: methods "no authentication" and "username/password"; CONNECT and UDP ASSOCIATE; address
types IPv4 and DOMAINNAME. BIND is answered with "command not supported" and IPv6 destinations with
"address type not supported" (overlay addresses are IPv4). Every message is bounded by the protocol
itself (at most 513 bytes); anything malformed gets the error reply the protocol allows at that point
(none before the version is known) and a :class:`Rejected` event, after which the glue flushes
:meth:`data_to_send` and closes.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto

VERSION = 5
AUTH_VERSION = 1

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# Bytes a client may pipeline after its request before the server has replied. Well-behaved
# clients send nothing; a bound keeps a misbehaving one from growing the buffer.
MAX_PENDING = 64 * 1024

_PORT = struct.Struct("!H")


class Socks5Error(Exception):
    """Malformed or unsupported SOCKS5 input (raised by the stateless UDP header parser)."""


@dataclass(frozen=True, slots=True)
class Request:
    """The client asks to CONNECT to, or UDP ASSOCIATE with, ``host``:``port``.

    For UDP ASSOCIATE, host/port are where the client will send datagrams from (often 0.0.0.0:0,
    meaning "not known yet"). Answer with :meth:`ServerConnection.reply`.
    """

    command: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The negotiation failed; flush :meth:`ServerConnection.data_to_send` then close."""

    message: str


Event = Request | Rejected


class State(Enum):
    GREETING = auto()
    AUTH = auto()
    REQUEST = auto()
    WAIT_REPLY = auto()
    ESTABLISHED = auto()
    CLOSED = auto()


class _Reject(Exception):
    """Internal: abort the negotiation with an optional reply already queued."""


def encode_address(host: str, port: int) -> bytes:
    """ATYP + address + port as used in replies and UDP headers."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("utf-8")
        if not 0 < len(name) <= 255:
            raise ValueError(f"domain name of {len(name)} bytes cannot be encoded in SOCKS5") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + _PORT.pack(port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + _PORT.pack(port)


def build_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply: VER REP RSV ATYP BND.ADDR BND.PORT."""
    return bytes((VERSION, code, 0)) + encode_address(host, port)


def _address_length(buf: bytes | bytearray, at: int) -> int | None:
    """Length of the ATYP-tagged address + port starting at ``at``; None if more bytes are needed.

    Raises ``ValueError`` for an unknown address type (its length cannot be known).
    """
    if len(buf) <= at:
        return None
    atyp = buf[at]
    if atyp == ATYP_IPV4:
        return 1 + 4 + 2
    if atyp == ATYP_IPV6:
        return 1 + 16 + 2
    if atyp == ATYP_DOMAIN:
        if len(buf) <= at + 1:
            return None
        return 1 + 1 + buf[at + 1] + 2
    raise ValueError(f"unknown address type 0x{atyp:02x}")


def _decode_domain(raw: bytes) -> str:
    """A DOMAINNAME as text, refusing empty names and control characters (they end up in logs)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("domain name is not valid UTF-8") from None
    if not name or any(c <= " " or c == "\x7f" for c in name):
        raise ValueError(f"invalid domain name {name!r}")
    return name


class ServerConnection:
    """The server side of one SOCKS5 control connection, as a sans-I/O state machine.

    ``users`` maps usernames to passwords; when given, username/password authentication is
    required, otherwise only "no authentication" is offered.
    """

    def __init__(self, users: Mapping[str, str] | None = None):
        self._users = {u.encode(): p.encode() for u, p in users.items()} if users else None
        self._buf = bytearray()
        self._out = bytearray()
        self.state = State.GREETING

    # -- feeding -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns the events they complete (possibly none)."""
        if self.state is State.CLOSED:
            return []
        self._buf += data
        events: list[Event] = []
        try:
            while True:
                if self.state is State.GREETING:
                    if not self._greeting():
                        break
                elif self.state is State.AUTH:
                    if not self._auth():
                        break
                elif self.state is State.REQUEST:
                    request = self._request()
                    if request is None:
                        break
                    events.append(request)
                else:
                    break
            if len(self._buf) > MAX_PENDING:
                raise _Reject(f"client sent more than {MAX_PENDING} bytes before the reply")
        except _Reject as e:
            self.state = State.CLOSED
            self._buf.clear()
            events.append(Rejected(str(e)))
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, code: int, host: str = "0.0.0.0", port: int = 0) -> None:
        """Answer the pending :class:`Request`: ``REP_SUCCEEDED`` with the bound address, or an error."""
        if self.state is not State.WAIT_REPLY:
            raise RuntimeError(f"no request awaiting a reply (state {self.state.name})")
        self._out += build_reply(code, host, port)
        self.state = State.ESTABLISHED if code == REP_SUCCEEDED else State.CLOSED

    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request (optimistic data), to relay once established."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    # -- message parsers: return False/None when more bytes are needed ------------------------

    def _greeting(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[0] != VERSION:
            # Not SOCKS5 (a SOCKS4 client, or HTTP sent to the wrong port): no reply is meaningful.
            raise _Reject(f"not a SOCKS5 client (version byte 0x{buf[0]:02x})")
        n = buf[1]
        if len(buf) < 2 + n:
            return False
        methods = bytes(buf[2 : 2 + n])
        del buf[: 2 + n]
        wanted = METHOD_USERPASS if self._users is not None else METHOD_NO_AUTH
        if wanted not in methods:
            self._out += bytes((VERSION, METHOD_NONE_ACCEPTABLE))
            need = "username/password" if self._users is not None else "no authentication"
            raise _Reject(f"client offered no acceptable authentication method (need {need})")
        self._out += bytes((VERSION, wanted))
        self.state = State.AUTH if wanted == METHOD_USERPASS else State.REQUEST
        return True

    def _auth(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[0] != AUTH_VERSION:
            self._out += bytes((AUTH_VERSION, 1))
            raise _Reject(f"bad username/password negotiation version 0x{buf[0]:02x}")
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return False
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return False
        user = bytes(buf[2 : 2 + ulen])
        password = bytes(buf[3 + ulen : 3 + ulen + plen])
        del buf[: 3 + ulen + plen]
        assert self._users is not None
        expected = self._users.get(user)
        if expected is None or not hmac.compare_digest(password, expected):
            self._out += bytes((AUTH_VERSION, 1))
            raise _Reject(f"authentication failed for user {user.decode('utf-8', 'replace')!r}")
        self._out += bytes((AUTH_VERSION, 0))
        self.state = State.REQUEST
        return True

    def _fail(self, code: int, message: str) -> _Reject:
        self._out += build_reply(code)
        return _Reject(message)

    def _request(self) -> Request | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        if buf[0] != VERSION:
            raise self._fail(REP_GENERAL_FAILURE, f"bad request version 0x{buf[0]:02x}")
        try:
            alen = _address_length(buf, 3)
        except ValueError as e:
            raise self._fail(REP_ADDRESS_TYPE_NOT_SUPPORTED, str(e)) from None
        if alen is None or len(buf) < 3 + alen:
            return None
        cmd, atyp = buf[1], buf[3]
        addr = bytes(buf[4 : 3 + alen - 2])
        (port,) = _PORT.unpack_from(buf, 3 + alen - 2)
        del buf[: 3 + alen]
        if cmd == CMD_BIND:
            raise self._fail(REP_COMMAND_NOT_SUPPORTED, "BIND is not supported")
        if cmd not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
            raise self._fail(REP_COMMAND_NOT_SUPPORTED, f"unknown command 0x{cmd:02x}")
        if atyp == ATYP_IPV6:
            raise self._fail(REP_ADDRESS_TYPE_NOT_SUPPORTED, "IPv6 destinations are not supported")
        if atyp == ATYP_IPV4:
            host = str(ipaddress.IPv4Address(addr))
        else:
            try:
                host = _decode_domain(addr[1:])
            except ValueError as e:
                raise self._fail(REP_HOST_UNREACHABLE, str(e)) from None
        self.state = State.WAIT_REPLY
        return Request(cmd, host, port)


# -- UDP ASSOCIATE datagrams -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A client datagram for ``host``:``port`` with its SOCKS header removed."""

    host: str
    port: int
    payload: bytes


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Split a client's UDP ASSOCIATE datagram (RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA).

    Raises :class:`Socks5Error` for truncated or unsupported datagrams, including fragments
    (FRAG != 0), which RFC 1928 lets a server that does not reassemble drop.
    """
    if len(data) < 4:
        raise Socks5Error("UDP datagram shorter than its header")
    if data[2] != 0:
        raise Socks5Error(f"fragmented UDP datagram (FRAG {data[2]}) dropped")
    try:
        alen = _address_length(data, 3)
    except ValueError as e:
        raise Socks5Error(str(e)) from None
    if alen is None or len(data) < 3 + alen:
        raise Socks5Error("UDP datagram shorter than its header")
    atyp = data[3]
    addr = data[4 : 3 + alen - 2]
    (port,) = _PORT.unpack_from(data, 3 + alen - 2)
    if atyp == ATYP_IPV6:
        raise Socks5Error("IPv6 destinations are not supported")
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(addr))
    else:
        try:
            host = _decode_domain(addr[1:])
        except ValueError as e:
            raise Socks5Error(str(e)) from None
    return UdpDatagram(host, port, data[3 + alen :])


def build_udp_header(host: str, port: int) -> bytes:
    """The header to prepend to a datagram relayed back to the client from ``host``:``port``."""
    return b"\0\0\0" + encode_address(host, port)

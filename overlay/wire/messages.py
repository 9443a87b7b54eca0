"""WireGuard message layouts: fixed sizes, little-endian header, parse with bounds checks.

Every message starts with a type byte and three reserved zero bytes. Handshake messages have exact
sizes; a transport message is a 16-byte header plus at least the 16-byte Poly1305 tag. Parsers
return read-only views (NamedTuples of bytes) and raise MalformedMessage on anything else, so the
device can count and drop bad datagrams without special cases.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4
MSG_TRANSPORT_PLAIN = 5
"""Not WireGuard: an overlay-only transport message whose payload is authenticated but not
encrypted (unencrypted networks); only sent to and accepted from peers marked ``plaintext``."""

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE
"""An empty (keepalive) transport message."""
MAX_DATAGRAM_SIZE = 65535

MAC_SIZE = 16
INITIATION_MAC1_OFFSET = INITIATION_SIZE - 2 * MAC_SIZE
RESPONSE_MAC1_OFFSET = RESPONSE_SIZE - 2 * MAC_SIZE

_HANDSHAKE_SIZES = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE, MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")
"""type (with reserved bytes), receiver index, counter."""


class MalformedMessage(ValueError):
    """A datagram that is not a well-formed WireGuard message."""


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


def message_type(data: bytes | memoryview) -> int:
    """The message type (1..4) of a plausible WireGuard datagram, or 0 if it is not one."""
    n = len(data)
    if n < 4 or data[1] or data[2] or data[3]:
        return 0
    t = data[0]
    if t == MSG_TRANSPORT:
        return t if TRANSPORT_MIN_SIZE <= n <= MAX_DATAGRAM_SIZE else 0
    return t if _HANDSHAKE_SIZES.get(t) == n else 0


def is_wireguard(datagram: bytes | memoryview) -> bool:
    """True if the datagram has a WireGuard type byte, zero reserved bytes and a valid length.

    Lets one UDP socket carry WireGuard beside STUN and discovery messages: those must start with
    a byte outside 1..4 or have a nonzero byte among the next three.
    """
    return message_type(datagram) != 0


def _expect(data: bytes | memoryview, t: int) -> None:
    if message_type(data) != t:
        raise MalformedMessage(f"not a WireGuard type-{t} message ({len(data)} bytes)")


def parse_initiation(data: bytes | memoryview) -> Initiation:
    _expect(data, MSG_INITIATION)
    _, *fields = _INITIATION.unpack(data)
    return Initiation(*fields)


def parse_response(data: bytes | memoryview) -> Response:
    _expect(data, MSG_RESPONSE)
    _, *fields = _RESPONSE.unpack(data)
    return Response(*fields)


def parse_cookie_reply(data: bytes | memoryview) -> CookieReply:
    _expect(data, MSG_COOKIE_REPLY)
    _, *fields = _COOKIE_REPLY.unpack(data)
    return CookieReply(*fields)


def pack_initiation(sender: int, ephemeral: bytes, encrypted_static: bytes, encrypted_timestamp: bytes) -> bytearray:
    """An initiation with zero MACs; the cookie generator fills them in place."""
    return bytearray(_INITIATION.pack(MSG_INITIATION, sender, ephemeral, encrypted_static, encrypted_timestamp, bytes(16), bytes(16)))


def pack_response(sender: int, receiver: int, ephemeral: bytes, encrypted_nothing: bytes) -> bytearray:
    """A response with zero MACs; the cookie generator fills them in place."""
    return bytearray(_RESPONSE.pack(MSG_RESPONSE, sender, receiver, ephemeral, encrypted_nothing, bytes(16), bytes(16)))


def pack_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    return _COOKIE_REPLY.pack(MSG_COOKIE_REPLY, receiver, nonce, encrypted_cookie)

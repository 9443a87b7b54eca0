"""Relay datagram format, on the node's single UDP socket and the server's UDP port.

    magic "OVR" (3) | version 1 (1) | type (1) | body

    REGISTER   node -> server   node key (32) | token (16)    proves the node owns this UDP address
    REGISTERED server -> node   (empty)                       ack; the node's keepalive toward the server
    DATA       node -> server   destination key (32) | payload (an opaque WireGuard packet)
    DATA       server -> node   source key (32) | payload
    REFUSED    server -> node   destination key (32) | reason (1)   not registered / not a peer / over cap

The first byte 'O' (0x4F) is outside WireGuard's 1-4 and has the top bits 01, so it cannot be a
STUN message (top bits 00): one socket demultiplexes all three without ambiguity.
"""

from __future__ import annotations

MAGIC = b"OVR\x01"
HEADER = 5
REGISTER, REGISTERED, DATA, REFUSED = 1, 2, 3, 4
KEY_LEN = 32
TOKEN_LEN = 16
MAX_PAYLOAD = 65535 - 8 - 20 - HEADER - KEY_LEN

REASON_NOT_REGISTERED, REASON_NOT_PEER, REASON_RATE = 1, 2, 3
REASONS = {REASON_NOT_REGISTERED: "peer not reachable through the relay",
           REASON_NOT_PEER: "not a peer (no shared network)", REASON_RATE: "relay bandwidth cap exceeded"}


class FrameError(ValueError):
    pass


def is_relay(datagram: bytes) -> bool:
    return datagram[:4] == MAGIC


def register(node_key: bytes, token: bytes) -> bytes:
    return MAGIC + bytes([REGISTER]) + node_key + token


def registered() -> bytes:
    return MAGIC + bytes([REGISTERED])


def data(key: bytes, payload: bytes) -> bytes:
    return b"".join((MAGIC, b"\x03", key, payload))


def refused(key: bytes, reason: int) -> bytes:
    return MAGIC + bytes([REFUSED]) + key + bytes([reason])


def parse(datagram: bytes) -> tuple[int, bytes, bytes]:
    """(type, key or b"", rest). Raises FrameError on anything malformed."""
    if len(datagram) < HEADER or datagram[:4] != MAGIC:
        raise FrameError("not a relay frame")
    t = datagram[4]
    if t == REGISTERED:
        if len(datagram) != HEADER:
            raise FrameError("bad REGISTERED length")
        return t, b"", b""
    if len(datagram) < HEADER + KEY_LEN:
        raise FrameError("relay frame too short")
    key = datagram[HEADER:HEADER + KEY_LEN]
    rest = datagram[HEADER + KEY_LEN:]
    if t == REGISTER:
        if len(rest) != TOKEN_LEN:
            raise FrameError("bad REGISTER length")
    elif t == DATA:
        if not rest or len(rest) > MAX_PAYLOAD:
            raise FrameError("bad DATA payload length")
    elif t == REFUSED:
        if len(rest) != 1:
            raise FrameError("bad REFUSED length")
    else:
        raise FrameError(f"unknown relay frame type {t}")
    return t, key, rest

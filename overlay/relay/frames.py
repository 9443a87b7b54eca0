"""Relay datagram format, on the node's single UDP socket and the server's UDP port.

    magic "OVR" (3) | version 1 (1) | type (1) | body

    REGISTER   node -> server   node key (32) | nonce (16) | proof (16)   claims this UDP address
    CHALLENGE  server -> node   nonce (16)                    the nonce to register this address with
    REGISTERED server -> node   (empty)                       ack; the node's keepalive toward the server
    DATA       node -> server   destination key (32) | payload (an opaque WireGuard packet)
    DATA       server -> node   source key (32) | payload
    REFUSED    server -> node   destination key (32) | reason (1)   not registered / not a peer / over cap

Registration proves ownership and freshness bound to the source address: the server's nonce is a
MAC of the UDP address the REGISTER came from and a minute counter (stateless, like WireGuard's
cookies), and the proof is a MAC of node key and nonce keyed by the node's relay secret, which
only the node and the server know (it came over the authenticated control channel and never
crosses the wire). A REGISTER with a nonce that is stale or belongs to another address is
answered with a CHALLENGE (smaller than the REGISTER: no amplification), so a captured REGISTER
replayed from elsewhere registers nothing, and the real node re-registers within a round trip
when its NAT mapping changes.

The first byte 'O' (0x4F) is outside WireGuard's 1-4 and has the top bits 01, so it cannot be a
STUN message (top bits 00): one socket demultiplexes all three without ambiguity.
"""

from __future__ import annotations

import hmac

MAGIC = b"OVR\x01"
HEADER = 5
REGISTER, REGISTERED, DATA, REFUSED, CHALLENGE = 1, 2, 3, 4, 5
KEY_LEN = 32
TOKEN_LEN = 16            # the node's relay secret (from the hello reply)
NONCE_LEN = 16
PROOF_LEN = 16
NO_NONCE = bytes(NONCE_LEN)
MAX_PAYLOAD = 65535 - 8 - 20 - HEADER - KEY_LEN

REASON_NOT_REGISTERED, REASON_NOT_PEER, REASON_RATE = 1, 2, 3
REASONS = {REASON_NOT_REGISTERED: "peer not reachable through the relay",
           REASON_NOT_PEER: "not a peer (no shared network)", REASON_RATE: "relay bandwidth cap exceeded"}


class FrameError(ValueError):
    pass


def is_relay(datagram: bytes) -> bool:
    return datagram[:4] == MAGIC


def register_proof(secret: bytes, node_key: bytes, nonce: bytes) -> bytes:
    return hmac.digest(secret, b"overlay relay register" + node_key + nonce, "blake2s")[:PROOF_LEN]


def register(node_key: bytes, secret: bytes, nonce: bytes = NO_NONCE) -> bytes:
    return MAGIC + bytes([REGISTER]) + node_key + nonce + register_proof(secret, node_key, nonce)


def challenge(nonce: bytes) -> bytes:
    return MAGIC + bytes([CHALLENGE]) + nonce


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
    if t == CHALLENGE:
        if len(datagram) != HEADER + NONCE_LEN:
            raise FrameError("bad CHALLENGE length")
        return t, b"", datagram[HEADER:]
    if len(datagram) < HEADER + KEY_LEN:
        raise FrameError("relay frame too short")
    key = datagram[HEADER:HEADER + KEY_LEN]
    rest = datagram[HEADER + KEY_LEN:]
    if t == REGISTER:
        if len(rest) != NONCE_LEN + PROOF_LEN:
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

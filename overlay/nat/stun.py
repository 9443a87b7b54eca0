"""STUN (RFC 8489) Binding: message codec, the server's responder and a sans-I/O client transaction.

Only what path discovery needs: Binding requests, success and error responses, XOR-MAPPED-ADDRESS
(and the legacy MAPPED-ADDRESS when reading), SOFTWARE, ERROR-CODE, UNKNOWN-ATTRIBUTES and
FINGERPRINT. No credentials: the mediation server's STUN port answers anyone, like public STUN
servers do; the discovery messages that actually select a path are authenticated separately.

Demultiplexing on the node's single UDP socket relies on ``is_stun``: the top two bits of a STUN
message are zero, bytes 4..8 hold the magic cookie and the length field equals the datagram
length minus 20. WireGuard messages (type byte 1..4, then three zero bytes) always fail the
length test, since they are at least 32 bytes long while their "length field" reads zero.
"""

from __future__ import annotations

import os
import socket
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from .candidate import Addr, AddressError, normalize

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
# STUN over UDP must fit the path MTU (RFC 8489 §6.1); anything larger is not ours.
MAX_MESSAGE_LEN = 1500
MAX_ATTRIBUTES = 32
FINGERPRINT_XOR = 0x5354554E

# classes (RFC 8489 §5)
REQUEST, INDICATION, SUCCESS, ERROR = 0, 1, 2, 3
BINDING = 0x001
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# attributes (RFC 8489 §18.3)
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
FINGERPRINT = 0x8028

# Comprehension-required attributes (< 0x8000) this implementation knows of. The credential
# attributes are "understood" in the sense that a server without authentication ignores them.
KNOWN_REQUIRED = frozenset(
    {MAPPED_ADDRESS, USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, UNKNOWN_ATTRIBUTES, REALM, NONCE,
     MESSAGE_INTEGRITY_SHA256, PASSWORD_ALGORITHM, USERHASH, XOR_MAPPED_ADDRESS}
)

SOFTWARE_NAME = "overlay"

_HDR = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")


class StunError(ValueError):
    """A datagram is not a well-formed STUN message (or a response does not fit its request)."""


def is_stun(datagram: bytes | memoryview) -> bool:
    """Cheap demultiplexing test: could this datagram be a STUN message (RFC 8489 §5, §7.3)?"""
    return (
        len(datagram) >= HEADER_LEN
        and datagram[0] & 0xC0 == 0
        and datagram[4:8] == _COOKIE
        and int.from_bytes(datagram[2:4], "big") + HEADER_LEN == len(datagram)
    )


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 §5: uniformly and randomly chosen)."""
    return os.urandom(12)


def message_class(msg_type: int) -> int:
    return ((msg_type >> 7) & 0x2) | ((msg_type >> 4) & 0x1)


def message_method(msg_type: int) -> int:
    return (msg_type & 0x000F) | ((msg_type >> 1) & 0x0070) | ((msg_type >> 2) & 0x0F80)


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed STUN message. ``attributes`` keeps every attribute (type, raw value) in order."""

    msg_type: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]
    xor_mapped_address: Addr | None = None
    mapped_address: Addr | None = None
    # comprehension-required attribute types present but not understood (RFC 8489 §7.3)
    unknown_required: tuple[int, ...] = ()
    has_fingerprint: bool = False

    @property
    def msg_class(self) -> int:
        return message_class(self.msg_type)

    @property
    def method(self) -> int:
        return message_method(self.msg_type)

    def get(self, attr_type: int) -> bytes | None:
        """The first attribute of that type (RFC 8489 §14: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    @property
    def software(self) -> str | None:
        v = self.get(SOFTWARE)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def error(self) -> tuple[int, str] | None:
        """(code, reason) of an ERROR-CODE attribute."""
        v = self.get(ERROR_CODE)
        if v is None:
            return None
        return (v[2] & 0x7) * 100 + v[3], v[4:].decode("utf-8", "replace")

    @property
    def unknown_attributes(self) -> tuple[int, ...]:
        """The types listed in an UNKNOWN-ATTRIBUTES attribute (420 responses)."""
        v = self.get(UNKNOWN_ATTRIBUTES) or b""
        return struct.unpack(f"!{len(v) // 2}H", v[: len(v) // 2 * 2])


def _xor_key(transaction_id: bytes) -> bytes:
    return _COOKIE + transaction_id


def decode_address(value: bytes, transaction_id: bytes | None) -> Addr:
    """MAPPED-ADDRESS value, or XOR-MAPPED-ADDRESS when the transaction ID is given (§14.1-2)."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    family = value[1]
    port = int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if family == 0x01 and len(raw) == 4:
        af = socket.AF_INET
    elif family == 0x02 and len(raw) == 16:
        af = socket.AF_INET6
    else:
        raise StunError(f"bad address attribute (family {family}, {len(raw)} address bytes)")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        key = _xor_key(transaction_id)
        raw = bytes(a ^ b for a, b in zip(raw, key))
    try:
        return normalize((socket.inet_ntop(af, raw), port))
    except AddressError as e:
        raise StunError(str(e)) from None


def encode_address(addr: Addr, transaction_id: bytes | None) -> bytes:
    """Inverse of ``decode_address``."""
    host, port = normalize(addr)
    if ":" in host:
        family, raw = 0x02, socket.inet_pton(socket.AF_INET6, host)
    else:
        family, raw = 0x01, socket.inet_pton(socket.AF_INET, host)
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        key = _xor_key(transaction_id)
        raw = bytes(a ^ b for a, b in zip(raw, key))
    return struct.pack("!BBH", 0, family, port) + raw


def parse(datagram: bytes) -> Message:
    """Parse and validate one STUN message; raise StunError on anything malformed.

    Validates header bits, cookie, length, attribute framing and padding, the count of
    attributes, FINGERPRINT (CRC-32, must be last) and the address attributes. Attributes after
    MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (§14.5).
    """
    n = len(datagram)
    if n < HEADER_LEN:
        raise StunError("shorter than a STUN header")
    if n > MAX_MESSAGE_LEN:
        raise StunError(f"message longer than {MAX_MESSAGE_LEN} bytes")
    msg_type, length, cookie, tid = _HDR.unpack_from(datagram)
    if msg_type & 0xC000:
        raise StunError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie (RFC 3489 messages are not supported)")
    if length & 3:
        raise StunError("message length not a multiple of 4")
    if length + HEADER_LEN != n:
        raise StunError(f"message length {length} does not match datagram size {n}")
    attrs: list[tuple[int, bytes]] = []
    unknown: list[int] = []
    xor_mapped = mapped = None
    integrity_seen = fingerprint = False
    off = HEADER_LEN
    count = 0
    while off < n:
        if fingerprint:
            raise StunError("attribute after FINGERPRINT")
        count += 1
        if count > MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if off + 4 > n:
            raise StunError("truncated attribute header")
        atype, alen = _ATTR.unpack_from(datagram, off)
        vstart = off + 4
        vend = vstart + alen
        nxt = vstart + ((alen + 3) & ~3)
        if nxt > n:
            raise StunError(f"attribute 0x{atype:04x} overruns the message")
        value = bytes(datagram[vstart:vend])
        if atype == FINGERPRINT:
            if alen != 4:
                raise StunError("FINGERPRINT must be 4 bytes")
            want = (zlib.crc32(datagram[:off]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if int.from_bytes(value, "big") != want:
                raise StunError("FINGERPRINT mismatch")
            fingerprint = True
        elif integrity_seen and atype != MESSAGE_INTEGRITY_SHA256:
            off = nxt
            continue
        elif atype in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256):
            integrity_seen = True
        elif atype == XOR_MAPPED_ADDRESS and xor_mapped is None:
            xor_mapped = decode_address(value, tid)
        elif atype == MAPPED_ADDRESS and mapped is None:
            mapped = decode_address(value, None)
        elif atype == ERROR_CODE and (alen < 4 or not 3 <= value[2] & 0x7 <= 6 or value[3] > 99):
            raise StunError("malformed ERROR-CODE")
        elif atype < 0x8000 and atype not in KNOWN_REQUIRED:
            unknown.append(atype)
        attrs.append((atype, value))
        off = nxt
    return Message(msg_type, tid, tuple(attrs), xor_mapped, mapped, tuple(unknown), fingerprint)


def encode(msg_type: int, transaction_id: bytes, attributes: Iterable[tuple[int, bytes]], *, fingerprint: bool = True) -> bytes:
    """Serialize a message; appends FINGERPRINT (computed over everything before it) by default."""
    if len(transaction_id) != 12:
        raise ValueError("transaction ID must be 12 bytes")
    body = bytearray()
    for atype, value in attributes:
        if len(value) > 0xFFFF:
            raise ValueError("attribute value too long")
        body += _ATTR.pack(atype, len(value))
        body += value
        body += bytes(-len(value) % 4)
    length = len(body) + (8 if fingerprint else 0)
    out = bytearray(_HDR.pack(msg_type, length, MAGIC_COOKIE, transaction_id))
    out += body
    if fingerprint:
        crc = (zlib.crc32(out) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        out += _ATTR.pack(FINGERPRINT, 4) + crc.to_bytes(4, "big")
    if len(out) > MAX_MESSAGE_LEN:
        raise ValueError("message too long")
    return bytes(out)


def binding_request(transaction_id: bytes, *, software: str | None = None, fingerprint: bool = True) -> bytes:
    attrs = [] if software is None else [(SOFTWARE, software.encode()[:763])]
    return encode(BINDING_REQUEST, transaction_id, attrs, fingerprint=fingerprint)


def binding_success(transaction_id: bytes, mapped: Addr, *, software: str | None = SOFTWARE_NAME) -> bytes:
    attrs = [(XOR_MAPPED_ADDRESS, encode_address(mapped, transaction_id))]
    if software is not None:
        attrs.append((SOFTWARE, software.encode()[:763]))
    return encode(BINDING_SUCCESS, transaction_id, attrs)


def binding_error(transaction_id: bytes, code: int, reason: str, *, unknown: Iterable[int] = ()) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError("STUN error codes are 300..699")
    attrs = [(ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()[:763])]
    unk = tuple(unknown)
    if unk:
        attrs.append((UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(unk)}H", *unk)))
    return encode(BINDING_ERROR, transaction_id, attrs)


def binding_response(request: bytes, observed_addr: Addr) -> bytes | None:
    """What a STUN server sends back for ``request`` received from ``observed_addr``.

    None when nothing must be sent: not STUN, malformed, not a request (responses and
    indications are never answered, RFC 8489 §6.3), or a method other than Binding (answered by
    nobody here; a 400 would let anyone bounce errors off the server for every method).
    A Binding request with unknown comprehension-required attributes gets 420 with
    UNKNOWN-ATTRIBUTES (§6.3.1); otherwise a success response carrying XOR-MAPPED-ADDRESS.
    """
    try:
        msg = parse(request)
    except StunError:
        return None
    if msg.msg_type != BINDING_REQUEST:
        return None
    if msg.unknown_required:
        return binding_error(msg.transaction_id, 420, "Unknown Attribute", unknown=msg.unknown_required[:16])
    return binding_success(msg.transaction_id, observed_addr)


class StunTransaction:
    """One Binding request over UDP with RFC 8489 §6.2.1 retransmission, sans-I/O.

    Sends at t, t+RTO, t+3·RTO, ... (interval doubling) up to ``rc`` times, then waits
    ``rm``·RTO for the last one; the defaults are the RFC's (500 ms, 7, 16: 39.5 s in all).
    Path discovery uses shorter settings: a node waiting half a minute learns nothing useful.
    """

    def __init__(self, server: Addr, now: float, *, rto: float = 0.5, rc: int = 7, rm: int = 16):
        if not (0 < rto <= 10 and 1 <= rc <= 10 and 1 <= rm <= 32):
            raise ValueError("STUN retransmission parameters out of range")
        self.server = normalize(server)
        self.transaction_id = new_transaction_id()
        self.result: Addr | None = None
        self.error: str | None = None
        self.rtt: float | None = None
        self._rto, self._rc, self._rm = rto, rc, rm
        self._request = binding_request(self.transaction_id, software=SOFTWARE_NAME)
        self._sends = 0
        self._first_sent = now
        self._interval = rto
        self._next_send: float | None = now
        self._deadline: float | None = None
        self._out: list[tuple[bytes, Addr]] = []
        self.handle_timer(now)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def get_timer(self) -> float | None:
        if self.done:
            return None
        return self._next_send if self._next_send is not None else self._deadline

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        if self._next_send is not None and now >= self._next_send:
            self._out.append((self._request, self.server))
            self._sends += 1
            if self._sends == 1:
                self._first_sent = now
            if self._sends < self._rc:
                self._next_send = now + self._interval
                self._interval *= 2
            else:
                self._next_send = None
                self._deadline = now + self._rm * self._rto
        elif self._deadline is not None and now >= self._deadline:
            self.error = "timeout"

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def receive(self, datagram: bytes, addr: Addr, now: float) -> bool:
        """Feed a datagram; True if it was this transaction's response (even a failing one)."""
        if self.done or len(datagram) < HEADER_LEN or datagram[8:20] != self.transaction_id:
            return False
        try:
            addr = normalize(addr)
            msg = parse(datagram)
        except (StunError, AddressError):
            return False
        if addr != self.server or message_method(msg.msg_type) != BINDING:
            return False
        cls = msg.msg_class
        if cls == SUCCESS:
            mapped = msg.xor_mapped_address or msg.mapped_address
            if msg.unknown_required:  # §6.3.3: discard, transaction failed
                self.error = f"response with unknown required attributes {msg.unknown_required}"
            elif mapped is None:
                self.error = "success response without a mapped address"
            else:
                self.result = mapped
                if self._sends == 1:  # Karn: no RTT sample from a retransmitted request
                    self.rtt = now - self._first_sent
        elif cls == ERROR:
            code, reason = msg.error or (0, "")
            self.error = f"error {code} {reason}".strip()
        else:
            return False
        self._out.clear()
        return True

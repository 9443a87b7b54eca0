"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, as WireGuard uses it (whitepaper section 5.4).

Pure functions over a per-peer ``Handshake`` record; the device decides when to call them and
owns indices, timers and replay policy. Nothing here reads a clock: the initiation timestamp is
passed in (TAI64N from wall time, because the peer compares it across our restarts).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum

from overlay import crypto
from overlay.wire.messages import Initiation, Response, pack_initiation, pack_response

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = crypto.blake2s(CONSTRUCTION)
INITIAL_HASH = crypto.blake2s(INITIAL_CHAIN_KEY, IDENTIFIER)

_TAI64_BASE = 0x400000000000000A
_TAI64N = struct.Struct(">QI")
_WHITENER_MASK = 0x1000000 - 1
TIMESTAMP_SIZE = 12


class HandshakeError(Exception):
    """A handshake message that does not authenticate or does not fit our state."""


class State(IntEnum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


def tai64n(wall_time: float) -> bytes:
    """TAI64N label of a Unix time, nanoseconds rounded down to ~16 ms like wireguard-go.

    The rounding keeps the timestamp from leaking a precise clock (a fingerprint) to observers
    that can decrypt nothing else.
    """
    seconds = int(wall_time)
    nanos = int((wall_time - seconds) * 1e9) & ~_WHITENER_MASK
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos)


def next_timestamp(wall_time: float, previous: bytes) -> bytes:
    """A TAI64N timestamp strictly after ``previous``: peers reject initiations not newer than the last."""
    ts = tai64n(wall_time)
    if ts <= previous:
        seconds, nanos = _TAI64N.unpack(previous)
        nanos += _WHITENER_MASK + 1
        if nanos >= 1_000_000_000:
            seconds, nanos = seconds + 1, 0
        ts = _TAI64N.pack(seconds, nanos)
    return ts


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return crypto.blake2s(h, data)


def _kdf1(ck: bytes, data: bytes) -> bytes:
    return crypto.hkdf(ck, data, 1)[0]


class Handshake:
    """Handshake state with one peer (the fields of wireguard-go's ``Handshake``)."""

    __slots__ = (
        "state", "hash", "chain_key", "local_ephemeral", "local_index", "remote_index",
        "remote_ephemeral", "remote_static", "preshared_key", "static_static",
        "last_timestamp", "last_initiation_consumed", "initiation_allowed_at", "last_sent_timestamp",
    )

    def __init__(self, local_private: bytes, remote_static: bytes, preshared_key: bytes):
        self.remote_static = remote_static
        self.preshared_key = preshared_key
        # Raises DecryptError for a low-order key: such a peer could never be authenticated.
        self.static_static = crypto.dh(local_private, remote_static)
        self.last_timestamp = bytes(TIMESTAMP_SIZE)
        self.last_sent_timestamp = bytes(TIMESTAMP_SIZE)
        self.last_initiation_consumed = float("-inf")
        self.initiation_allowed_at = float("-inf")
        self.local_index = 0
        self.clear()

    def clear(self) -> None:
        """Forget ephemeral secrets; indices and replay timestamps survive."""
        self.state = State.ZEROED
        self.hash = b""
        self.chain_key = b""
        self.local_ephemeral = b""
        self.remote_ephemeral = b""
        self.remote_index = 0


def create_initiation(hs: Handshake, local_public: bytes, sender: int, timestamp: bytes) -> bytearray:
    """Message 1 (MACs left zero). Moves ``hs`` to INITIATION_CREATED."""
    h = _mix_hash(INITIAL_HASH, hs.remote_static)
    ephemeral = crypto.generate_private_key()
    ephemeral_public = crypto.public_key(ephemeral)
    ck = _kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    h = _mix_hash(h, ephemeral_public)
    ck, key = crypto.hkdf(ck, crypto.dh(ephemeral, hs.remote_static), 2)
    encrypted_static = crypto.aead_encrypt(key, 0, local_public, h)
    h = _mix_hash(h, encrypted_static)
    ck, key = crypto.hkdf(ck, hs.static_static, 2)
    encrypted_timestamp = crypto.aead_encrypt(key, 0, timestamp, h)
    h = _mix_hash(h, encrypted_timestamp)
    hs.state, hs.hash, hs.chain_key = State.INITIATION_CREATED, h, ck
    hs.local_ephemeral, hs.local_index = ephemeral, sender
    return pack_initiation(sender, ephemeral_public, encrypted_static, encrypted_timestamp)


class ConsumedInitiation:
    """An authenticated initiation, not yet committed (replay and flood checks come first)."""

    __slots__ = ("handshake", "hash", "chain_key", "timestamp", "sender", "ephemeral")

    def __init__(self, handshake: Handshake, h: bytes, ck: bytes, timestamp: bytes, msg: Initiation):
        self.handshake, self.hash, self.chain_key, self.timestamp = handshake, h, ck, timestamp
        self.sender, self.ephemeral = msg.sender, msg.ephemeral

    def commit(self, now: float) -> None:
        hs = self.handshake
        hs.state, hs.hash, hs.chain_key = State.INITIATION_CONSUMED, self.hash, self.chain_key
        hs.remote_index, hs.remote_ephemeral = self.sender, self.ephemeral
        hs.last_timestamp = max(hs.last_timestamp, self.timestamp)
        hs.last_initiation_consumed = max(hs.last_initiation_consumed, now)


def consume_initiation(
    local_private: bytes,
    local_public: bytes,
    msg: Initiation,
    find_peer: Callable[[bytes], Handshake | None],
) -> ConsumedInitiation:
    """Authenticate message 1; ``find_peer`` maps the revealed static key to that peer's handshake."""
    h = _mix_hash(_mix_hash(INITIAL_HASH, local_public), msg.ephemeral)
    ck = _kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    try:
        ck, key = crypto.hkdf(ck, crypto.dh(local_private, msg.ephemeral), 2)
        peer_public = crypto.aead_decrypt(key, 0, msg.encrypted_static, h)
    except crypto.DecryptError:
        raise HandshakeError("initiation does not decrypt") from None
    h = _mix_hash(h, msg.encrypted_static)
    hs = find_peer(peer_public)
    if hs is None:
        raise HandshakeError("initiation from an unknown peer")
    ck, key = crypto.hkdf(ck, hs.static_static, 2)
    try:
        timestamp = crypto.aead_decrypt(key, 0, msg.encrypted_timestamp, h)
    except crypto.DecryptError:
        raise HandshakeError("initiation timestamp does not authenticate") from None
    h = _mix_hash(h, msg.encrypted_timestamp)
    return ConsumedInitiation(hs, h, ck, timestamp, msg)


def create_response(hs: Handshake, sender: int) -> bytearray:
    """Message 2 (MACs left zero) for a consumed initiation. Moves ``hs`` to RESPONSE_CREATED."""
    if hs.state != State.INITIATION_CONSUMED:
        raise HandshakeError("no consumed initiation to respond to")
    ephemeral = crypto.generate_private_key()
    ephemeral_public = crypto.public_key(ephemeral)
    h = _mix_hash(hs.hash, ephemeral_public)
    ck = _kdf1(hs.chain_key, ephemeral_public)
    try:
        ck = _kdf1(ck, crypto.dh(ephemeral, hs.remote_ephemeral))
    except crypto.DecryptError:
        raise HandshakeError("peer ephemeral key is invalid") from None
    ck = _kdf1(ck, crypto.dh(ephemeral, hs.remote_static))
    ck, tau, key = crypto.hkdf(ck, hs.preshared_key, 3)
    h = _mix_hash(h, tau)
    encrypted_nothing = crypto.aead_encrypt(key, 0, b"", h)
    h = _mix_hash(h, encrypted_nothing)
    hs.state, hs.hash, hs.chain_key = State.RESPONSE_CREATED, h, ck
    hs.local_ephemeral, hs.local_index = ephemeral, sender
    return pack_response(sender, hs.remote_index, ephemeral_public, encrypted_nothing)


def consume_response(hs: Handshake, local_private: bytes, msg: Response) -> None:
    """Authenticate message 2 against our pending initiation. Moves ``hs`` to RESPONSE_CONSUMED."""
    if hs.state != State.INITIATION_CREATED:
        raise HandshakeError("response without a pending initiation")
    h = _mix_hash(hs.hash, msg.ephemeral)
    ck = _kdf1(hs.chain_key, msg.ephemeral)
    try:
        ck = _kdf1(ck, crypto.dh(hs.local_ephemeral, msg.ephemeral))
        ck = _kdf1(ck, crypto.dh(local_private, msg.ephemeral))
        ck, tau, key = crypto.hkdf(ck, hs.preshared_key, 3)
        h = _mix_hash(h, tau)
        crypto.aead_decrypt(key, 0, msg.encrypted_nothing, h)
    except crypto.DecryptError:
        raise HandshakeError("response does not authenticate") from None
    h = _mix_hash(h, msg.encrypted_nothing)
    hs.state, hs.hash, hs.chain_key, hs.remote_index = State.RESPONSE_CONSUMED, h, ck, msg.sender


def derive_transport_keys(hs: Handshake) -> tuple[bytes, bytes, bool]:
    """(send key, receive key, we are initiator) from a finished handshake; the caller clears it."""
    first, second = crypto.hkdf(hs.chain_key, b"", 2)
    if hs.state == State.RESPONSE_CONSUMED:
        result = (first, second, True)
    elif hs.state == State.RESPONSE_CREATED:
        result = (second, first, False)
    else:
        raise HandshakeError(f"cannot derive keys in state {hs.state.name}")
    return result

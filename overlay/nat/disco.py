"""Discovery messages: Ping, Pong and CallMeMaybe sealed with NaCl box between node keys.

Wire format (one UDP datagram on the node's shared socket)::

    magic "OVD\\x01" (4) | sender X25519 public key (32) | nonce (24) | box ciphertext

and the box plaintext::

    type (1) | sender public key again (32) | tx_id (12) | body

The box (X25519 + XSalsa20-Poly1305) uses the same static keys as WireGuard, so only the holder
of the sender's private key can produce a message our key opens. The sender key is repeated
inside the ciphertext because a box key is symmetric: without it, a message A sealed for B could
be bounced back to A with the outer key rewritten to B's and would open fine. Replays are
rejected by a bounded cache of (sender, type, tx_id); path decisions never rest on a replayable
message anyway, since a path is only confirmed by a pong echoing a fresh tx_id we chose.

'O' (0x4F) has a non-zero top bit pair, so it is neither STUN nor a WireGuard type byte (1..4).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from .candidate import Addr, AddressError, Candidate, pack_addr, pack_candidate, unpack_addr, unpack_candidate

MAGIC = b"OVD\x01"
KEY_LEN = 32
NONCE_LEN = 24
TX_LEN = 12
_MAC_LEN = 16
_OVERHEAD = len(MAGIC) + KEY_LEN + NONCE_LEN + _MAC_LEN
MAX_DATAGRAM = 1280
MAX_CANDIDATES = 32

PING, PONG, CALL_ME_MAYBE = 1, 2, 3


class DiscoError(ValueError):
    """A datagram is not an authentic, fresh, well-formed discovery message."""


@dataclass(frozen=True, slots=True)
class Ping:
    tx_id: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping: echoes its tx_id and says where the ping came from (like STUN)."""

    tx_id: bytes
    observed: Addr


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """The sender's current candidates; sent over the relay to ask the peer to punch now."""

    tx_id: bytes
    candidates: tuple[Candidate, ...]


DiscoMessage = Ping | Pong | CallMeMaybe


def is_disco(datagram: bytes) -> bool:
    return datagram[:4] == MAGIC


def new_tx_id() -> bytes:
    return os.urandom(TX_LEN)


class DiscoCodec:
    """Seals and opens discovery messages for one node key.

    ``accept_sender`` (optional) filters senders before any public-key work, so random keys
    cannot make us compute DH shared secrets. Box objects (which hold the precomputed shared
    key) are cached per peer, bounded.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        accept_sender: Callable[[bytes], bool] | None = None,
        replay_cache_size: int = 4096,
        box_cache_size: int = 1024,
    ):
        self._private = nacl.public.PrivateKey(private_key)
        self.public_key = bytes(self._private.public_key)
        self._accept = accept_sender
        self._boxes: OrderedDict[bytes, nacl.public.Box] = OrderedDict()
        self._box_cache_size = box_cache_size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._replay_cache_size = replay_cache_size

    def _box(self, peer: bytes) -> nacl.public.Box:
        box = self._boxes.get(peer)
        if box is None:
            try:
                box = nacl.public.Box(self._private, nacl.public.PublicKey(peer))
            except (nacl.exceptions.CryptoError, ValueError, TypeError) as e:
                raise DiscoError("invalid peer public key") from e
            if len(self._boxes) >= self._box_cache_size:
                self._boxes.popitem(last=False)
            self._boxes[peer] = box
        return box

    def seal(self, peer: bytes, msg: DiscoMessage) -> bytes:
        """Encrypt ``msg`` for ``peer`` (its 32-byte public key)."""
        if isinstance(msg, Ping):
            mtype, body = PING, b""
        elif isinstance(msg, Pong):
            mtype, body = PONG, pack_addr(msg.observed)
        elif isinstance(msg, CallMeMaybe):
            if len(msg.candidates) > MAX_CANDIDATES:
                raise ValueError(f"at most {MAX_CANDIDATES} candidates")
            mtype = CALL_ME_MAYBE
            body = bytes((len(msg.candidates),)) + b"".join(pack_candidate(c) for c in msg.candidates)
        else:
            raise TypeError(f"not a discovery message: {msg!r}")
        if len(msg.tx_id) != TX_LEN:
            raise ValueError("tx_id must be 12 bytes")
        plaintext = bytes((mtype,)) + self.public_key + msg.tx_id + body
        nonce = os.urandom(NONCE_LEN)
        ct = self._box(peer).encrypt(plaintext, nonce).ciphertext
        return MAGIC + self.public_key + nonce + ct

    def open(self, datagram: bytes) -> tuple[bytes, DiscoMessage]:
        """Authenticate and parse; returns (sender public key, message) or raises DiscoError."""
        n = len(datagram)
        if n > MAX_DATAGRAM:
            raise DiscoError("discovery datagram too long")
        if n < _OVERHEAD + 1 + KEY_LEN + TX_LEN:
            raise DiscoError("discovery datagram too short")
        if datagram[:4] != MAGIC:
            raise DiscoError("bad magic")
        sender = bytes(datagram[4:36])
        if sender == self.public_key:
            raise DiscoError("message claims to come from ourselves")
        if self._accept is not None and not self._accept(sender):
            raise DiscoError("unknown sender")
        nonce = bytes(datagram[36:60])
        try:
            pt = self._box(sender).decrypt(bytes(datagram[60:]), nonce)
        except nacl.exceptions.CryptoError:
            raise DiscoError("authentication failed") from None
        mtype = pt[0]
        if pt[1:33] != sender:
            raise DiscoError("inner sender does not match (reflected message)")
        tx_id = pt[33:45]
        body = pt[45:]
        try:
            msg = self._parse_body(mtype, tx_id, body)
        except AddressError as e:
            raise DiscoError(str(e)) from None
        key = pt[:45]  # type | sender | tx_id
        if key in self._seen:
            raise DiscoError("replayed message")
        if len(self._seen) >= self._replay_cache_size:
            self._seen.popitem(last=False)
        self._seen[key] = None
        return sender, msg

    @staticmethod
    def _parse_body(mtype: int, tx_id: bytes, body: bytes) -> DiscoMessage:
        if mtype == PING:
            if body:
                raise DiscoError("trailing bytes in ping")
            return Ping(tx_id)
        if mtype == PONG:
            addr, end = unpack_addr(body, 0)
            if end != len(body):
                raise DiscoError("trailing bytes in pong")
            return Pong(tx_id, addr)
        if mtype == CALL_ME_MAYBE:
            if not body:
                raise DiscoError("empty call-me-maybe")
            count = body[0]
            if count > MAX_CANDIDATES:
                raise DiscoError(f"more than {MAX_CANDIDATES} candidates")
            off = 1
            cands = []
            for _ in range(count):
                c, off = unpack_candidate(body, off)
                cands.append(c)
            if off != len(body):
                raise DiscoError("trailing bytes in call-me-maybe")
            return CallMeMaybe(tx_id, tuple(cands))
        raise DiscoError(f"unknown discovery message type {mtype}")

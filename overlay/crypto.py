"""Cryptographic primitives shared by the control channel (Noise XX) and WireGuard (Noise IKpsk2).

One place for each primitive, so every protocol uses the same vetted code:

- X25519 via PyNaCl (libsodium ``crypto_scalarmult``).
- ChaCha20-Poly1305 (IETF, 96-bit nonce = 4 zero bytes + 64-bit little-endian counter, the
  Noise/WireGuard convention) via ``cryptography``: its AEAD object is created once per key and
  costs ~1.7 us per 1380-byte packet here, against ~4 us for PyNaCl's per-call binding.
- XChaCha20-Poly1305 (WireGuard cookie replies) via PyNaCl.
- BLAKE2s hash, keyed BLAKE2s MAC, HMAC-BLAKE2s and the Noise HKDF via ``hashlib``/``hmac``.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl

KEY_LEN = 32
TAG_LEN = 16
HASH_LEN = 32

_NONCE = struct.Struct("<4xQ")
nonce_of = _NONCE.pack
"""The 12-byte nonce of a counter (``nonce``, without the call): for ``Aead.seal_nonce``/``open_nonce``."""


class DecryptError(Exception):
    """Authentication of a ciphertext failed."""


TagError = InvalidTag
"""What ``Aead.open_nonce`` raises when authentication fails (``decrypt`` turns it into DecryptError)."""


# ---------------------------------------------------------------- X25519


def generate_private_key() -> bytes:
    """A fresh clamped X25519 private key (32 bytes)."""
    k = bytearray(os.urandom(32))
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def public_key(private: bytes) -> bytes:
    return _nacl.crypto_scalarmult_base(private)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret. Raises DecryptError for a low-order public key (all-zero output)."""
    try:
        out = _nacl.crypto_scalarmult(bytes(private), bytes(public))
    except Exception as e:  # libsodium refuses low-order points
        raise DecryptError("invalid public key") from e
    if out == bytes(32):
        raise DecryptError("invalid public key")
    return out


# ---------------------------------------------------------------- AEAD


def nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)


class Aead:
    """ChaCha20-Poly1305 bound to one key; reuse it for every packet under that key."""

    __slots__ = ("_c", "seal_nonce", "open_nonce")

    def __init__(self, key: bytes):
        self._c = ChaCha20Poly1305(key)
        # the cipher's own methods, (nonce, data, associated data or None), for per-packet paths
        # that save a call: the nonce from ``nonce_of``; ``open_nonce`` raises TagError
        self.seal_nonce = self._c.encrypt
        self.open_nonce = self._c.decrypt

    def encrypt(self, counter: int, plaintext: bytes, ad: bytes | None = b"") -> bytes:
        return self._c.encrypt(_NONCE.pack(counter), plaintext, ad or None)

    def decrypt(self, counter: int, ciphertext: bytes | memoryview, ad: bytes | None = b"") -> bytes:
        try:
            return self._c.decrypt(_NONCE.pack(counter), ciphertext, ad or None)
        except InvalidTag:
            raise DecryptError("authentication failed") from None

    def seal_plain(self, counter: int, data: bytes) -> bytes:
        """``data`` + its 16-byte tag, ``data`` left readable: ChaCha20-Poly1305 of an empty
        plaintext with ``data`` as associated data (unencrypted networks: authenticated, not secret)."""
        return data + self._c.encrypt(_NONCE.pack(counter), b"", data or None)

    def open_plain(self, counter: int, sealed: bytes | memoryview) -> bytes:
        """Check a ``seal_plain`` output; the data, or DecryptError."""
        if len(sealed) < TAG_LEN:
            raise DecryptError("authentication failed")
        data = bytes(sealed[:-TAG_LEN])
        try:
            self._c.decrypt(_NONCE.pack(counter), bytes(sealed[-TAG_LEN:]), data or None)
        except InvalidTag:
            raise DecryptError("authentication failed") from None
        return data


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes = b"") -> bytes:
    return Aead(key).encrypt(counter, plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes = b"") -> bytes:
    return Aead(key).decrypt(counter, ciphertext, ad)


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes = b"") -> bytes:
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce24, key)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes = b"") -> bytes:
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce24, key)
    except Exception:
        raise DecryptError("authentication failed") from None


# ---------------------------------------------------------------- BLAKE2s family


def blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, *parts: bytes | memoryview) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (WireGuard's MAC)."""
    h = hashlib.blake2s(key=key, digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


def hmac(key: bytes, data: bytes) -> bytes:
    return _hmac.digest(key, data, "blake2s")


def hkdf(chaining_key: bytes, input_key_material: bytes, n: int) -> tuple[bytes, ...]:
    """Noise HKDF with HMAC-BLAKE2s, returning n (1..3) 32-byte outputs."""
    prk = hmac(chaining_key, input_key_material)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(prk, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)

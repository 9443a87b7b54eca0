"""Noise_XX_25519_ChaChaPoly_BLAKE2s for the control channel (sans-I/O).

Why XX: a node meets a server for the first time without knowing its key (trust on first use, like
SSH ``known_hosts``), so the server's static key must travel in the handshake; the node's key
travels too, encrypted, and becomes its identity. Both sides are authenticated by the end of the
third message. The node compares the server's key with its pin after message 2.

    -> e
    <- e, ee, s, es
    -> s, se

Same primitives as WireGuard (overlay/crypto.py), so one set of vetted code serves both.
"""

from __future__ import annotations

import functools

from overlay import crypto

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"
MAX_MESSAGE = 65535


class HandshakeError(Exception):
    pass


class CipherState:
    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None):
        self._aead = crypto.Aead(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= 2**64 - 1:
            raise HandshakeError("nonce exhausted")
        ct = self._aead.encrypt(self.n, plaintext, ad)
        self.n += 1
        return ct

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        pt = self._aead.decrypt(self.n, ciphertext, ad)  # raises crypto.DecryptError
        self.n += 1
        return pt


class _SymmetricState:
    def __init__(self) -> None:
        self.h = crypto.blake2s(PROTOCOL_NAME) if len(PROTOCOL_NAME) > 32 else PROTOCOL_NAME.ljust(32, b"\0")
        self.ck = self.h
        self.cipher = CipherState(None)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, k = crypto.hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(k)

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.blake2s(self.h, data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = crypto.hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


@functools.lru_cache(maxsize=16)
def _static_public(private: bytes) -> bytes:
    """A static key's public half, computed once (the server's, for every connection)."""
    return crypto.public_key(private)


class XXHandshake:
    """One side of a Noise XX handshake.

    Drive it with ``write_message(payload)`` / ``read_message(msg)`` in turn (initiator writes
    first). After the third message ``complete`` is true, ``remote_static`` holds the peer's key and
    ``split()`` gives ``(send, receive)`` cipher states.
    """

    def __init__(self, initiator: bool, static_private: bytes, prologue: bytes = b"",
                 ephemeral_private: bytes | None = None):
        self.initiator = initiator
        self.s = static_private
        self.s_pub = _static_public(static_private)
        self._e_fixed = ephemeral_private  # tests only: deterministic vectors
        self.e: bytes | None = None
        self.re: bytes | None = None
        self.remote_static: bytes | None = None
        self.ss = _SymmetricState()
        self.ss.mix_hash(prologue)
        self.step = 0  # messages processed so far
        self.complete = False

    def _my_turn(self) -> bool:
        return (self.step % 2 == 0) == self.initiator

    def _new_ephemeral(self) -> None:
        self.e = self._e_fixed or crypto.generate_private_key()

    def write_message(self, payload: bytes = b"") -> bytes:
        if self.complete or not self._my_turn():
            raise HandshakeError("not our turn to write")
        try:
            return self._write(payload)
        except crypto.DecryptError as e:  # the peer's ephemeral key is a low-order point
            raise HandshakeError(f"handshake failed ({e})") from None

    def _write(self, payload: bytes) -> bytes:
        ss = self.ss
        out = bytearray()
        if self.step == 0:
            self._new_ephemeral()
            e_pub = crypto.public_key(self.e)
            out += e_pub
            ss.mix_hash(e_pub)
        elif self.step == 1:
            self._new_ephemeral()
            e_pub = crypto.public_key(self.e)
            out += e_pub
            ss.mix_hash(e_pub)
            ss.mix_key(crypto.dh(self.e, self.re))            # ee
            out += ss.encrypt_and_hash(self.s_pub)             # s
            ss.mix_key(crypto.dh(self.s, self.re))            # es (responder side)
        else:
            out += ss.encrypt_and_hash(self.s_pub)             # s
            ss.mix_key(crypto.dh(self.s, self.re))            # se (initiator side)
        out += ss.encrypt_and_hash(payload)
        self._advance()
        if len(out) > MAX_MESSAGE:
            raise HandshakeError("handshake message too large")
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        if self.complete or self._my_turn():
            raise HandshakeError("unexpected handshake message")
        ss = self.ss
        try:
            if self.step == 0:
                if len(message) < 32:
                    raise HandshakeError("handshake message 1 too short")
                self.re = message[:32]
                ss.mix_hash(self.re)
                rest = message[32:]
            elif self.step == 1:
                if len(message) < 32 + 48 + 16:
                    raise HandshakeError("handshake message 2 too short")
                self.re = message[:32]
                ss.mix_hash(self.re)
                ss.mix_key(crypto.dh(self.e, self.re))        # ee
                self.remote_static = ss.decrypt_and_hash(message[32:80])
                ss.mix_key(crypto.dh(self.e, self.remote_static))  # es
                rest = message[80:]
            else:
                if len(message) < 48 + 16:
                    raise HandshakeError("handshake message 3 too short")
                self.remote_static = ss.decrypt_and_hash(message[:48])
                ss.mix_key(crypto.dh(self.e, self.remote_static))  # se
                rest = message[48:]
            payload = ss.decrypt_and_hash(rest)
        except crypto.DecryptError as e:
            raise HandshakeError(f"handshake authentication failed ({e})") from None
        self._advance()
        return payload

    def _advance(self) -> None:
        self.step += 1
        if self.step == 3:
            self.complete = True

    def split(self) -> tuple[CipherState, CipherState]:
        """(cipher for sending, cipher for receiving)."""
        if not self.complete:
            raise HandshakeError("handshake not complete")
        c1, c2 = self.ss.split()
        return (c1, c2) if self.initiator else (c2, c1)

    @property
    def handshake_hash(self) -> bytes:
        return self.ss.h

"""mac1 / mac2 and cookie replies: WireGuard's DoS defence for handshakes.

mac1 proves the sender knows our public key, so scanners cannot make us do Curve25519 work. When
under load, a handshake must also carry mac2, a MAC keyed by a cookie that we hand out (encrypted,
bound to the message's mac1) to the source address only; this proves the sender can receive at
that address before we spend any DH on it. The secret behind cookies rotates every two minutes.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Hashable

from overlay import crypto
from overlay.wire.messages import MAC_SIZE, CookieReply, pack_cookie_reply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0
"""Seconds a cookie secret (and a received cookie) stays valid."""


def address_bytes(addr: Hashable) -> bytes:
    """The bytes a cookie is bound to: packed IP and big-endian port for (ip, port), else repr.

    The device treats addresses as opaque (a relay path is not an IP endpoint); only this module
    needs bytes from them, and only to tell sources apart.
    """
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str) and isinstance(addr[1], int):
        try:
            return ipaddress.ip_address(addr[0]).packed + (addr[1] & 0xFFFF).to_bytes(2, "big")
        except ValueError:
            pass
    return repr(addr).encode()


def _mac_offsets(msg: bytes | bytearray | memoryview) -> tuple[int, int]:
    off = len(msg) - 2 * MAC_SIZE
    return off, off + MAC_SIZE


class CookieChecker:
    """Our side: checks mac1/mac2 of incoming handshake messages, issues cookie replies."""

    def __init__(self, local_public: bytes):
        self._mac1_key = crypto.blake2s(LABEL_MAC1, local_public)
        self._cookie_key = crypto.blake2s(LABEL_COOKIE, local_public)
        self._secret = b""
        self._secret_time = float("-inf")

    def check_mac1(self, msg: bytes | memoryview) -> bool:
        m1, m2 = _mac_offsets(msg)
        return crypto.constant_time_eq(crypto.mac(self._mac1_key, msg[:m1]), bytes(msg[m1:m2]))

    def check_mac2(self, msg: bytes | memoryview, addr: Hashable, now: float) -> bool:
        if now - self._secret_time > COOKIE_REFRESH_TIME:
            return False
        _, m2 = _mac_offsets(msg)
        cookie = crypto.mac(self._secret, address_bytes(addr))
        return crypto.constant_time_eq(crypto.mac(cookie, msg[:m2]), bytes(msg[m2:]))

    def create_reply(self, msg: bytes | memoryview, receiver: int, addr: Hashable, now: float) -> bytes:
        """A cookie reply to ``msg`` (whose sender index is ``receiver``) for source ``addr``."""
        if now - self._secret_time > COOKIE_REFRESH_TIME:
            self._secret = os.urandom(32)
            self._secret_time = now
        m1, m2 = _mac_offsets(msg)
        cookie = crypto.mac(self._secret, address_bytes(addr))
        nonce = os.urandom(24)
        encrypted = crypto.xaead_encrypt(self._cookie_key, nonce, cookie, bytes(msg[m1:m2]))
        return pack_cookie_reply(receiver, nonce, encrypted)


class CookieGenerator:
    """Per peer: stamps mac1 (and mac2 while we hold a fresh cookie) on our handshake messages."""

    def __init__(self, remote_public: bytes):
        self._mac1_key = crypto.blake2s(LABEL_MAC1, remote_public)
        self._cookie_key = crypto.blake2s(LABEL_COOKIE, remote_public)
        self._last_mac1: bytes | None = None
        self._cookie = b""
        self._cookie_time = float("-inf")

    def add_macs(self, msg: bytearray, now: float) -> None:
        m1, m2 = _mac_offsets(msg)
        view = memoryview(msg)
        mac1 = crypto.mac(self._mac1_key, view[:m1])
        msg[m1:m2] = mac1
        self._last_mac1 = mac1
        if now - self._cookie_time <= COOKIE_REFRESH_TIME:
            msg[m2:] = crypto.mac(self._cookie, view[:m2])
        view.release()

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Decrypt and keep the cookie; False if it does not answer our last handshake message."""
        if self._last_mac1 is None:
            return False
        try:
            self._cookie = crypto.xaead_decrypt(self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1)
        except crypto.DecryptError:
            return False
        self._cookie_time = now
        return True

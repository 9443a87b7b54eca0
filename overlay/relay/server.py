"""The relay's forwarding logic, sans-I/O: who is at which UDP address, who may talk to whom, caps.

A node claims a UDP address by sending REGISTER with a nonce the server bound to that address
(``nonce_for``, valid one to two minutes) and a proof keyed by the relay secret the server gave
it over the authenticated control channel (``token_for(key)``: a keyed hash, so nothing per node
is stored); see frames.py. A replayed REGISTER from another address only earns a CHALLENGE.
DATA is forwarded only between registered nodes that share a network (``may_relay``), within a
per-source token bucket (bytes/s). Registrations expire unless refreshed (nodes re-register every
few seconds, which also keeps their NAT mapping toward the server alive).

The secret derives from the server's long-term key (``relay_secret``), which every instance of one
deployment shares: a node's token and the nonces are valid on each of them, so a node registers at
another instance's relay with the token its own instance gave it (a pair of nodes on two instances
relays through one of them; overlay/node/server_path.py).
"""

from __future__ import annotations

import hmac
import os
from typing import Callable

from overlay.relay import frames
from overlay.tokenbucket import TokenBucket

REGISTRATION_TTL = 90.0
NONCE_PERIOD = 60.0      # a nonce is good for the minute it was made in and the next
DEFAULT_RATE = 2 * 1024 * 1024  # bytes per second per node
MAX_REGISTRATIONS = 100_000


def relay_secret(server_private_key: bytes) -> bytes:
    """The relay secret of a server key: the same on every instance of one deployment (they share
    the key), and across restarts; a one-way function of the key, never the key itself."""
    return hmac.digest(server_private_key, b"overlay relay secret", "blake2s")


class RelayServer:
    def __init__(self, may_relay: Callable[[bytes, bytes], bool], *, rate: float = DEFAULT_RATE,
                 secret: bytes | None = None):
        self.may_relay = may_relay
        self.rate = float(rate)
        self.burst = max(self.rate, 256 * 1024.0)
        self._secret = secret or os.urandom(32)
        self._nonce_key = hmac.digest(self._secret, b"overlay relay nonce", "blake2s")
        self.addr_of: dict[bytes, tuple] = {}        # key -> UDP address
        self.key_at: dict[tuple, bytes] = {}         # UDP address -> key
        self.seen: dict[bytes, float] = {}
        self.tcp_sinks: dict[bytes, Callable[[bytes, bytes], None]] = {}  # key -> send(src, payload)
        self._buckets: dict[bytes, TokenBucket] = {}
        self.stats = {"forwarded": 0, "bytes": 0, "refused": 0, "malformed": 0, "capped": 0, "challenged": 0}

    def token_for(self, key: bytes) -> bytes:
        """The node's relay secret: sent to it over the control channel, never on the wire."""
        return hmac.digest(self._secret, key, "blake2s")[:frames.TOKEN_LEN]

    def nonce_for(self, addr: tuple, now: float, epoch: int | None = None) -> bytes:
        e = (int(now // NONCE_PERIOD) if epoch is None else epoch) & 0xFFFFFFFF
        eb = e.to_bytes(4, "big")
        where = f"{addr[0]}|{addr[1]}".encode()
        return eb + hmac.digest(self._nonce_key, eb + where, "blake2s")[:frames.NONCE_LEN - 4]

    def _nonce_ok(self, nonce: bytes, addr: tuple, now: float) -> bool:
        e = int.from_bytes(nonce[:4], "big")
        cur = int(now // NONCE_PERIOD) & 0xFFFFFFFF
        if e not in (cur, (cur - 1) & 0xFFFFFFFF):
            return False
        return hmac.compare_digest(nonce, self.nonce_for(addr, now, e))

    # ------------------------------------------------------------------ UDP side
    def receive(self, datagram: bytes, addr: tuple, now: float) -> list[tuple[bytes, tuple]]:
        """A relay frame from ``addr``; returns datagrams to send as (data, addr)."""
        try:
            t, key, rest = frames.parse(datagram)
        except frames.FrameError:
            self.stats["malformed"] += 1
            return []
        if t == frames.REGISTER:
            nonce, proof = rest[:frames.NONCE_LEN], rest[frames.NONCE_LEN:]
            if not self._nonce_ok(nonce, addr, now):   # first contact, stale, or replayed from elsewhere
                self.stats["challenged"] += 1
                return [(frames.challenge(self.nonce_for(addr, now)), addr)]
            if not hmac.compare_digest(proof, frames.register_proof(self.token_for(key), key, nonce)):
                self.stats["refused"] += 1
                return []
            self._register(key, addr, now)
            return [(frames.registered(), addr)]
        if t != frames.DATA:
            return []
        src = self.key_at.get(addr)
        if src is None:
            self.stats["refused"] += 1
            return [(frames.refused(key, frames.REASON_NOT_REGISTERED), addr)]
        self.seen[src] = now
        out: list[tuple[bytes, tuple]] = []
        self.forward(src, key, rest, now, out, reply_to=addr)
        return out

    def forward(self, src: bytes, dst: bytes, payload: bytes, now: float,
                out: list[tuple[bytes, tuple]], reply_to: tuple | None = None) -> bool:
        """Forward ``payload`` from ``src`` to ``dst`` over UDP (appended to ``out``) or the TCP sink."""
        if not self.may_relay(src, dst):
            self.stats["refused"] += 1
            if reply_to is not None:
                out.append((frames.refused(dst, frames.REASON_NOT_PEER), reply_to))
            return False
        if not self._spend(src, len(payload), now):
            self.stats["capped"] += 1
            return False
        addr = self.addr_of.get(dst)
        if addr is not None and now - self.seen.get(dst, 0) <= REGISTRATION_TTL:
            out.append((frames.data(src, payload), addr))
        elif dst in self.tcp_sinks:
            self.tcp_sinks[dst](src, payload)
        else:
            self.stats["refused"] += 1
            if reply_to is not None:
                out.append((frames.refused(dst, frames.REASON_NOT_REGISTERED), reply_to))
            return False
        self.stats["forwarded"] += 1
        self.stats["bytes"] += len(payload)
        return True

    def _spend(self, key: bytes, n: int, now: float) -> bool:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return b.take(now, n)

    def _register(self, key: bytes, addr: tuple, now: float) -> None:
        old = self.addr_of.get(key)
        if old is not None and old != addr:
            self.key_at.pop(old, None)
        if key not in self.addr_of and len(self.addr_of) >= MAX_REGISTRATIONS:
            self.expire(now)
            if len(self.addr_of) >= MAX_REGISTRATIONS:
                return
        prev = self.key_at.get(addr)
        if prev is not None and prev != key:
            self.addr_of.pop(prev, None)
        self.addr_of[key] = addr
        self.key_at[addr] = key
        self.seen[key] = now

    def expire(self, now: float) -> None:
        for key, t in list(self.seen.items()):
            if now - t > REGISTRATION_TTL:
                self.forget(key)

    def forget(self, key: bytes) -> None:
        addr = self.addr_of.pop(key, None)
        if addr is not None and self.key_at.get(addr) == key:
            del self.key_at[addr]
        self.seen.pop(key, None)
        self._buckets.pop(key, None)

    def udp_address(self, key: bytes) -> tuple | None:
        return self.addr_of.get(key)

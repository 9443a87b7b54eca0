"""Per-peer state: identity, endpoint, handshake, keypairs, staged packets, timer deadlines.

Timers are absolute deadlines on the caller's clock (None = not armed); the device checks them in
``handle_timer``, so hours of simulated time cost nothing but the events they cause.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from overlay.wire.cookie import CookieGenerator
from overlay.wire.handshake import Handshake
from overlay.wire.keypair import Keypairs

MAX_STAGED_PACKETS = 128
"""Packets kept while a handshake is in flight; the oldest are dropped beyond this (as wireguard-go)."""


class Peer:
    __slots__ = (
        "public_key", "endpoint", "persistent_keepalive", "handshake", "cookies", "keypairs", "staged",
        "retransmit_at", "send_keepalive_at", "new_handshake_at", "zero_keys_at", "persistent_keepalive_at",
        "need_another_keepalive", "handshake_attempts", "sent_last_minute_handshake",
        "last_handshake", "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "plaintext",
    )

    def __init__(
        self, local_private: bytes, public_key: bytes, preshared_key: bytes,
        endpoint: Hashable | None, persistent_keepalive: float | None,
    ):
        self.public_key = public_key
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive or 0.0
        self.handshake = Handshake(local_private, public_key, preshared_key)
        self.cookies = CookieGenerator(public_key)
        self.keypairs = Keypairs()
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)
        self.retransmit_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        # A peer configured with a persistent keepalive opens its NAT mapping at once (wireguard-go
        # sends a keepalive when the option is set on a running device).
        self.persistent_keepalive_at: float | None = (
            float("-inf") if self.persistent_keepalive and endpoint is not None else None
        )
        self.need_another_keepalive = False
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake: float | None = None
        self.rx_bytes = self.tx_bytes = self.rx_packets = self.tx_packets = 0
        self.plaintext = False   # unencrypted network: authenticated payloads, not encrypted

    def next_deadline(self) -> float | None:
        deadlines = [
            t for t in (self.retransmit_at, self.send_keepalive_at, self.new_handshake_at,
                        self.zero_keys_at, self.persistent_keepalive_at)
            if t is not None
        ]
        return min(deadlines) if deadlines else None

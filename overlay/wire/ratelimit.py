"""Per-source token buckets for handshakes under load (wireguard-go's ratelimiter.go).

Cookies prove a source can receive at its address; this then caps how much Curve25519 work one
source IP can make us do while we are under load: 20 handshakes/s, bursts of 5.
"""

from __future__ import annotations

from collections.abc import Hashable

from overlay.tokenbucket import TokenBucket

PACKETS_PER_SECOND = 20.0
PACKETS_BURSTABLE = 5.0
MAX_SOURCES = 65536
"""Tracked sources; beyond this, idle buckets are purged and new sources refused until some are."""


def source_key(addr: Hashable) -> Hashable:
    """The IP of an (ip, port, ...) address, so one host cannot multiply its budget with ports."""
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return addr[0]
    return addr


class RateLimiter:
    __slots__ = ("_buckets", "rate", "burst", "_purged")

    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: float = PACKETS_BURSTABLE) -> None:
        self._buckets: dict[Hashable, TokenBucket] = {}
        self.rate, self.burst = rate, burst
        self._purged = float("-inf")

    def allow(self, addr: Hashable, now: float) -> bool:
        key = source_key(addr)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES and not self._purge(now):
                return False
            self._buckets[key] = TokenBucket(self.rate, self.burst, now, self.burst - 1.0)
            return True
        return bucket.take(now)

    def _purge(self, now: float) -> bool:
        """Forget buckets that have refilled completely; True if room was made. At most once per
        refill time: a flood from ever new addresses must not make every datagram scan the table."""
        refill = self.burst / self.rate
        if now - self._purged < refill:
            return False
        self._purged = now
        for key in [k for k, b in self._buckets.items() if now - b.at >= refill]:
            del self._buckets[key]
        return len(self._buckets) < MAX_SOURCES

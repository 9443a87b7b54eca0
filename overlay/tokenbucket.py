"""The one token bucket: ``burst`` at once, then ``rate`` a second (sans-I/O: the caller passes ``now``).

Used wherever something is rate limited: group (broadcast) packets per peer, relayed bytes per
node, server requests per connection, traversal probes per peer, handshakes per source, log lines
per kind. A table of buckets keyed by source (bounded) is ``overlay.wire.ratelimit``'s business;
each entry there is one of these.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float = 0.0, tokens: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst if tokens is None else tokens
        self.at = now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (refills; takes nothing)."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many at ``now``; False (nothing spent) if not."""
        if self.level(now) < n:
            return False
        self.tokens -= n
        return True

    def full(self, now: float) -> bool:
        """Refilled completely (an idle bucket a table may forget)."""
        return self.level(now) >= self.burst

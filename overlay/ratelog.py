"""Rate-limited logging for lines that one event each can trigger (a connection, a packet, a datagram).

Anyone who can open connections can make the server log; a line per event turns a flood into
hundreds of megabytes of log. ``LogLimiter`` gives each kind of line (its format string, not its
arguments: the table stays bounded) a token bucket: ``burst`` lines at once, then ``rate`` per
second; the next line that passes says how many of its kind were suppressed meanwhile.
Sans-I/O: the caller passes ``now``. Shared by the server, the node and the proxy (it lives in
neither, so the server does not depend on the proxy).
"""

from __future__ import annotations

import logging
import time

from overlay.tokenbucket import TokenBucket


class LogLimiter:
    def __init__(self, rate: float = 1.0, burst: float = 20.0, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, list] = {}      # kind -> [TokenBucket, suppressed]

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """Whether a line of ``kind`` may be written now, and how many were suppressed before it."""
        b = self._buckets.get(kind)
        if b is None:
            if len(self._buckets) > 1000:       # kinds are format strings: this never happens
                self._buckets.clear()
            b = self._buckets[kind] = [TokenBucket(self.rate, self.burst, now), 0]
        if not b[0].take(now):
            b[1] += 1
            return False, 0
        suppressed, b[1] = b[1], 0
        return True, suppressed

    def log(self, logger: logging.Logger, level: int, msg: str, *args, exc_info=None) -> bool:
        """``logger.log(level, msg, *args)`` unless lines of this kind (``msg``) are over their rate."""
        if not logger.isEnabledFor(level):
            return False
        ok, suppressed = self.allow(msg, self.clock())
        if ok:
            if suppressed:
                msg = msg + " (%d similar lines suppressed)"
                args = (*args, suppressed)
            logger.log(level, msg, *args, exc_info=exc_info)
        return ok

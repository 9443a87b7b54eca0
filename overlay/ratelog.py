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


class LogLimiter:
    def __init__(self, rate: float = 1.0, burst: float = 20.0, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, list] = {}      # kind -> [tokens, last, suppressed]

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """Whether a line of ``kind`` may be written now, and how many were suppressed before it."""
        b = self._buckets.get(kind)
        if b is None:
            if len(self._buckets) > 1000:       # kinds are format strings: this never happens
                self._buckets.clear()
            b = self._buckets[kind] = [self.burst, now, 0]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] < 1.0:
            b[2] += 1
            return False, 0
        b[0] -= 1.0
        suppressed, b[2] = b[2], 0
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

"""A log line that cannot flood: at most ``burst`` lines per ``interval`` seconds per limiter, the
number held back reported with the next line let through. For paths run per packet or per
datagram, where one misbehaving peer or application could otherwise write a line per packet."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._window = -float("inf")
        self._count = 0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log unless this limiter already logged ``burst`` lines this interval; True if logged."""
        now = self._clock()
        if now - self._window >= self._interval:
            self._window = now
            self._count = 0
        if self._count >= self._burst:
            self.suppressed += 1
            return False
        self._count += 1
        if self.suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._log.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

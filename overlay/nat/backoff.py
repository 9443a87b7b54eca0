"""Back-off between hard-NAT punching attempts (birthday, sequential windows): after a failed
attempt wait ``initial``, doubling up to ``maximum``; a success resets it."""

from __future__ import annotations


class Backoff:
    __slots__ = ("initial", "maximum", "not_before", "_delay")

    def __init__(self, initial: float, maximum: float):
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum back-off")
        self.initial, self.maximum = initial, maximum
        self.not_before = float("-inf")   # no new attempt before this time
        self._delay = initial

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def succeeded(self, now: float) -> None:
        self._delay = self.initial
        self.not_before = now

    def failed(self, now: float) -> None:
        self.not_before = now + self._delay
        self._delay = min(self._delay * 2, self.maximum)

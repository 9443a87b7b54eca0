"""Sender side SACK scoreboard (RFC 2018 / RFC 6675): which bytes above ``snd_una`` the peer holds.

Sequence numbers are unwrapped ints. The scoreboard is a sorted list of disjoint
``[start, end)`` ranges, bounded in count (a peer reports at most 4 blocks per ACK; we keep
the highest ranges when a hostile peer fragments the space). The sender uses it to skip data the
peer already has and to find the holes to retransmit during recovery.
"""

from __future__ import annotations


class SackScoreboard:
    __slots__ = ("ranges", "sacked_bytes", "max_ranges")

    def __init__(self, max_ranges: int = 64):
        self.ranges: list[list[int]] = []
        self.sacked_bytes = 0
        self.max_ranges = max_ranges

    @property
    def high(self) -> int | None:
        """End of the highest SACKed range (None if nothing is SACKed)."""
        return self.ranges[-1][1] if self.ranges else None

    def add(self, start: int, end: int) -> bool:
        """Record a SACKed range; True if it covered bytes not known before."""
        if end <= start:
            return False
        ranges = self.ranges
        before = self.sacked_bytes
        i = 0
        n = len(ranges)
        while i < n and ranges[i][1] < start:
            i += 1
        j = i
        new_s, new_e = start, end
        while j < n and ranges[j][0] <= end:
            new_s = min(new_s, ranges[j][0])
            new_e = max(new_e, ranges[j][1])
            self.sacked_bytes -= ranges[j][1] - ranges[j][0]
            j += 1
        ranges[i:j] = [[new_s, new_e]]
        self.sacked_bytes += new_e - new_s
        if len(ranges) > self.max_ranges:
            lo = ranges.pop(0)
            self.sacked_bytes -= lo[1] - lo[0]
        return self.sacked_bytes > before

    def advance(self, snd_una: int) -> None:
        """Forget everything below the cumulative ACK."""
        ranges = self.ranges
        while ranges and ranges[0][0] < snd_una:
            r = ranges[0]
            if r[1] <= snd_una:
                self.sacked_bytes -= r[1] - r[0]
                ranges.pop(0)
            else:
                self.sacked_bytes -= snd_una - r[0]
                r[0] = snd_una
                break

    def sacked_below(self, seq: int) -> int:
        """SACKed bytes below ``seq``."""
        total = 0
        for s, e in self.ranges:
            if s >= seq:
                break
            total += min(e, seq) - s
        return total

    def next_unsacked(self, seq: int) -> tuple[int, int | None]:
        """First unSACKed sequence at or after ``seq`` and where the next SACKed range starts
        (None if no SACKed range follows)."""
        for s, e in self.ranges:
            if e <= seq:
                continue
            if s <= seq:
                seq = e
                continue
            return seq, s
        return seq, None

    def clear(self) -> None:
        self.ranges.clear()
        self.sacked_bytes = 0

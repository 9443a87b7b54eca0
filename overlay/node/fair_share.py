"""Per-member shares of a bounded table, so one member cannot starve the others (sans-I/O).

A gateway's tables (echo flows and echo requests in flight, UDP flows, TCP dials to the LAN in
flight) are bounded, and the bound must not be one member's to exhaust. ``FairShare`` counts a
table's entries per owner (the member's virtual IP) and, when the table is full, says who makes
room for a new entry: the owner holding the most entries gives up one (the table picks which,
its oldest), unless the newcomer would then hold as many as that owner, in which case the new
entry is refused. A member alone may use the whole table; any other member gets room as soon as
it asks, up to an equal share of it.
"""

from __future__ import annotations

from collections.abc import Hashable


class FairShare:
    __slots__ = ("capacity", "counts", "total")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.counts: dict[Hashable, int] = {}
        self.total = 0

    def room_for(self, owner: Hashable) -> tuple[bool, Hashable | None]:
        """(admit a new entry of ``owner``?, the owner that must first give up one entry, or None)."""
        if self.total < self.capacity:
            return True, None
        counts = self.counts
        top = max(counts, key=counts.__getitem__)
        if counts.get(owner, 0) + 1 < counts[top]:
            return True, top
        return False, None

    def add(self, owner: Hashable) -> None:
        self.counts[owner] = self.counts.get(owner, 0) + 1
        self.total += 1

    def remove(self, owner: Hashable) -> None:
        n = self.counts.get(owner, 0)
        if n <= 1:
            self.counts.pop(owner, None)
        else:
            self.counts[owner] = n - 1
        if n:
            self.total -= 1

    def __len__(self) -> int:
        return self.total

"""Presence changes of a big network in a storm, coalesced per window (sans-I/O: ``now`` is passed).

A presence change (a member's hello or departure) is normally pushed to the network's members
at once, one record each. When every node comes back after a server restart,
that is every member's record to every member: O(members) messages per member. So for networks of
more than ``COALESCE_ABOVE`` members, a token bucket per network (``BURST`` changes at once, then
``RATE`` a second) lets quiet-time changes through at once, and beyond it the changes are held:
the network's members get them together when its window (``window_for``: 0.2 s for 100 members,
growing to 0.5 s from 1,000) ends, built from the state at that moment (the last state wins,
nothing is lost). A node's own ``presence`` request (going away in one network) is not held: it
is rate limited per connection, and no storm is made of it. ``Mediator.flush_presence`` sends the
held changes: one ``presence`` event (a bitmap, overlay/control/resync.py) to members that
understand it, the changed records to the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.tokenbucket import TokenBucket

COALESCE_ABOVE = 100      # networks up to this many members get every change at once
BURST = 20                # changes per network sent at once before coalescing starts ...
RATE = 2.0                # ... and per second after


def window_for(size: int) -> float:
    """How long a big network's changes are held in a storm: 0.2 s at 100 members to 0.5 s at 1,000."""
    return 0.2 + 0.3 * min(1.0, size / 1000)


@dataclass
class _Network:
    bucket: TokenBucket
    pending: dict[bytes, None] = field(default_factory=dict)   # members whose change waits (in order)
    due: float = 0.0


class PresenceCoalescer:
    def __init__(self) -> None:
        self._nets: dict[str, _Network] = {}
        self.held = 0          # changes held for a window (for tests and figures)
        self.flushes = 0

    def change(self, network: str, key: bytes, size: int, now: float) -> bool:
        """``key``'s presence changed in ``network`` (``size`` members): True to send it now, False
        if it is held (``take_due`` returns it when its window ends)."""
        if size <= COALESCE_ABOVE:
            return True
        st = self._nets.get(network)
        if st is None:
            if len(self._nets) > 10_000:     # bounded: idle networks are forgotten
                self._nets = {n: s for n, s in self._nets.items() if s.pending or not s.bucket.full(now)}
            st = self._nets[network] = _Network(TokenBucket(RATE, BURST, now))
        if not st.pending:
            if st.bucket.take(now):
                return True
            st.due = now + window_for(size)
        st.pending[key] = None
        self.held += 1
        return False

    def due(self) -> float | None:
        """When the next held changes must go out (None: nothing held)."""
        return min((s.due for s in self._nets.values() if s.pending), default=None)

    def take_due(self, now: float) -> list[tuple[str, list[bytes]]]:
        """The networks whose window ended, with the members whose changes were held there."""
        out = []
        for name, st in self._nets.items():
            if st.pending and st.due <= now:
                out.append((name, list(st.pending)))
                st.pending = {}
                self.flushes += 1
        return out

    def forget(self, network: str) -> None:
        self._nets.pop(network, None)

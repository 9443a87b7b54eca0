"""Which control connections the server keeps when too many arrive (sans-I/O).

Every connection costs the server a file descriptor and some memory, and anyone can open them:
without limits, ~1,000 connections from fresh keys exhaust the common descriptor limit of 1,024
and lock every real node out. So:

- **per source address**: at most ``per_source`` connections from one IP address (many nodes
  behind one NAT are fine; one host holding hundreds is not);
- **global**: at most ``max_conns`` connections, set below the process's descriptor limit so the
  server keeps descriptors for its database, sockets and logs;
- **shedding**: a new connection that would exceed a cap is admitted by closing another one, in
  this order: (1) a connection that has not completed its handshake and hello, (2) a "stranger"
  (said hello but belongs to no network and asked to join none); within a tier, one from the
  address holding most connections of that tier, and of those the oldest (unauthenticated) or
  the one idle longest (strangers). Only if neither tier has one is the new connection refused.
  Members of a network are never shed for a newcomer: once a node has joined, a flood cannot
  push it out.

A newcomer is always admitted while strangers or unauthenticated connections exist, and it is
shed only after every address flooding the server is down to its own one or two connections, so
a real node gets in during a flood, has time to join, and keeps its place once it has.

The glue (overlay/server/app.py) calls ``admit`` on accept, ``registered`` after hello and after
requests that change membership, ``touch`` on requests other than ping, and ``closed``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

UNAUTH, STRANGER, MEMBER = "unauth", "stranger", "member"

DEFAULT_MAX_CONNS = 10_000
DEFAULT_PER_SOURCE = 64
FD_RESERVE = 64           # descriptors kept for everything but control connections


def max_conns_for(nofile: int, wanted: int = DEFAULT_MAX_CONNS) -> int:
    """The connection cap that leaves ``FD_RESERVE`` (or an eighth) of ``nofile`` descriptors free."""
    return max(1, min(wanted, nofile - max(FD_RESERVE, nofile // 8)))


class _Tier:
    """Connections of one kind, per source address in shedding order, and the address holding
    most of them found in O(1) (addresses bucketed by their count)."""

    def __init__(self):
        self.by_src: dict[str, OrderedDict] = {}
        self._buckets: dict[int, dict[str, None]] = {}    # count -> addresses, in order of arrival
        self._max = 0

    def _move(self, src: str, old: int, new: int) -> None:
        if old:
            b = self._buckets[old]
            del b[src]
            if not b:
                del self._buckets[old]
        if new:
            self._buckets.setdefault(new, {})[src] = None
            self._max = max(self._max, new)
        while self._max and self._max not in self._buckets:
            self._max -= 1

    def add(self, conn: Hashable, src: str) -> None:
        same = self.by_src.setdefault(src, OrderedDict())
        same[conn] = None
        self._move(src, len(same) - 1, len(same))

    def remove(self, conn: Hashable, src: str) -> None:
        same = self.by_src[src]
        del same[conn]
        self._move(src, len(same) + 1, len(same))
        if not same:
            del self.by_src[src]

    def touch(self, conn: Hashable, src: str) -> None:
        same = self.by_src[src]
        same.move_to_end(conn)
        bucket = self._buckets[len(same)]        # among equals, this address is now the last to shed
        del bucket[src]
        bucket[src] = None

    def heaviest(self) -> str | None:
        return next(iter(self._buckets[self._max])) if self._max else None


class Admission:
    def __init__(self, max_conns: int = DEFAULT_MAX_CONNS, per_source: int = DEFAULT_PER_SOURCE):
        self.max_conns = max_conns
        self.per_source = per_source
        self._state: dict[Hashable, str] = {}
        self._source: dict[Hashable, str] = {}
        self._tiers = {UNAUTH: _Tier(), STRANGER: _Tier(), MEMBER: _Tier()}
        self._per_source: dict[str, int] = {}
        self.shed = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._state)

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def state(self, conn: Hashable) -> str | None:
        return self._state.get(conn)

    # ------------------------------------------------------------------ events
    def admit(self, conn: Hashable, source: str,
              still_stranger: Callable[[Hashable], bool] = lambda c: True) -> tuple[bool, list]:
        """A new connection from ``source``: ``(admitted, connections to close now)``.

        ``still_stranger(c)`` re-checks a stranger before it is shed (it may have been approved
        into a network since its last request); one that is not becomes a member.
        """
        victim = None
        if self.count(source) >= self.per_source:
            victim = self._pick(source, still_stranger)
        elif len(self._state) >= self.max_conns:
            victim = self._pick(None, still_stranger)
        else:
            self._add(conn, source, UNAUTH)
            return True, []
        if victim is None:
            self.refused += 1
            return False, []
        self.closed(victim)
        self.shed += 1
        self._add(conn, source, UNAUTH)
        return True, [victim]

    def registered(self, conn: Hashable, member: bool) -> None:
        """Hello accepted (or membership changed): a member, or a stranger."""
        old = self._state.get(conn)
        if old is None:
            return
        new = MEMBER if member else STRANGER
        src = self._source[conn]
        self._tiers[old].remove(conn, src)
        self._tiers[new].add(conn, src)
        self._state[conn] = new

    def touch(self, conn: Hashable) -> None:
        """A request other than ping: not idle (moves to the back of its shedding order)."""
        st = self._state.get(conn)
        if st is not None:
            self._tiers[st].touch(conn, self._source[conn])

    def closed(self, conn: Hashable) -> None:
        st = self._state.pop(conn, None)
        if st is None:
            return
        src = self._source.pop(conn)
        self._tiers[st].remove(conn, src)
        n = self._per_source[src] - 1
        if n:
            self._per_source[src] = n
        else:
            del self._per_source[src]

    def _add(self, conn: Hashable, source: str, state: str) -> None:
        self._state[conn] = state
        self._source[conn] = source
        self._tiers[state].add(conn, source)
        self._per_source[source] = self._per_source.get(source, 0) + 1

    # ------------------------------------------------------------------ choice
    def _pick(self, source: str | None, still_stranger: Callable[[Hashable], bool]) -> Hashable | None:
        """The connection to shed: from ``source``, or from the address holding most of a tier."""
        for name in (UNAUTH, STRANGER):
            tier = self._tiers[name]
            while True:
                src = source if source is not None else tier.heaviest()
                same = tier.by_src.get(src) if src is not None else None
                if not same:
                    break
                c = next(iter(same))
                if name == UNAUTH or still_stranger(c):
                    return c
                self.registered(c, member=True)
        return None

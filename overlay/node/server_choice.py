"""Which mediation server a node tries next, and how long it waits first (sans-I/O).

The node is given servers in order of preference (``--server A:P,B:P``). It starts with the
first and stays on the one that works. When a session that was established ends (the connection
was lost, the keepalive went unanswered), the node moves on to the next server of the list at
once (after the short first back-off step): the servers of one deployment share their state, so
the node keeps its virtual IP there. An attempt that fails (refused, timed out, a wrong key)
moves on to the next server without waiting; only once every server has failed in a row does the
node wait, with the exponential back-off and jitter a single server always had (``BACKOFF_MIN``
doubling up to ``BACKOFF_MAX``; ``FATAL_RETRY`` when every server refused this node or showed a
wrong key). With one server this is exactly the old behaviour.

Fed ``now`` (the loop's clock) and a jitter function, so it is tested without sockets or sleeps.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
FATAL_RETRY = 30.0       # wrong server key, name taken, hello refused: retry slowly
HISTORY = 16             # the last switches kept for status and tests


@dataclass(frozen=True)
class Switch:
    at: float
    old: str
    new: str
    why: str


class ServerChoice:
    def __init__(self, servers: tuple[str, ...] | list[str], *, backoff_min: float = BACKOFF_MIN,
                 backoff_max: float = BACKOFF_MAX, fatal_retry: float = FATAL_RETRY,
                 jitter: Callable[[float, float], float] = random.uniform):
        if not servers:
            raise ValueError("no server")
        self.servers = tuple(servers)
        self.backoff_min, self.backoff_max, self.fatal_retry = backoff_min, backoff_max, fatal_retry
        self.jitter = jitter
        self.index = 0                    # the server in use, or the one to try next
        self.backoff = backoff_min        # the next wait after a whole round failed
        self.failed_in_row = 0            # attempts failed since the last session or the last wait
        self.all_fatal = True             # every failure of this round was fatal
        self.in_use: str | None = None    # the server of the established session, if any
        self.connected_at: float | None = None
        self.switches: deque[Switch] = deque(maxlen=HISTORY)
        self.switch_count = 0

    @property
    def current(self) -> str:
        """The server to connect to (or connected to)."""
        return self.servers[self.index]

    def connected(self, now: float) -> None:
        """A session with ``current`` is established (its hello was answered)."""
        self.in_use = self.current
        self.connected_at = now
        self.backoff = self.backoff_min
        self.failed_in_row = 0
        self.all_fatal = True

    def ended(self, now: float, *, established: bool, fatal: bool = False, why: str = "") -> float:
        """The session or attempt on ``current`` ended: ``established`` if it had said hello.
        Moves ``current`` on when that is due; returns the seconds to wait before the next attempt."""
        self.in_use = None
        if established:
            self.backoff = self.backoff_min
            self.failed_in_row = 0
            self.all_fatal = True
            self._advance(now, why or "the session ended")
            return self._wait_backoff()
        self.failed_in_row += 1
        self.all_fatal = self.all_fatal and fatal
        self._advance(now, why or "the attempt failed")
        if self.failed_in_row < len(self.servers):
            return 0.0                    # the next server of this round, at once
        self.failed_in_row = 0            # a whole round failed: wait, then start again where it started
        all_fatal, self.all_fatal = self.all_fatal, True
        if all_fatal:
            return self.fatal_retry
        return self._wait_backoff()

    def _wait_backoff(self) -> float:
        delay = self.backoff * self.jitter(0.5, 1.5)
        self.backoff = min(self.backoff_max, self.backoff * 2)
        return delay

    def _advance(self, now: float, why: str) -> None:
        if len(self.servers) == 1:
            return
        old = self.current
        self.index = (self.index + 1) % len(self.servers)
        self.switches.append(Switch(now, old, self.current, why))
        self.switch_count += 1

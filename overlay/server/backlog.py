"""How many connections may have output piling up before new hellos wait (sans-I/O: ``now`` is passed).

A hello answered with full snapshots (a node that holds nothing yet, or one from before
resynchronisation) puts its network's records in the connection's write buffer: 150 KB for a
network of 1,000. When every node connects at once, the server makes them faster than the nodes
read them and the buffers hold the storm (hundreds of MB). The glue (overlay/server/app.py) tells
this table when a connection's buffer crosses the transport's high-water mark (``paused``) and
when it drained (``resumed``); while ``MAX_BACKLOGGED`` connections are backlogged, a new hello
waits (in arrival order, at most ``MAX_WAIT`` s) for one to drain. A connection backlogged for
longer than ``STALE`` s (a node that does not read) stops counting, so a few stuck readers
cannot hold everyone's hello.
"""

from __future__ import annotations

MAX_BACKLOGGED = 256      # connections over the high-water mark before hellos wait
STALE = 5.0               # backlogged this long: no longer counted
MAX_WAIT = 2.0            # the longest a hello waits for a slot


class OutputBacklog:
    def __init__(self, limit: int = MAX_BACKLOGGED, stale: float = STALE):
        self.limit = limit
        self.stale = stale
        self._since: dict[object, float] = {}    # backlogged connection -> since when (in that order)
        self.waited = 0                          # hellos that waited (for figures)

    def paused(self, conn: object, now: float) -> None:
        self._since.pop(conn, None)
        self._since[conn] = now

    def resumed(self, conn: object) -> None:
        self._since.pop(conn, None)

    def busy(self, now: float) -> bool:
        """Too many connections backlogged for a new hello to add its snapshots now."""
        if len(self._since) < self.limit:
            return False
        for conn, since in list(self._since.items()):    # oldest first: drop the stale ones
            if now - since < self.stale:
                break
            del self._since[conn]
        return len(self._since) >= self.limit

    def __len__(self) -> int:
        return len(self._since)

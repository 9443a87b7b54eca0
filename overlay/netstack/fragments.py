"""Bounded IPv4 reassembly (RFC 791, RFC 815); sans-I/O, time passed in by the caller.

Fragments are keyed by (source, destination, protocol, identification). Limits keep a flood of
fragments that never complete from costing more than a fixed amount of memory, as Linux's
``ipfrag_*`` settings do:

- at most ``max_datagrams`` datagrams in reassembly and ``max_bytes`` held in all (payload plus a
  per-fragment overhead, so tiny fragments count too); a new datagram that does not fit evicts the
  oldest ones;
- at most ``max_fragments`` fragments per datagram;
- a datagram not complete ``timeout`` seconds after its first fragment is dropped (Linux's
  ``ipfrag_time``, 30 s);
- overlapping fragments drop the whole datagram, as Linux does since the FragmentSmack fixes
  (RFC 5722 for IPv6 says the same); an exact duplicate of a fragment already held is ignored;
- a fragment that cannot be part of a valid datagram (a non-final one whose length is not a
  multiple of 8, an end beyond 65535 bytes or beyond a known final fragment) drops the datagram.

Drops are counted in ``stats``, never logged, so nothing here can flood a log.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from .wire import IPV4_HEADER_LEN, MAX_IPV4_LEN, Ipv4Packet

REASSEMBLY_TIMEOUT = 30.0
MAX_DATAGRAMS = 64
MAX_BYTES = 4 * 1024 * 1024
MAX_FRAGMENTS = 128  # a 65,535-byte datagram over a 576-byte MTU needs 120
FRAGMENT_OVERHEAD = 64  # bytes charged per fragment on top of its payload


class _Datagram:
    __slots__ = ("deadline", "starts", "ends", "data", "have", "total", "header", "cost")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.data: list[bytes] = []
        self.have = 0  # payload bytes held (fragments never overlap, so this measures coverage)
        self.total: int | None = None  # known once the final fragment (MF clear) arrives
        self.header = b""  # the first fragment's header: the reassembled packet's
        self.cost = 0


class Reassembler:
    """IPv4 datagrams in reassembly; :meth:`add` returns each one once it is complete."""

    def __init__(
        self,
        *,
        timeout: float = REASSEMBLY_TIMEOUT,
        max_datagrams: int = MAX_DATAGRAMS,
        max_bytes: int = MAX_BYTES,
        max_fragments: int = MAX_FRAGMENTS,
    ):
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        self._pending: OrderedDict[tuple[bytes, bytes, int, int], _Datagram] = OrderedDict()
        self.bytes = 0
        self.stats = dict.fromkeys(
            ("reassembled", "timeout", "overlap", "invalid", "evicted", "duplicate", "too_many_fragments"), 0)

    def __len__(self) -> int:
        return len(self._pending)

    def next_deadline(self) -> float | None:
        """When the oldest datagram in reassembly times out (None: nothing pending)."""
        for d in self._pending.values():
            return d.deadline
        return None

    def expire(self, now: float) -> None:
        """Drop every datagram whose time is up."""
        pending = self._pending
        while pending:
            key, d = next(iter(pending.items()))
            if d.deadline > now:
                return
            self._drop(key, "timeout")

    def add(self, ip: Ipv4Packet, now: float) -> Ipv4Packet | None:
        """Take one fragment; the whole datagram (``frag`` 0, the first fragment's header) once
        every byte of it has arrived, else None."""
        self.expire(now)
        payload = ip.payload
        start = ip.frag_offset
        end = start + len(payload)
        more = ip.more_fragments
        key = (ip.src, ip.dst, ip.proto, ip.ident)
        d = self._pending.get(key)
        if end + IPV4_HEADER_LEN > MAX_IPV4_LEN or (more and (not payload or len(payload) & 7)):
            self.stats["invalid"] += 1
            if d is not None:
                self._drop(key, None)
            return None
        cost = len(payload) + FRAGMENT_OVERHEAD
        if d is None:
            self._make_room(cost)
            d = self._pending[key] = _Datagram(now + self.timeout)
        # where it goes, and whether it fits with what is there
        starts, ends = d.starts, d.ends
        i = bisect.bisect_left(starts, start)
        if i < len(starts) and starts[i] == start and ends[i] == end:
            self.stats["duplicate"] += 1
            return None
        if (i > 0 and ends[i - 1] > start) or (i < len(starts) and starts[i] < end) or (
            i < len(starts) and starts[i] == start):
            self._drop(key, "overlap")
            return None
        if not more:
            if d.total is not None or (ends and ends[-1] > end):
                self._drop(key, "overlap")  # a second final fragment, or data beyond this one
                return None
            d.total = end
        elif d.total is not None and end > d.total:
            self._drop(key, "overlap")
            return None
        if len(starts) >= self.max_fragments:
            self._drop(key, "too_many_fragments")
            return None
        if self.bytes + cost > self.max_bytes:
            self._make_room(cost, keep=key)
            if self.bytes + cost > self.max_bytes:
                self._drop(key, "evicted")
                return None
        starts.insert(i, start)
        ends.insert(i, end)
        d.data.insert(i, payload)
        d.have += len(payload)
        d.cost += cost
        self.bytes += cost
        if start == 0:
            d.header = ip.header
        if d.total is None or d.have != d.total:
            return None
        del self._pending[key]
        self.bytes -= d.cost
        self.stats["reassembled"] += 1
        return Ipv4Packet(ip.src, ip.dst, ip.proto, ip.ttl, ip.ident, b"".join(d.data), d.header)

    def clear(self) -> None:
        self._pending.clear()
        self.bytes = 0

    def _make_room(self, cost: int, keep: tuple | None = None) -> None:
        """Evict the oldest datagrams until ``cost`` more bytes fit, and (``keep`` None: for a new
        datagram) one more datagram; the datagram ``keep`` itself is never evicted here."""
        pending = self._pending
        if (keep is not None or len(pending) < self.max_datagrams) and self.bytes + cost <= self.max_bytes:
            return
        for key in list(pending):
            if key != keep:
                self._drop(key, "evicted")
            if (keep is not None or len(pending) < self.max_datagrams) and self.bytes + cost <= self.max_bytes:
                return

    def _drop(self, key: tuple, reason: str | None) -> None:
        d = self._pending.pop(key)
        self.bytes -= d.cost
        if reason is not None:
            self.stats[reason] += 1

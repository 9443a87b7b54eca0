"""Virtual IP allocation from the server's pool in O(1) amortised time.

The used addresses are read from the store once, at start; after that a cursor walks the pool
forward and hands out the next free address, wrapping at the end. Every address is skipped at most
once per lap, so n allocations cost O(n) probes while the pool is not nearly full, and a released
address is reused as late as possible (a peer that cached the old holder's address is long gone
by then).
"""

from __future__ import annotations

import ipaddress


class PoolExhausted(Exception):
    pass


class VipAllocator:
    def __init__(self, pool: ipaddress.IPv4Network, used: set[str]):
        self._first = int(pool.network_address) + 1            # hosts(): no network, no broadcast
        self._count = pool.num_addresses - 2
        self._used = {int(ipaddress.IPv4Address(v)) for v in used}
        # continue after the highest address in use, as if the server had never stopped
        self._cursor = (max(self._used) - self._first + 1) % self._count if self._used else 0
        self.probes = 0                                         # addresses looked at (for tests)

    def __len__(self) -> int:
        return len(self._used)

    def allocate(self) -> str:
        if len(self._used) >= self._count:
            raise PoolExhausted()
        while True:
            addr = self._first + self._cursor
            self._cursor = (self._cursor + 1) % self._count
            self.probes += 1
            if addr not in self._used:
                self._used.add(addr)
                return str(ipaddress.IPv4Address(addr))

    def mark_used(self, vip: str) -> None:
        """``vip`` was taken elsewhere (another server instance on the same database)."""
        self._used.add(int(ipaddress.IPv4Address(vip)))

    def release(self, vip: str) -> None:
        self._used.discard(int(ipaddress.IPv4Address(vip)))

"""Sliding-window replay filter for transport counters (RFC 6479 style, like wireguard-go's).

The window is a ring of 64-bit blocks. Advancing the window zeroes only the blocks it moves past,
so the cost per packet is constant, and the state never allocates after construction. With 256
blocks the window spans 255 * 64 = 16320 counters, comfortably more than the 2^13 packets the
WireGuard paper asks for, so heavy reordering on multi-path links does not drop packets.
"""

from __future__ import annotations

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG
_RING_BLOCKS = 256
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1

WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS
"""Counters this far below the highest one seen are still accepted (once)."""


class ReplayWindow:
    """Accepts each counter at most once, and rejects counters too far behind the newest one."""

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def check_and_update(self, counter: int, limit: int) -> bool:
        """Record ``counter``; True if it is new, inside the window and below ``limit``.

        Call only after the packet authenticated, or a forger could slide the window forward.
        """
        if counter >= limit:
            return False
        last = self._last
        if counter > last:
            block = counter >> _BLOCK_BITS_LOG
            current = last >> _BLOCK_BITS_LOG
            if block != current:    # in order within a block (the usual case) zeroes nothing
                ring = self._ring
                diff = block - current
                if diff > _RING_BLOCKS:
                    diff = _RING_BLOCKS
                for i in range(current + 1, current + diff + 1):
                    ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        ring = self._ring
        block = (counter >> _BLOCK_BITS_LOG) & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[block]
        if old & bit:
            return False
        ring[block] = old | bit
        return True

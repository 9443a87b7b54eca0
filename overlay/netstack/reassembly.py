"""Receiver side out-of-order buffer: holds segments above ``rcv_nxt`` and names the SACK blocks.

Sequence numbers here are unwrapped (plain Python ints that never wrap, see ``tcp.unwrap``), so
ordering is ordinary integer comparison. The caller trims data to the receive window before
adding it, which bounds the bytes held here by the window; the number of separate blocks is
bounded too (a segment that would create one block too many is dropped — the sender will
retransmit it), so a hostile peer cannot make us keep thousands of 1-byte islands.
"""

from __future__ import annotations

import bisect


class ReassemblyBuffer:
    """Disjoint, sorted, non-adjacent blocks ``[start, data)`` of data received out of order."""

    __slots__ = ("_starts", "_blocks", "max_blocks", "bytes", "_recent")

    def __init__(self, max_blocks: int = 32):
        self._starts: list[int] = []
        self._blocks: list[bytearray] = []
        self.max_blocks = max_blocks
        self.bytes = 0
        self._recent: list[int] = []  # starts of recently touched blocks, newest first (RFC 2018)

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, seq: int, data: bytes) -> bool:
        """Store ``data`` at ``seq``, merging with neighbours. False if dropped (too many blocks)."""
        end = seq + len(data)
        if not data:
            return False
        starts, blocks = self._starts, self._blocks
        i = bisect.bisect_right(starts, seq)
        # merge with the block before if it reaches seq
        if i > 0 and starts[i - 1] + len(blocks[i - 1]) >= seq:
            i -= 1
            b = blocks[i]
            bend = starts[i] + len(b)
            if end > bend:
                b += data[bend - seq :]
                self.bytes += end - bend
        else:
            if len(starts) >= self.max_blocks and not (i < len(starts) and starts[i] <= end):
                return False
            starts.insert(i, seq)
            blocks.insert(i, bytearray(data))
            self.bytes += len(data)
        # absorb following blocks now overlapped or adjacent
        b = blocks[i]
        bend = starts[i] + len(b)
        while i + 1 < len(starts) and starts[i + 1] <= bend:
            nxt_start, nxt = starts.pop(i + 1), blocks.pop(i + 1)
            nxt_end = nxt_start + len(nxt)
            self.bytes -= len(nxt)
            if nxt_end > bend:
                b += nxt[bend - nxt_start :]
                self.bytes += nxt_end - bend
                bend = nxt_end
            self._forget(nxt_start)
        self._touch(starts[i])
        return True

    def pop_ready(self, rcv_nxt: int) -> bytearray | None:
        """Remove and return the data that continues the stream at ``rcv_nxt``, if any."""
        starts = self._starts
        while starts and starts[0] <= rcv_nxt:
            start, b = starts.pop(0), self._blocks.pop(0)
            self.bytes -= len(b)
            self._forget(start)
            end = start + len(b)
            if end > rcv_nxt:
                if start < rcv_nxt:
                    del b[: rcv_nxt - start]
                return b
        return None

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` (start, end) blocks, the most recently changed first (RFC 2018 §4)."""
        out: list[tuple[int, int]] = []
        for s in self._recent:
            i = bisect.bisect_left(self._starts, s)
            if i < len(self._starts) and self._starts[i] == s:
                out.append((s, s + len(self._blocks[i])))
                if len(out) >= limit:
                    break
        return out

    def _touch(self, start: int) -> None:
        self._forget(start)
        self._recent.insert(0, start)
        del self._recent[8:]

    def _forget(self, start: int) -> None:
        try:
            self._recent.remove(start)
        except ValueError:
            pass

    def clear(self) -> None:
        self._starts.clear()
        self._blocks.clear()
        self._recent.clear()
        self.bytes = 0

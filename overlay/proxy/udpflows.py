"""Dial-on-demand UDP flows through a Dialer, shared by SOCKS5 UDP ASSOCIATE and UDP forwards.

A SOCKS association keeps one flow per destination; a UDP forward keeps one per client address.
Either way: the first datagram for a key opens a flow (datagrams arriving meanwhile wait in a
short bounded list), replies are handed to ``on_reply``, the number of flows is bounded (the
least recently used is closed to make room), idle flows are closed, and a destination the dialer
refused is not re-dialled for ``retry_after`` seconds so a chatty client cannot turn every
datagram into a dial and a log line. A datagram the flow cannot send (too large) is dropped with
a rate-limited warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from overlay.proxy.dialer import Dialer, DialError, UdpFlow
from overlay.ratelog import LogLimiter

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

MAX_PENDING = 16  # datagrams held per flow while it is being opened


class _Entry:
    __slots__ = ("flow", "pending", "task", "deadline", "failed")

    def __init__(self, deadline: float):
        self.flow: UdpFlow | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.deadline = deadline
        self.failed = False


class UdpFlows(Generic[K]):
    """A bounded set of UDP flows keyed by ``K``, each opened through ``dialer`` on first use."""

    def __init__(
        self,
        dialer: Dialer,
        on_reply: Callable[[K, bytes], None],
        idle_timeout: float,
        max_flows: int = 256,
        retry_after: float = 5.0,
        label: str = "UDP",
    ):
        self._dialer = dialer
        self._on_reply = on_reply
        self._idle = idle_timeout
        self._max = max_flows
        self._retry = retry_after
        self._label = label
        self._send_failed = LogLimiter()
        self._entries: OrderedDict[K, _Entry] = OrderedDict()
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)
        self.last_activity = self._loop.time()

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep_interval(self) -> float:
        return max(0.05, min(self._idle, self._retry) / 4)

    def send(self, key: K, host: str, port: int, data: bytes) -> None:
        """Send ``data`` on the flow for ``key`` (to ``host``:``port``), opening it if needed."""
        now = self._loop.time()
        self.last_activity = now
        entry = self._entries.get(key)
        if entry is None:
            while len(self._entries) >= self._max:
                _, oldest = self._entries.popitem(last=False)
                self._close_entry(oldest)
            entry = _Entry(now + self._idle)
            entry.pending.append(data)
            self._entries[key] = entry
            entry.task = self._loop.create_task(self._run(key, host, port, entry))
            return
        if entry.failed:
            return
        entry.deadline = now + self._idle
        self._entries.move_to_end(key)
        if entry.flow is not None:
            self._send(entry.flow, host, port, data)
        elif len(entry.pending) < MAX_PENDING:
            entry.pending.append(data)

    async def _run(self, key: K, host: str, port: int, entry: _Entry) -> None:
        try:
            flow = await self._dialer.open_udp(host, port)
        except Exception as e:
            if isinstance(e, DialError):
                log.warning("%s to %s:%d: %s", self._label, host, port, e.message)
            else:
                log.exception("%s to %s:%d: dialer failed", self._label, host, port)
            entry.failed = True
            entry.pending.clear()
            entry.deadline = self._loop.time() + self._retry
            return
        entry.flow = flow
        try:
            for data in entry.pending:
                self._send(flow, host, port, data)
            entry.pending.clear()
            while True:
                data = await flow.recv()
                now = self._loop.time()
                entry.deadline = now + self._idle
                self.last_activity = now
                self._on_reply(key, data)
        except EOFError:
            pass
        finally:
            flow.close()
            if self._entries.get(key) is entry:
                del self._entries[key]

    def _send(self, flow: UdpFlow, host: str, port: int, data: bytes) -> None:
        try:
            flow.send(data)
        except OSError as e:
            self._send_failed.log(log, logging.WARNING, "%s to %s:%d: datagram of %d bytes dropped: %s",
                                      self._label, host, port, len(data), e.strerror or e)

    def _close_entry(self, entry: _Entry) -> None:
        if entry.task is not None:
            entry.task.cancel()
        if entry.flow is not None:
            entry.flow.close()

    def _sweep(self) -> None:
        now = self._loop.time()
        expired = [k for k, e in self._entries.items() if e.deadline <= now]
        for key in expired:
            self._close_entry(self._entries.pop(key))
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    def close(self) -> None:
        """Close every flow and stop the idle sweeper."""
        self._sweeper.cancel()
        while self._entries:
            _, entry = self._entries.popitem()
            self._close_entry(entry)

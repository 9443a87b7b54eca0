"""The byte relay shared by the proxies and forwards, with in-memory streams: how it ends, what it
closes, and that a connection costs it no more than its two pump tasks and a timer or two."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from overlay.proxy import relay as relay_mod
from overlay.proxy.relay import _Activity, _IdleTimer, close_writers, relay


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class Reader:
    """Hands out queued chunks; b"" is EOF; an exception in the queue is raised."""

    def __init__(self, *items: Any):
        self.items: asyncio.Queue = asyncio.Queue()
        for i in items:
            self.items.put_nowait(i)

    async def read(self, n: int = -1) -> bytes:
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Writer:
    def __init__(self, half_close: bool = True, closes: bool = True, close_error: Exception | None = None):
        self.data = bytearray()
        self.eof = self.closed = False
        self.half_close = half_close
        self.transport = self   # what close_writers aborts
        self.aborted = False
        self._closes = closes
        self._close_error = close_error

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        if self._close_error is not None:
            raise self._close_error
        if not self._closes:
            await asyncio.Event().wait()   # never

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_both_directions_end_with_half_closes():
    async def main():
        a_w, b_w = Writer(), Writer()
        await relay(Reader(b"hello ", b"world", b""), a_w, Reader(b"answer", b""), b_w, 600, b">")
        assert bytes(b_w.data) == b">hello world" and b_w.eof
        assert bytes(a_w.data) == b"answer" and a_w.eof
        assert a_w.closed and b_w.closed and not a_w.aborted and not b_w.aborted

    run(main())


def test_an_error_one_way_ends_both_and_is_retrieved():
    async def main():
        loop = asyncio.get_running_loop()
        unretrieved = []
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
        b_reader = Reader()                                  # the other way never ends by itself
        a_w, b_w = Writer(), Writer()
        await relay(Reader(ConnectionResetError("gone")), a_w, b_reader, b_w, None)
        assert a_w.closed and b_w.closed
        await asyncio.sleep(0)
        assert unretrieved == []

    run(main())


def test_an_eof_that_cannot_be_passed_on_ends_both():
    async def main():
        a_w, b_w = Writer(), Writer(half_close=False)
        await relay(Reader(b"x", b""), a_w, Reader(), b_w, None)
        assert bytes(b_w.data) == b"x" and not b_w.eof and a_w.closed and b_w.closed

    run(main())


def test_a_relay_costs_two_tasks_and_no_timer_per_read():
    async def main():
        loop = asyncio.get_running_loop()
        made: collections.Counter = collections.Counter()

        def factory(loop, coro, **kw):
            made[coro.__qualname__] += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        real_call_at = loop.call_at

        def call_at(when, callback, *args, **kw):
            made["timer"] += 1
            return real_call_at(when, callback, *args, **kw)

        loop.call_at = call_at  # type: ignore[method-assign]
        try:
            chunks = [b"x"] * 50 + [b""]
            await relay(Reader(*chunks), Writer(), Reader(*chunks), Writer(), 600)
        finally:
            loop.set_task_factory(None)
            del loop.call_at
        # the two pumps; one idle timer and one close timer, not one per read or per writer
        assert made == {"_pump": 2, "timer": 2}

    run(main())


class FakeLoop:
    def __init__(self) -> None:
        self.armed: list[tuple[float, Any]] = []

    def call_at(self, when: float, callback) -> asyncio.Handle:
        self.armed.append((when, callback))
        return asyncio.get_running_loop().call_at(1e9, lambda: None)   # a handle to cancel


def test_idle_timer_rearms_after_activity_and_ends_when_idle():
    async def main():
        fake = FakeLoop()
        ended = asyncio.get_running_loop().create_future()
        activity = _Activity(100.0)
        timer = _IdleTimer(fake, activity, 30.0, ended)   # type: ignore[arg-type]
        assert [w for w, _ in fake.armed] == [130.0]
        activity.last = 120.0                 # a read since: fires, sees it, waits from there
        fake.armed[-1][1]()
        assert [w for w, _ in fake.armed] == [130.0, 150.0] and not ended.done()
        fake.armed[-1][1]()                   # nothing read since: the relay ends
        assert ended.done() and len(fake.armed) == 2
        timer.cancel()

    run(main())


def test_close_writers_aborts_what_does_not_close_in_time(monkeypatch):
    monkeypatch.setattr(relay_mod, "CLOSE_TIMEOUT", 0.05)

    async def main():
        fine, stuck, failing = Writer(), Writer(closes=False), Writer(close_error=ConnectionResetError("x"))
        await close_writers(fine, failing, stuck)
        assert fine.closed and stuck.closed and failing.closed
        assert stuck.aborted and failing.aborted

    run(main())

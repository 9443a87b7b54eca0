"""The one way tests wait for a state: poll a condition until it holds, within a bound.

    v = wait(lambda: node.peer("bob"), 20, "bob listed")        # the truthy value, or AssertionError
    await wait_async(lambda: fwd.active == 0, 5, "idle flows expired")

Never a fixed sleep and never a wall-clock assertion: a test says which state it needs and how long
it may take at most; how fast it got there is a benchmark's business (benchmarks/).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def _no_details() -> str:
    return ""


def _timed_out(timeout: float, what: str, on_fail: Callable[[], str]) -> AssertionError:
    details = on_fail()
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{details}" if details else ""))


def wait(cond: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.1,
         on_fail: Callable[[], str] = _no_details) -> T:
    """Poll ``cond`` every ``interval`` seconds until it returns something truthy (returned), or
    raise AssertionError naming ``what`` (and ``on_fail()``'s diagnostics) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, on_fail)
        time.sleep(interval)


async def wait_async(cond: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.02,
                     on_fail: Callable[[], str] = _no_details) -> T:
    """:func:`wait` inside an event loop (the loop keeps running between polls)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, on_fail)
        await asyncio.sleep(interval)

"""Hellos wait while too many connections have output piling up (overlay/server/backlog.py)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import SimpleNamespace

import pytest

from overlay.control.messages import RequestError
from overlay.server import app, backlog
from overlay.server.backlog import OutputBacklog


def test_busy_at_the_limit_and_stale_readers_stop_counting():
    b = OutputBacklog(limit=3, stale=5.0)
    for i in range(3):
        b.paused(f"c{i}", 100.0 + i)
    assert b.busy(103.0)
    b.resumed("c1")
    assert not b.busy(103.0)
    b.paused("c1", 103.0)
    assert b.busy(104.0)
    assert not b.busy(105.0)          # c0 backlogged 5 s: a node that does not read
    assert len(b) == 2
    b.resumed("never-paused")         # harmless


def _server(limit: int) -> SimpleNamespace:
    srv = SimpleNamespace(backlog=OutputBacklog(limit=limit), _hello_waiters=deque())
    srv.wake_hello = lambda: app.MediationServer.wake_hello(srv)
    return srv


def test_hellos_wait_in_arrival_order_for_a_drained_connection():
    async def main():
        srv = _server(limit=1)
        srv.backlog.paused("busy", time.monotonic())
        order: list[str] = []

        async def hello(name):
            await app.MediationServer._hello_slot(srv, SimpleNamespace(closed=False))
            order.append(name)
        tasks = [asyncio.create_task(hello(n)) for n in ("first", "second")]
        await asyncio.sleep(0.05)
        assert order == [] and len(srv._hello_waiters) == 2
        srv.backlog.resumed("busy")
        srv.wake_hello()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == ["first", "second"] and srv.backlog.waited == 2
    asyncio.run(main())


def test_a_hello_waits_at_most_max_wait_and_not_for_a_closed_connection(monkeypatch):
    monkeypatch.setattr(backlog, "MAX_WAIT", 0.1)

    async def main():
        srv = _server(limit=1)
        srv.backlog.paused("stuck", time.monotonic())
        await asyncio.wait_for(app.MediationServer._hello_slot(srv, SimpleNamespace(closed=False)), 5)
        with pytest.raises(RequestError):
            await asyncio.wait_for(app.MediationServer._hello_slot(srv, SimpleNamespace(closed=True)), 5)
    asyncio.run(main())

"""Bidirectional byte relay between two streams, shared by the proxies and the TCP forwards.

Backpressure: each direction awaits ``drain()`` after every write, so at most one read buffer
(``CHUNK`` bytes) plus the writer's high-water mark is held per direction, whatever the speed
difference between the two ends. Half-close: EOF from one side becomes ``write_eof()`` on the
other, and the relay ends when both directions have finished. Idle connections (no bytes read in
either direction for ``idle_timeout`` seconds) are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct

from overlay.proxy.dialer import StreamReaderLike, StreamWriterLike
from overlay.proxy.splice import Splice

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CLOSE_TIMEOUT = 5.0  # seconds to flush on close before the transport is aborted


class _Activity:
    __slots__ = ("last",)

    def __init__(self, now: float):
        self.last = now


async def _pump(
    src: StreamReaderLike, dst: StreamWriterLike, first: bytes, activity: _Activity, loop: asyncio.AbstractEventLoop
) -> bool:
    """Copy src to dst until EOF; returns True if dst was half-closed, False if it cannot be."""
    if first:
        dst.write(first)
        await dst.drain()
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        activity.last = loop.time()
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()
        return True
    return False


async def relay(
    a_reader: StreamReaderLike,
    a_writer: StreamWriterLike,
    b_reader: StreamReaderLike,
    b_writer: StreamWriterLike,
    idle_timeout: float | None,
    a_to_b_first: bytes = b"",
) -> None:
    """Relay a<->b until both directions end, one fails, or the pair is idle; then close both.

    ``a_to_b_first`` is data already read from ``a`` (e.g. pipelined after a proxy request).
    A kernel socket paired with a netstack stream is relayed from callbacks instead of tasks
    (``overlay.proxy.splice``: the same contract, fewer wake-ups per chunk).

    Otherwise, per relay: the two pump tasks, one future they end, at most one idle timer (re-armed only
    when it fires after activity) and one close timer, so that many short connections cost
    little beyond their bytes.
    """
    if (sp := Splice.prepare(a_reader, a_writer, b_reader, b_writer)) is not None:
        await sp.run(idle_timeout, a_to_b_first)
        return
    loop = asyncio.get_running_loop()
    activity = _Activity(loop.time())
    ended: asyncio.Future[None] = loop.create_future()
    pumps = (
        loop.create_task(_pump(a_reader, b_writer, a_to_b_first, activity, loop)),
        loop.create_task(_pump(b_reader, a_writer, b"", activity, loop)),
    )

    def pump_done(task: asyncio.Task[bool]) -> None:
        # every finished pump's exception is retrieved; an error, or an EOF we could not pass on
        # as a half-close, ends both ways; otherwise the relay ends once both directions have
        failed = task.cancelled() or task.exception() is not None or not task.result()
        if not ended.done() and (failed or (pumps[0].done() and pumps[1].done())):
            ended.set_result(None)

    for t in pumps:
        t.add_done_callback(pump_done)
    idle = _IdleTimer(loop, activity, idle_timeout, ended) if idle_timeout is not None else None
    try:
        await ended
    finally:
        if idle is not None:
            idle.cancel()
        # Close before awaiting anything: if this task is cancelled while it waits below, the
        # sockets are still released.
        close_now(a_writer)
        close_now(b_writer)
        running = [t for t in pumps if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running)
        await close_writers(a_writer, b_writer)


class _IdleTimer:
    """Ends a relay (sets ``ended``) once nothing was read for ``timeout`` seconds. One timer
    handle at a time: armed for ``last + timeout``, and when it fires after activity, re-armed
    from the latest activity rather than on every read."""

    __slots__ = ("_loop", "_activity", "_timeout", "_ended", "_armed_last", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, activity: _Activity, timeout: float,
                 ended: asyncio.Future[None]):
        self._loop = loop
        self._activity = activity
        self._timeout = timeout
        self._ended = ended
        self._armed_last = activity.last
        self._handle: asyncio.TimerHandle | None = loop.call_at(activity.last + timeout, self._fire)

    def _fire(self) -> None:
        last = self._activity.last
        if last == self._armed_last:
            self._handle = None
            log.debug("closing relay idle for %.0f s", self._timeout)
            if not self._ended.done():
                self._ended.set_result(None)
            return
        self._armed_last = last
        self._handle = self._loop.call_at(last + self._timeout, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def reset_now(writer: StreamWriterLike) -> None:
    """Abort a TCP connection with a reset (SO_LINGER 0), so the application at the other end
    sees a failure (ECONNRESET) rather than a clean end-of-file; never raising."""
    sock = writer.get_extra_info("socket")
    transport = getattr(writer, "transport", None)
    if sock is None or transport is None:
        close_now(writer)
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def close_now(writer: StreamWriterLike) -> None:
    """Start closing a writer (flushes in the background), never raising."""
    try:
        writer.close()
    except Exception:
        log.debug("closing %r failed", writer, exc_info=True)


async def close_writer(writer: StreamWriterLike) -> None:
    """Close a writer, flushing for at most ``CLOSE_TIMEOUT`` s, never raising (but cancellable)."""
    await close_writers(writer)


async def close_writers(*writers: StreamWriterLike) -> None:
    """Close writers, flushing all of them within one ``CLOSE_TIMEOUT`` (one timer, no task per
    writer); a writer whose flush fails or does not end in time is aborted. Never raises (but
    cancellable)."""
    for w in writers:
        close_now(w)
    if all(_closed_at_once(w) for w in writers):
        return  # (no timer: a short connection's ends are usually closed by now)
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            for w in writers:
                try:
                    await w.wait_closed()
                except Exception:
                    _abort(w)
    except TimeoutError:
        for w in writers:
            _abort(w)   # (a transport already closed ignores it)


def _closed_at_once(writer: StreamWriterLike) -> bool:
    """Whether ``writer.wait_closed()`` would return without waiting (writers that can tell)."""
    is_closed = getattr(writer, "is_closed", None)
    return is_closed is not None and is_closed()


def _abort(writer: StreamWriterLike) -> None:
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()

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
    """
    if (sp := Splice.prepare(a_reader, a_writer, b_reader, b_writer)) is not None:
        await sp.run(idle_timeout, a_to_b_first)
        return
    loop = asyncio.get_running_loop()
    activity = _Activity(loop.time())
    pending = {
        asyncio.ensure_future(_pump(a_reader, b_writer, a_to_b_first, activity, loop)),
        asyncio.ensure_future(_pump(b_reader, a_writer, b"", activity, loop)),
    }
    try:
        while pending:
            timeout = None if idle_timeout is None else activity.last + idle_timeout - loop.time()
            if timeout is not None and timeout <= 0:
                log.debug("closing relay idle for %.0f s", idle_timeout)
                break
            done, pending = await asyncio.wait(pending, timeout=timeout)
            # (a list, not any(): every finished task's exception must be retrieved)
            if [t for t in done if t.exception() is not None or not t.result()]:
                break  # an error, or an EOF we could not pass on as a half-close: end both ways
    finally:
        # Close before awaiting anything: if this task is cancelled while it waits below, the
        # sockets are still released.
        close_now(a_writer)
        close_now(b_writer)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(close_writer(a_writer), close_writer(b_writer))


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
    close_now(writer)
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except Exception:
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()

"""Relay between a kernel TCP connection and a userspace-stack connection from callbacks, no tasks.

:func:`overlay.proxy.relay.relay` copies with one task per direction, so every chunk costs the
reading side a wake-up: a future resolved, a loop turn, a coroutine resumed. When one end is an
asyncio socket transport (a forward's client, a shared service on 127.0.0.1) and the other a
netstack stream, the bytes can move in the callback that received them instead:

- kernel -> netstack: this protocol replaces the transport's ``StreamReaderProtocol``;
  ``data_received`` writes into the TCP send buffer, which flushes at once (segments,
  WireGuard, UDP, in the same callback);
- netstack -> kernel: the netstack reader calls back from the flush that received the segment
  (``NetstackStreamReader.set_data_callback``) and the bytes go to ``transport.write``.

A forward's accepted socket and a share's socket toward its service come without an asyncio
transport at all (:meth:`Splice.for_socket` wraps them in a
:class:`~overlay.proxy.socket_end.SocketEnd`): per connection no transport, streams or their
system calls. Short connections also lose packets here: a short kernel read looks for the EOF
right behind it, so the FIN rides on the data; data followed by the netstack side's EOF goes to
the kernel corked (``MSG_MORE``) so that ``shutdown`` sends both in one loopback segment.

A round trip through a forward crosses four such hops (two per node), each a loop turn and a
task switch less. The contract is relay()'s: backpressure both ways (a full netstack send buffer
pauses reading the kernel socket; a full kernel write buffer stops taking bytes from the netstack
connection, whose window then closes), EOF passed on as a half-close, the idle timeout, both
ends closed at the end. Anything else (TLS, another transport or stream type) uses relay().
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import socket
from collections.abc import Callable
from typing import Any

from overlay.netstack.asyncio_glue import NetstackStreamReader, NetstackStreamWriter
from overlay.proxy.socket_end import SocketEnd

CHUNK = 256 * 1024
# with read_ahead, a kernel read shorter than this may have the peer's EOF right behind it: one
# more recv() looks, so that the FIN leaves with the data (one segment, one packet through the
# tunnel) rather than a loop turn later in a segment of its own
READ_AHEAD = 64 * 1024
# ... but only for a connection's first few short reads: a service that answers and closes does so
# at once, and on a long-lived connection (ssh, a game, a 1-byte ping-pong) each look is a system
# call and an exception on the round trip's critical path
READ_AHEAD_LOOKS = 4
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_SOCKET_TRANSPORT: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)


class Splice(asyncio.Protocol):
    """One relayed pair; :meth:`prepare` checks that the pair qualifies."""

    def __init__(self, kreader: asyncio.StreamReader | None, kwriter: Any,
                 nreader: NetstackStreamReader, nwriter: NetstackStreamWriter, kernel_first: bool,
                 read_ahead: bool = False):
        self._kreader = kreader  # None: a SocketEnd, nothing read before
        self._kwriter = kwriter  # what closes the kernel end (a StreamWriter, or the SocketEnd)
        self._tr: Any = kwriter.transport
        self._sock: socket.socket = self._tr._sock if kreader is not None else self._tr.sock
        self._old: Any = self._tr.get_protocol()  # (None for a SocketEnd)
        self._nr = nreader
        self._nw = nwriter
        self._driver = nwriter._s.driver
        self._loop = self._driver._loop
        self._kernel_first = kernel_first  # relay()'s "a" side is the kernel one
        self._read_ahead = READ_AHEAD_LOOKS if read_ahead else 0  # looks left for an EOF behind a short read
        self.last = self._loop.time()  # last bytes moved, for the idle timeout
        self._k2n_done = False  # the kernel side's EOF was passed on as a FIN
        self._n2k_done = False  # the netstack side's EOF was passed on as a half-close
        self._write_paused = False  # the kernel socket's write buffer is over its high-water mark
        self.done: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._idle: Any = None  # start(): the idle timer
        self._on_end: Callable[[], None] | None = None

    @classmethod
    def prepare(cls, a_reader: Any, a_writer: Any, b_reader: Any, b_writer: Any) -> Splice | None:
        for kr, kw, nr, nw, kernel_first in ((a_reader, a_writer, b_reader, b_writer, True),
                                             (b_reader, b_writer, a_reader, a_writer, False)):
            if (type(kr) is asyncio.StreamReader and type(kw) is asyncio.StreamWriter
                    and type(nr) is NetstackStreamReader and type(nw) is NetstackStreamWriter
                    and _SOCKET_TRANSPORT is not None and type(kw.transport) is _SOCKET_TRANSPORT
                    and not kw.transport.is_closing() and kr.exception() is None
                    and nr._on_data is None and nr._s is nw._s and nw.pending == 0):
                return cls(kr, kw, nr, nw, kernel_first)
        return None

    @classmethod
    def for_socket(cls, sock: socket.socket, nreader: Any, nwriter: Any, *,
                   read_ahead: bool = False) -> Splice | None:
        """A pair of a connected non-blocking kernel socket (no asyncio transport made for it:
        :class:`overlay.proxy.socket_end.SocketEnd`) and a netstack stream; None if the stream
        is another kind (then wrap the socket in asyncio streams and use relay()).

        ``read_ahead``: after a short read, one more recv() looks for the EOF behind it, so that
        the FIN leaves with the data. Worth it toward a service, which often answers and closes;
        a client seldom shuts down right after its request, and the look would cost a system
        call per read."""
        if (type(nreader) is NetstackStreamReader and type(nwriter) is NetstackStreamWriter
                and nreader._on_data is None and nreader._s is nwriter._s and nwriter.pending == 0):
            return cls(None, SocketEnd(sock, nwriter._s.driver._loop), nreader, nwriter, True, read_ahead)
        return None

    # ------------------------------------------------------------------ running
    async def run(self, idle_timeout: float | None, first: bytes = b"") -> None:
        """Relay until both directions end, one fails or the pair is idle for ``idle_timeout``
        seconds; ``first``: bytes already read from relay()'s "a" side."""
        from overlay.proxy.relay import _IdleTimer, close_writers

        idle = None
        try:
            self._start(first)
            if not self.done.done():
                if idle_timeout is not None:
                    idle = _IdleTimer(self._loop, self, idle_timeout, self.done)  # type: ignore[arg-type]
                await self.done
        finally:
            if idle is not None:
                idle.cancel()
            self._finish(None)
            await close_writers(self._kwriter, self._nw)  # (one timer, no task per writer)

    def start(self, idle_timeout: float | None, on_end: Callable[[], None] | None = None) -> None:
        """Relay as :meth:`run` does, from callbacks alone: no task waits for the pair. Once it
        ends (both directions, a failure, idle, :meth:`abort`), both ends are closed from a loop
        callback, and ``on_end()`` runs once they are (a task only if a close must wait for a
        flush). For a :meth:`for_socket` pair."""
        from overlay.proxy.relay import _IdleTimer

        self._on_end = on_end
        self.done.add_done_callback(self._close_both)
        if idle_timeout is not None:
            self._idle = _IdleTimer(self._loop, self, idle_timeout, self.done)  # type: ignore[arg-type]
        try:
            self._start(b"")
        except Exception as e:  # (the ends close all the same)
            self._finish(e)

    def abort(self) -> None:
        """End the pair now (both ends are closed as at its end)."""
        self._finish(ConnectionAbortedError("relay closed"))

    def _close_both(self, _: object = None) -> None:
        from overlay.proxy.relay import _closed_at_once, close_now, close_writers

        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._nr.set_data_callback(None)
        close_now(self._kwriter)
        close_now(self._nw)
        if _closed_at_once(self._kwriter) and _closed_at_once(self._nw):
            self._ended()
        else:
            task = self._loop.create_task(close_writers(self._kwriter, self._nw))
            task.add_done_callback(self._ended)

    def _ended(self, _: object = None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    def _start(self, first: bytes) -> None:
        kr = self._kreader
        buffered, eof = b"", False
        if kr is not None:
            buffered = bytes(kr._buffer)  # read by the StreamReaderProtocol before we took over
            kr._buffer.clear()
            eof = kr._eof
        self._tr.set_protocol(self)
        self._nr.set_data_callback(self._from_netstack)
        if first and not self._kernel_first:
            self._tr.write(first)
        kdata = first + buffered if first and self._kernel_first else buffered  # in the order read
        if kdata:
            self.data_received(kdata)
        if eof:
            self.eof_received()
        elif not self._k2n_done and not self._tr.is_reading() and not self._nw.pending:
            self._tr.resume_reading()  # the StreamReader had paused it (its buffer was full)
            if kr is None:
                self._tr.read_now()  # a SocketEnd: what the client sent so far goes out now
        self._from_netstack()  # what arrived before

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)
        self._nr.set_data_callback(None)

    def _check(self) -> None:
        if self._k2n_done and self._n2k_done:
            self._finish(None)

    # ------------------------------------------------------------------ kernel -> netstack
    def data_received(self, data: bytes) -> None:
        if self._k2n_done or self.done.done():
            return
        self.last = self._loop.time()
        eof = False
        if self._read_ahead and len(data) < READ_AHEAD:
            try:
                more = self._sock.recv(CHUNK)
            except OSError:  # nothing more yet (or an error the transport's next read reports)
                more = None
                self._read_ahead -= 1
            if more is not None:
                if more:
                    data += more
                else:
                    eof = True
        try:
            if eof:
                self._k2n_done = True
                self._tr.pause_reading()  # (the transport would only read the EOF again)
                self._nw.write_with_eof(data)
                self._check()
                return
            self._nw.write(data)  # flushes: the segments leave before this returns
            if self._nw.pending:
                self._tr.pause_reading()
                self._nw.when_drained(self._netstack_drained)
        except Exception as e:  # the netstack connection failed (reset, timed out)
            self._finish(e)

    def _netstack_drained(self) -> None:
        if self._nw._exc is not None:
            self._finish(self._nw._exc)
        elif not self.done.done() and not self._k2n_done and not self._tr.is_closing():
            try:
                self._tr.resume_reading()
            except Exception as e:
                self._finish(e)

    def eof_received(self) -> bool:
        if not self._k2n_done and not self.done.done():
            self._k2n_done = True
            try:
                self._nw.write_eof()
            except Exception as e:
                self._finish(e)
                return True
            self._check()
        return True  # keep the transport: the other direction may go on (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._old is not None:
            self._old.connection_lost(exc)  # the StreamWriter's wait_closed() learns of it
        self._finish(exc)

    # ------------------------------------------------------------------ netstack -> kernel
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._from_netstack()

    def _from_netstack(self) -> None:
        """Called from the netstack's flush: never raises (a failure ends this pair only)."""
        try:
            self._netstack_to_kernel()
        except Exception as e:  # e.g. shutdown() on a socket the service already reset
            self._finish(e)

    def _netstack_to_kernel(self) -> None:
        if self._write_paused or self._n2k_done or self.done.done():
            return
        nr, tr = self._nr, self._tr
        moved = False
        while not self._write_paused:
            if tr.is_closing():
                self._finish(ConnectionResetError("the local connection closed"))
                return
            try:
                data = nr.take(CHUNK)
            except BlockingIOError:
                break
            except Exception as e:  # reset, timed out, closed locally
                self._finish(e)
                return
            if not data:
                self._n2k_done = True
                if self._k2n_done:
                    # both ways done: the close that follows sends the FIN (no shutdown before it;
                    # the kernel side's EOF was read, so nothing unread turns the close into a reset)
                    self._finish(None)
                else:
                    tr.write_eof()
                    self._check()
                break
            moved = True
            if _MSG_MORE and not self._k2n_done and nr.at_eof() and not tr.get_write_buffer_size():
                self._write_before_eof(data)
            else:
                tr.write(data)
        if moved:
            self.last = self._loop.time()
            self._driver._kick_if_pending()  # the read may have made a window update due

    def _write_before_eof(self, data: bytes) -> None:
        """The last bytes before the half-close: sent corked (MSG_MORE), so that the FIN which
        ``write_eof`` adds next leaves in the same segment, one loopback segment instead of two."""
        try:
            n = self._sock.send(data, _MSG_MORE)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            self._tr.write(memoryview(data)[n:])

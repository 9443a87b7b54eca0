"""A connected kernel TCP socket driven from loop callbacks: the least a Splice needs of a transport.

A forward's accepted socket and a share's socket toward its service are relayed with a netstack
stream by :class:`overlay.proxy.splice.Splice`. Wrapping each in asyncio's streams first costs,
per connection, a transport (``getsockname``, ``getpeername`` and ``TCP_NODELAY`` system calls), a
stream reader, writer and protocol, a task and a loop turn or two before the first byte moves;
many short connections pay that on both nodes. :class:`SocketEnd` is the plain version: reading
with ``loop.add_reader``, writing at once and buffering only what the socket does not take
(``loop.add_writer`` until it is flushed), and the flow control a Splice relies on:
``pause_reading`` / ``resume_reading`` one way, ``pause_writing`` / ``resume_writing`` calls on the
protocol above a high-water mark the other way. Closing flushes what is buffered first;
``wait_closed`` waits for that, ``abort`` does not.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

MAX_READ = 256 * 1024
HIGH_WATER = 64 * 1024  # as asyncio's transports: pause the protocol's writing above this
LOW_WATER = 16 * 1024


class SocketEnd:
    """One connected, non-blocking TCP socket; ``protocol`` gets asyncio.Protocol's calls
    (``data_received``, ``eof_received``, ``connection_lost``, ``pause_writing``,
    ``resume_writing``). Nothing is read until :meth:`resume_reading`."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None):
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = loop or asyncio.get_running_loop()
        self._protocol: Any = None
        self._reading = False
        self._writing = False  # a writer callback is registered
        self._buf = bytearray()
        self._eof = False  # write_eof() asked: shutdown once the buffer is flushed
        self._closing = False
        self._closed = False
        self._paused_protocol = False
        self._closed_fut: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ what a Splice uses
    @property
    def transport(self) -> SocketEnd:
        return self  # (relay.close_writers aborts ``writer.transport`` when a flush does not end)

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        try:
            if name == "socket":
                return self.sock
            if name == "peername":
                return self.sock.getpeername()
            if name == "sockname":
                return self.sock.getsockname()
        except OSError:
            pass
        return default

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return len(self._buf)

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof or self._closing:
            return  # (asyncio's transports warn and drop it too)
        if not data:
            return
        if not self._buf:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._fatal(e)
                return
            if n == len(data):
                return
            self._buf += memoryview(data)[n:]
            self._start_writing()
        else:
            self._buf += data
        if len(self._buf) > HIGH_WATER and not self._paused_protocol and self._protocol is not None:
            self._paused_protocol = True
            self._protocol.pause_writing()

    def write_eof(self) -> None:
        """Half-close once everything written has been sent (raises what shutdown() raises)."""
        if self._eof or self._closing:
            return
        self._eof = True
        if not self._buf:
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop reading; close once the buffered bytes are sent."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buf:
            self._finish(None)

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        self._closing = True
        self._buf.clear()
        self._finish(None)

    def is_closed(self) -> bool:
        """Closed (the socket too): :meth:`wait_closed` returns at once."""
        return self._closed

    async def wait_closed(self) -> None:
        if self._closed:
            return
        if self._closed_fut is None:
            self._closed_fut = self._loop.create_future()
        await asyncio.shield(self._closed_fut)

    # ------------------------------------------------------------------ internals
    def read_now(self) -> None:
        """Read what is already there without waiting for the loop to report it (a client's
        first bytes, sent right after its connect, go out with the handshake's last ACK)."""
        if self._reading:
            self._read_ready()

    def _read_ready(self) -> None:
        try:
            data = self.sock.recv(MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fatal(e)
            return
        protocol = self._protocol
        if protocol is None:
            return
        if data:
            protocol.data_received(data)
            return
        self.pause_reading()
        if not protocol.eof_received():
            self.close()

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _write_ready(self) -> None:
        if self._buf:
            try:
                n = self.sock.send(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._fatal(e)
                return
            del self._buf[:n]
        if self._buf:
            if self._paused_protocol and len(self._buf) <= LOW_WATER and not self._closing:
                self._paused_protocol = False
                self._protocol.resume_writing()
            return
        self._stop_writing()
        if self._closing:
            self._finish(None)
            return
        if self._eof:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self._fatal(e)
                return
        if self._paused_protocol:
            self._paused_protocol = False
            self._protocol.resume_writing()

    def _fatal(self, exc: Exception) -> None:
        self._closing = True
        self._buf.clear()
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        self._stop_writing()
        self.sock.close()
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        protocol, self._protocol = self._protocol, None  # (no reference cycle left behind)
        if protocol is not None:
            protocol.connection_lost(exc)

"""Drive a sans-I/O :class:`~overlay.netstack.stack.Stack` on an asyncio loop, with stream APIs.

:class:`StackDriver` is bound to a ``send_packet`` callback (the tunnel). Feed it inbound IPv4
packets with :meth:`StackDriver.receive_packet` (or a batch read in one go with
:meth:`StackDriver.receive_packets`); it runs the stack's timers with ``loop.call_at`` and turns
stack events into stream wake-ups. Output is flushed in the callback that made it, never a loop
turn later: after each inbound batch (answered as one batch: one ACK per connection, as GRO gives
Linux), after each ``write``, close or read that opened the window. A flush already running (an
event handler writing) takes what its handlers add, so nothing recurses.

Streams look like asyncio's (``read``/``readexactly``/``readuntil``/``readline``;
``write``/``drain``/``write_eof``/``close``/``wait_closed``/``get_extra_info``) and keep memory
bounded both ways:

- received bytes stay in the connection's receive buffer until the application reads them, so
  a slow reader shrinks the advertised TCP window instead of growing a queue;
- ``write`` hands bytes to the connection's send buffer; what does not fit waits in the writer
  and ``await drain()`` blocks until it has all been taken (asyncio semantics: ``write`` never
  blocks, ``drain`` is the backpressure point).

A connection refused by the peer (RST to our SYN) raises :class:`ConnectionRefusedError`
naming the address and port; :class:`NothingListensError` (a subclass) when the peer answered ICMP
port unreachable: the port is open to us but the service behind it is not running;
:class:`HostUnreachableError` when it answered another ICMP error (a gateway that could not reach
the LAN host: host unreachable, time exceeded when it got no answer, prohibited when busy).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from ..ratelog import LogLimiter
from . import events as ev
from .stack import Stack
from .tcp import TcpConnection, TcpState
from .udp import UdpSocket
from .wire import ICMP_ADMIN_PROHIBITED, ICMP_DEST_UNREACHABLE, ICMP_HOST_UNREACHABLE, ICMP_TIME_EXCEEDED

log = logging.getLogger(__name__)

ClientConnected = Callable[["NetstackStreamReader", "NetstackStreamWriter"], Awaitable[None] | None]

READ_CHUNK = 65536
DEFAULT_LIMIT = 65536  # readuntil/readline search bound, like asyncio's


_errors = LogLimiter()


class NothingListensError(ConnectionRefusedError):
    """The peer accepts connections to the port but nothing listens behind it."""


class HostUnreachableError(ConnectionError):
    """Our SYN was answered with an ICMP error other than port unreachable; ``reason`` says which:
    "timed out" (time exceeded), "prohibited" (administratively prohibited) or "unreachable"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Refuse(NamedTuple):
    """What a ``prepare`` callback returns to refuse a SYN with this ICMP error instead of port
    unreachable (None)."""

    icmp_type: int
    code: int


REFUSE_UNREACHABLE = Refuse(ICMP_DEST_UNREACHABLE, ICMP_HOST_UNREACHABLE)
REFUSE_TIMED_OUT = Refuse(ICMP_TIME_EXCEEDED, 0)
REFUSE_BUSY = Refuse(ICMP_DEST_UNREACHABLE, ICMP_ADMIN_PROHIBITED)


class StackDriver:
    """Runs ``stack`` on the event loop, sending its packets through ``send_packet``.

    ``send_packets``, if given, receives each flush's packets as one list instead (batched
    encryption / sendmmsg on the tunnel side).
    """

    def __init__(
        self,
        stack: Stack,
        send_packet: Callable[[bytes], None],
        *,
        send_packets: Callable[[list[bytes]], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.stack = stack
        self._send_packet = send_packet
        self._send_packets = send_packets
        self._loop = loop or asyncio.get_running_loop()
        self._flush_scheduled = False
        self._flushing = False  # inside _flush: a kick only asks the running flush for another round
        self._again = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._streams: dict[TcpConnection, _Stream] = {}
        self._connecting: dict[TcpConnection, Any] = {}  # the future open_connection waits on, or a Dial
        # callbacks take (reader, writer) or, after a prepare, (reader, writer, prepared); prepare
        # takes (remote) or, for listen_any (port 0), (remote, port)
        self._servers: dict[int, Callable[..., Awaitable[None] | None]] = {}
        self._prepare: dict[int, Callable[..., Any]] = {}  # (a value, or an awaitable of one)
        self._discard: dict[int, Callable[[Any], None]] = {}
        self._prepared: dict[TcpConnection, Any] = {}
        self._udp: dict[UdpSocket, NetstackDatagramEndpoint] = {}
        self._closing_writers: set[NetstackStreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self.on_port_refused: Callable[[int, tuple[str, int]], None] | None = None
        self.closed = False

    # ------------------------------------------------------------------ tunnel side

    def receive_packet(self, packet: bytes) -> None:
        """An inbound IPv4 packet from the tunnel; the answer goes out before this returns."""
        self.stack.receive_packet(packet, self._loop.time())
        self._kick()

    def receive_packets(self, packets: list[bytes]) -> None:
        """Inbound IPv4 packets read in one go: processed as one batch, then answered at once
        (segments of one connection in the batch get one ACK)."""
        now = self._loop.time()
        receive = self.stack.receive_packet
        for p in packets:
            receive(p, now)
        self._kick()

    # ------------------------------------------------------------------ application side

    async def open_connection(
        self, ip: str, port: int, *, timeout: float | None = None
    ) -> tuple[NetstackStreamReader, NetstackStreamWriter]:
        """Connect to ``ip``:``port`` through the stack.

        Raises ConnectionRefusedError (peer answered RST: nothing listens / port not shared),
        TimeoutError (no answer within ``timeout`` or the stack's SYN retries).
        """
        if self.closed:
            raise RuntimeError("driver is closed")
        # the handshake's last ACK waits for the timer: what the caller writes once connected
        # (a forward's client spoke first) carries it, one packet fewer
        conn = self.stack.connect(ip, port, self._loop.time(), defer_ack=True)
        fut: asyncio.Future[None] = self._loop.create_future()
        self._connecting[conn] = fut
        self._kick()
        try:
            if timeout is None:
                await fut
            else:
                async with asyncio.timeout(timeout):   # (one timer; wait_for adds futures and hops)
                    await fut
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._connecting.pop(conn, None)
            conn.abort()
            self._kick()
            if fut.cancelled() or not fut.done():
                fut.cancel()
            raise
        return self._attach(conn)

    def open_connection_cb(
        self, ip: str, port: int,
        done: Callable[[NetstackStreamReader | None, NetstackStreamWriter | None, Exception | None], None],
        *, timeout: float | None = None,
    ) -> Dial:
        """:meth:`open_connection` answered by callback, no task: ``done(reader, writer, None)``
        from the flush that received the SYN-ACK (what ``done`` writes leaves in that flush,
        with the handshake's last ACK), or ``done(None, None, error)`` with the exceptions
        open_connection raises. :meth:`Dial.cancel` abandons it (no call then)."""
        if self.closed:
            raise RuntimeError("driver is closed")
        conn = self.stack.connect(ip, port, self._loop.time(), defer_ack=True)
        dial = Dial(self, conn, done)
        if timeout is not None:
            dial._timer = self._loop.call_later(timeout, dial._timed_out)
        self._connecting[conn] = dial
        self._kick()
        return dial

    def listen(self, port: int, client_connected_cb: Callable[..., Awaitable[None] | None], *,
               prepare: Callable[[tuple[str, int]], Any] | None = None,
               discard: Callable[[Any], None] | None = None) -> None:
        """Accept connections to ``port``; ``client_connected_cb(reader, writer)`` runs for each
        (a coroutine function becomes a task, like ``asyncio.start_server``).

        ``prepare(remote)``, if given, runs when a SYN arrives, before the handshake: None refuses
        the connection (the peer sees "port unreachable"), a :class:`Refuse` with that ICMP error
        instead, anything else is passed on as
        ``client_connected_cb(reader, writer, prepared)``, or to ``discard`` if the handshake then
        fails. ``prepare`` may be a coroutine function, or a plain function that answers at once
        or returns an awaitable when it must wait (then the SYN is answered from a task)."""
        self.stack.listen(port, defer=prepare is not None)
        self._servers[port] = client_connected_cb
        if prepare is not None:
            self._prepare[port] = prepare
            if discard is not None:
                self._discard[port] = discard

    def listen_any(self, client_connected_cb: Callable[..., Awaitable[None] | None], *,
                   prepare: Callable[[tuple[str, int], int], Any],
                   discard: Callable[[Any], None] | None = None) -> None:
        """Accept connections to every port (a gateway's stack for one LAN host):
        ``prepare(remote, port)`` runs for each SYN, as for :meth:`listen`."""
        self.stack.listen_any = True
        self._servers[0] = client_connected_cb
        self._prepare[0] = prepare
        if discard is not None:
            self._discard[0] = discard

    def unlisten(self, port: int) -> None:
        self.stack.unlisten(port)
        self._servers.pop(port, None)
        self._prepare.pop(port, None)
        self._discard.pop(port, None)

    def udp_bind(self, port: int = 0, *, max_queued: int = 256) -> NetstackDatagramEndpoint:
        sock = self.stack.udp_bind(port, max_queued=max_queued)
        ep = NetstackDatagramEndpoint(self, sock, max_queued)
        self._udp[sock] = ep
        return ep

    def close(self) -> None:
        """Abort every connection and stop the timers (the tunnel is going away)."""
        if self.closed:
            return
        for conn in list(self.stack.connections):
            conn.abort()
        self._flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._connecting.values():
            if not fut.done():
                fut.set_exception(ConnectionAbortedError("netstack driver closed"))
        self._connecting.clear()
        for s in list(self._streams.values()):
            s.fail(ConnectionAbortedError("netstack driver closed"))
        for ep in self._udp.values():
            ep._close_local()
        for conn in list(self._prepared):
            self._drop_prepared(conn)

    # ------------------------------------------------------------------ internals

    def _attach(self, conn: TcpConnection) -> tuple[NetstackStreamReader, NetstackStreamWriter]:
        s = _Stream(self, conn)
        self._streams[conn] = s
        return s.reader, s.writer

    def _schedule_flush(self) -> None:
        """Flush on the next loop turn (only when a flush is still busy after many rounds)."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _kick(self) -> None:
        """Send what the stack has to send now, from this callback: a send that waited for the
        next loop turn would add that turn to every round trip. Inside a running flush (an event
        handler that writes, or a packet the flush sent that came straight back) the flush takes
        it in another round."""
        if self._flushing:
            self._again = True
        elif not self.closed:
            try:
                self._flush()
            except Exception:
                # a bug in an event handler must not break the caller (the data plane's flush of
                # a whole inbound batch, an application's write): what asyncio does for a callback
                _errors.log(log, logging.ERROR, "netstack flush failed", exc_info=True)

    def _kick_if_pending(self) -> None:
        """:meth:`_kick` when the stack holds output (a read that made a window update due)."""
        if self.stack.has_output:
            self._kick()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._flushing:
            self._again = True
            return
        stack = self.stack
        now = stack.now = self._loop.time()
        self._flushing = True
        try:
            for _ in range(8):  # events may make more output (a read opens the window) and so on
                self._again = False
                if stack.has_events:
                    self._dispatch_events()
                if stack.has_output and (packets := stack.packets_to_send(now)):
                    if self._send_packets is not None:
                        self._send_packets(packets)
                    else:
                        send = self._send_packet
                        for p in packets:
                            send(p)
                # another round only for what handlers or the sending added (no empty round)
                if not (stack.has_events or stack.has_output or self._again):
                    break
            else:
                self._schedule_flush()  # still busy after several rounds: continue next loop turn
        finally:
            self._flushing = False
        if self._closing_writers:
            for w in list(self._closing_writers):
                w._check_closed()
        self._schedule_timer()

    def _schedule_timer(self) -> None:
        if self.closed:
            return
        t = self.stack.get_timer()
        if t is None:
            return  # a stale handle firing early does no harm
        if self._timer is not None and self._timer_at is not None and self._timer_at <= t:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = t
        self._timer = self._loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.stack.handle_timer(self._loop.time())
        self._flush()

    def _dispatch_events(self) -> None:
        # each event is dispatched on its exact type (cheaper than isinstance), which mypy does not
        # narrow: the events are typed Any here
        next_event: Callable[[], Any] = self.stack.next_event
        while (e := next_event()) is not None:
            t = type(e)
            if t is ev.DataReceived or t is ev.EndOfStream:
                s = self._streams.get(e.conn)
                if s is not None:
                    s.on_readable()
            elif t is ev.Writable:
                s = self._streams.get(e.conn)
                if s is not None:
                    s.writer._on_writable()
            elif t is ev.IncomingConnection:
                self._on_incoming(e.conn)
            elif t is ev.Connected:
                fut = self._connecting.pop(e.conn, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                elif fut is None:
                    e.conn.abort()  # nobody waits for it any more
            elif t is ev.ConnectionRefused:
                if e.icmp is not None:
                    reason = ("timed out" if e.icmp[0] == ICMP_TIME_EXCEEDED else
                              "prohibited" if e.icmp[1] == ICMP_ADMIN_PROHIBITED else "unreachable")
                    self._fail(e.conn, HostUnreachableError(
                        f"{e.conn.remote_ip}:{e.conn.remote_port}: {reason} (ICMP type {e.icmp[0]} code {e.icmp[1]})",
                        reason))
                elif e.unreachable:
                    self._fail(e.conn, NothingListensError(
                        f"{e.conn.remote_ip}:{e.conn.remote_port} refused the connection: nothing listens there"))
                else:
                    self._fail(e.conn, ConnectionRefusedError(
                        f"{e.conn.remote_ip}:{e.conn.remote_port} refused the connection "
                        "(nothing listens there, or the peer does not share that port)"))
            elif t is ev.ConnectionRequest:
                self._on_request_now(e)
            elif t is ev.TimedOut:
                self._fail(e.conn, TimeoutError(e.conn.error or "connection timed out"))
            elif t is ev.Reset:
                self._fail(e.conn, ConnectionResetError(e.conn.error or "connection reset by peer"))
            elif t is ev.Closed:
                self._drop_prepared(e.conn)
                s = self._streams.pop(e.conn, None)
                if s is not None:
                    s.on_readable()
                    s.writer._check_closed()
            elif t is ev.PortRefused:
                if self.on_port_refused is not None:
                    self.on_port_refused(e.port, e.remote)
            elif t is ev.DatagramReceived:
                ep = self._udp.get(e.socket)
                if ep is not None:
                    ep._deliver(e.data, e.addr)

    def _fail(self, conn: TcpConnection, exc: Exception) -> None:
        self._drop_prepared(conn)
        fut = self._connecting.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        s = self._streams.pop(conn, None)
        if s is not None:
            s.fail(exc)

    def _on_incoming(self, conn: TcpConnection) -> None:
        cb = self._servers.get(conn.local_port) or self._servers.get(0)
        if cb is None:
            self._drop_prepared(conn)
            conn.abort()
            return
        reader, writer = self._attach(conn)
        if conn in self._prepared:
            res = cb(reader, writer, self._prepared.pop(conn))
        else:
            res = cb(reader, writer)
        if inspect.isawaitable(res):
            self._spawn(res)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = self._loop.create_task(aw) if inspect.iscoroutine(aw) else asyncio.ensure_future(aw, loop=self._loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_request_now(self, req: ev.ConnectionRequest) -> None:
        """A SYN to a port with a ``prepare``: answered at once when ``prepare`` returns a value
        (a plain function that had what it needed: no task, no loop turn), else once the
        awaitable it returned (a coroutine function's) gives one, in a task."""
        prepare = self._prepare.get(req.port)
        try:
            if prepare is None and 0 in self._prepare:   # listen_any
                res = self._prepare[0](req.remote, req.port)
            else:
                res = prepare(req.remote) if prepare is not None else None
        except Exception:  # a bug in prepare must not leave the SYN unanswered
            log.exception("preparing a connection to port %d failed", req.port)
            res = None
        if inspect.isawaitable(res):
            self._spawn(self._on_request(req, res))
        else:
            self._answer_request(req, res)

    async def _on_request(self, req: ev.ConnectionRequest, pending: Awaitable[Any]) -> None:
        try:
            prepared = await pending
        except Exception:  # a bug in prepare must not leave the SYN unanswered or the task failed
            log.exception("preparing a connection to port %d failed", req.port)
            prepared = None
        self._answer_request(req, prepared)

    def _answer_request(self, req: ev.ConnectionRequest, prepared: Any) -> None:
        if self.closed:
            if prepared is not None:
                self._discard_value(req.port, prepared)
            return
        now = self._loop.time()
        if prepared is None:
            self.stack.refuse_request(req, now)
        elif isinstance(prepared, Refuse):
            self.stack.refuse_request(req, now, prepared)
        else:
            conn = self.stack.accept_request(req, now)
            if conn is None:
                self._discard_value(req.port, prepared)
            else:
                self._prepared[conn] = prepared
        self._kick()

    def _discard_value(self, port: int, prepared: Any) -> None:
        discard = self._discard.get(port) or self._discard.get(0)
        if discard is not None:
            discard(prepared)

    def _drop_prepared(self, conn: TcpConnection) -> None:
        if self._prepared:
            prepared = self._prepared.pop(conn, None)
            if prepared is not None:
                self._discard_value(conn.local_port, prepared)


class Dial:
    """A connection being opened by :meth:`StackDriver.open_connection_cb`; to the driver it
    looks like the future :meth:`StackDriver.open_connection` waits on."""

    __slots__ = ("_driver", "_conn", "_done", "_timer", "_finished")

    def __init__(self, driver: StackDriver, conn: TcpConnection,
                 done: Callable[[Any, Any, Exception | None], None]):
        self._driver = driver
        self._conn = conn
        self._done: Callable[[Any, Any, Exception | None], None] | None = done
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    def done(self) -> bool:
        return self._finished

    def _end(self) -> Callable[[Any, Any, Exception | None], None] | None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._done = self._done, None
        return done

    def set_result(self, _: object) -> None:
        if self._finished:
            return
        done = self._end()
        reader, writer = self._driver._attach(self._conn)
        if done is not None:
            self._call(done, reader, writer, None)

    def set_exception(self, exc: Exception) -> None:
        if self._finished:
            return
        done = self._end()
        if done is not None:
            self._call(done, None, None, exc)

    def _call(self, done: Callable[[Any, Any, Exception | None], None], reader: Any, writer: Any,
              exc: Exception | None) -> None:
        try:
            done(reader, writer, exc)
        except Exception:  # (from inside a flush: the dialler's bug must not break it)
            log.exception("a dial's callback failed")
            if writer is not None:
                writer.abort()

    def cancel(self) -> None:
        """Abandon the dial (the connection is reset if it got through); ``done`` is not called."""
        if self._finished:
            return
        self._end()
        self._abort()

    def _abort(self) -> None:
        d = self._driver
        d._connecting.pop(self._conn, None)
        self._conn.abort()
        d._kick()

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        done = self._end()
        self._abort()
        if done is not None:
            self._call(done, None, None, TimeoutError(f"connecting to {self._conn.remote_ip}:"
                                                      f"{self._conn.remote_port} timed out"))


class _Link:
    """What a reader or writer needs of its connection. Not the ``_Stream`` itself: that would be a
    reference cycle (stream -> reader -> stream), and every connection's objects would wait for
    the garbage collector instead of going when the last reference does."""

    __slots__ = ("driver", "conn")

    def __init__(self, driver: StackDriver, conn: TcpConnection):
        self.driver = driver
        self.conn = conn


class _Stream:
    """Glue between one connection and its reader/writer pair."""

    __slots__ = ("driver", "conn", "reader", "writer")

    def __init__(self, driver: StackDriver, conn: TcpConnection):
        self.driver = driver
        self.conn = conn
        link = _Link(driver, conn)
        self.reader = NetstackStreamReader(link)
        self.writer = NetstackStreamWriter(link, self.reader)

    def on_readable(self) -> None:
        self.reader._wake()

    def fail(self, exc: Exception) -> None:
        self.reader._fail(exc)
        self.writer._fail(exc)


class NetstackStreamReader:
    """An asyncio.StreamReader look-alike reading straight from the connection's buffer."""

    def __init__(self, stream: _Link, limit: int = DEFAULT_LIMIT):
        self._s = stream
        self._buf = bytearray()  # only used by readuntil/readexactly look-ahead
        self._waiter: asyncio.Future[None] | None = None
        self._exc: Exception | None = None
        self._limit = limit
        self._on_data: Callable[[], None] | None = None

    def set_data_callback(self, cb: Callable[[], None] | None) -> None:
        """Call ``cb()`` (instead of waking a ``read``) when data, EOF or an error arrives, from
        the flush that received it: a relay then takes the bytes without a task switch or a loop
        turn (``overlay.proxy.splice``). ``cb`` takes them with :meth:`take`."""
        self._on_data = cb

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes without waiting: b'' at EOF; raises BlockingIOError when none are
        there yet and the stream's error if it failed."""
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        try:
            return self._s.conn.recv(n)
        except (BlockingIOError, ConnectionResetError):
            if self._exc is not None:
                raise self._exc from None
            raise

    def _wake(self) -> None:
        if self._on_data is not None:
            self._on_data()
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._exc = exc
        self._wake()

    def exception(self) -> Exception | None:
        return self._exc

    def at_eof(self) -> bool:
        return not self._buf and self._s.conn.at_eof

    async def _pull(self, n: int) -> bytes:
        """Up to ``n`` new bytes from the connection (b'' at EOF), waiting if none yet."""
        conn = self._s.conn
        while True:
            try:
                data = conn.recv(n)
            except BlockingIOError:
                if self._exc is not None:
                    raise self._exc from None
                self._waiter = self._s.driver._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            except ConnectionResetError:
                if self._exc is not None:
                    raise self._exc from None
                raise
            if data:
                self._s.driver._kick_if_pending()  # a window update may be due
            return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n < 0``: everything until EOF); b'' at EOF."""
        if n == 0:
            return b""
        if n < 0:
            chunks = [bytes(self._buf)]
            self._buf.clear()
            while data := await self._pull(READ_CHUNK):
                chunks.append(data)
            return b"".join(chunks)
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        return await self._pull(min(n, READ_CHUNK * 4))

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self._pull(max(n - len(self._buf), 1))
            if not data:
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            self._buf += data
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        start = 0
        while True:
            i = self._buf.find(separator, start)
            if i >= 0:
                end = i + len(separator)
                data = bytes(self._buf[:end])
                del self._buf[:end]
                return data
            if len(self._buf) > self._limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(self._buf))
            start = max(0, len(self._buf) - len(separator) + 1)
            data = await self._pull(self._limit)
            if not data:
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, None)
            self._buf += data

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial

    def __aiter__(self) -> NetstackStreamReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class NetstackStreamWriter:
    """An asyncio.StreamWriter look-alike writing into the connection's send buffer."""

    def __init__(self, stream: _Link, reader: NetstackStreamReader):
        self._s = stream
        self._reader = reader
        self._pending = bytearray()  # bytes the connection's send buffer could not take yet
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._close_waiters: list[asyncio.Future[None]] = []
        self._exc: Exception | None = None
        self._eof_requested = False
        self._orphan = False  # close() rather than write_eof(): discard input, bounded FIN-WAIT-2

    @property
    def connection(self) -> TcpConnection:
        return self._s.conn

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        conn = self._s.conn
        if name == "peername":
            return (conn.remote_ip, conn.remote_port)
        if name == "sockname":
            return (conn.local_ip, conn.local_port)
        if name == "connection":
            return conn
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._exc is not None:
            raise self._exc
        if self._eof_requested:
            raise RuntimeError("write after write_eof()/close()")
        if not data:
            return
        if self._pending:
            self._pending += data
            return
        n = self._s.conn.send(data)
        if n < len(data):
            self._pending += memoryview(data)[n:]
        self._s.driver._kick()

    def write_with_eof(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`write` then :meth:`write_eof` in one flush: the FIN rides on the last data
        segment instead of following in a segment of its own."""
        if self._exc is not None:
            raise self._exc
        if self._eof_requested:
            raise RuntimeError("write after write_eof()/close()")
        if data:
            if self._pending:
                self._pending += data
            else:
                n = self._s.conn.send(data)
                if n < len(data):
                    self._pending += memoryview(data)[n:]
        self.write_eof()  # flushes unless bytes wait for room
        if self._pending:
            self._s.driver._kick()

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))  # one write: one flush, the pieces share segments

    async def drain(self) -> None:
        """Wait until everything written has been taken into the TCP send buffer."""
        if self._exc is not None:
            raise self._exc
        while self._pending:
            fut = self._s.driver._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
            if self._exc is not None:
                raise self._exc

    def _on_writable(self) -> None:
        if self._pending:
            conn = self._s.conn
            try:
                n = conn.send(self._pending)
            except ConnectionError as e:
                self._fail(e)
                return
            del self._pending[:n]
        if not self._pending:
            self._wake_drain()
            if self._eof_requested:
                self._s.conn.close(orphan=self._orphan)
                self._s.driver._kick()

    @property
    def pending(self) -> int:
        """Bytes written that the connection's send buffer has not taken yet."""
        return len(self._pending)

    def when_drained(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` once everything written has been taken (or the stream failed)."""
        if not self._pending or self._exc is not None:
            cb()
            return
        fut = self._s.driver._loop.create_future()
        fut.add_done_callback(lambda _: cb())
        self._drain_waiters.append(fut)

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: FIN once everything written has been sent."""
        if self._eof_requested or self._exc is not None:
            return
        self._eof_requested = True
        if not self._pending:
            self._s.conn.close(orphan=self._orphan)
            self._s.driver._kick()
        self._s.driver._closing_writers.add(self)

    def close(self) -> None:
        """Finish sending what was written, then FIN; incoming data is discarded from then on
        (so a peer still sending is never stuck on our zero window)."""
        if self._orphan:
            return
        self._orphan = True
        if self._eof_requested:
            if not self._pending:
                self._s.conn.close(orphan=True)
                self._s.driver._kick()
        else:
            self.write_eof()
        self._reader._fail(ConnectionAbortedError("stream closed locally"))

    def abort(self) -> None:
        """Reset the connection at once."""
        self._orphan = True
        self._s.conn.abort()
        self._s.driver._streams.pop(self._s.conn, None)  # no event follows a local abort
        self._s.driver._kick()
        self._fail(ConnectionAbortedError("stream aborted locally"))

    def is_closing(self) -> bool:
        return self._eof_requested or self._exc is not None

    async def wait_closed(self) -> None:
        """Wait until our FIN is acknowledged (or the connection ended another way)."""
        if self._finished():
            return
        fut = self._s.driver._loop.create_future()
        self._close_waiters.append(fut)
        self._s.driver._closing_writers.add(self)
        await fut

    def is_closed(self) -> bool:
        """Closing and done (our FIN acknowledged, or the connection ended): :meth:`wait_closed`
        returns at once."""
        return (self._eof_requested or self._exc is not None) and self._finished()

    def _finished(self) -> bool:
        st = self._s.conn.state
        return self._exc is not None or st in (TcpState.CLOSED, TcpState.TIME_WAIT, TcpState.FIN_WAIT_2) or (
            self._eof_requested and not self._pending and st is TcpState.LAST_ACK and self._s.conn.unacked == 0
        )

    def _check_closed(self) -> None:
        if self._finished():
            self._s.driver._closing_writers.discard(self)
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._exc is None:
            self._exc = exc
        self._pending.clear()
        self._wake_drain()
        self._check_closed()


class NetstackDatagramEndpoint:
    """A bound UDP port: ``sendto`` never blocks; ``await recvfrom()`` returns (data, (ip, port)).
    At most ``max_queued`` datagrams wait; the oldest is dropped when more arrive."""

    def __init__(self, driver: StackDriver, sock: UdpSocket, max_queued: int):
        self._driver = driver
        self.socket = sock
        self._queue: deque[tuple[bytes, tuple[str, int]]] = deque(maxlen=max_queued)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def port(self) -> int:
        return self.socket.port

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.socket.sendto(data, addr)
        self._driver._kick()

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        while not self._queue:
            if self._closed:
                raise EOFError("UDP endpoint closed")
            self._waiter = self._driver._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def _deliver(self, data: bytes, addr: tuple[str, int]) -> None:
        self._queue.append((data, addr))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self.socket.close()
        self._driver._udp.pop(self.socket, None)
        self._close_local()

    def _close_local(self) -> None:
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

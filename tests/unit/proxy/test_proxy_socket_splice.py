"""The real Forward and Shares relay their kernel sockets through overlay.proxy.socket_end (no
asyncio transport or streams): a client -> Forward -> netstack A -> link -> netstack B -> Shares ->
kernel service chain, checked for data both ways, half-close, early data and EOF, backpressure,
resets, a failed dial and the idle timeout; and SocketEnd's own buffering on a socket pair."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
from polling import wait_async

from overlay.netstack import TcpConfig
from overlay.netstack.asyncio_glue import NothingListensError
from overlay.node import services
from overlay.node.services import OverlayDialer, Shares
from overlay.node.state import Peer
from overlay.proxy import splice
from overlay.proxy.dialer import DialError
from overlay.proxy.forward import Forward
from overlay.proxy.socket_end import HIGH_WATER, SocketEnd
from tests.unit.netstack.test_netstack_asyncio import B_IP, Link, run

SMALL = TcpConfig(send_buffer=32 * 1024, recv_buffer=32 * 1024)
DIALERS = pytest.mark.parametrize("dialer", ["callback", "task"])


class _Dialer:
    def __init__(self, link: Link):
        self.link = link

    async def open_connection(self, host: str, port: int):
        try:
            return await self.link.a.open_connection(B_IP, port)
        except NothingListensError:
            raise DialError(f"{host} shares port {port} but nothing listens there") from None


class Chain:
    """client -> Forward (A) -> link -> Shares (B) -> ``service(reader, writer)`` on 127.0.0.1.

    ``dialer``: "callback" is the node's OverlayDialer (the forward dials by callback, no task),
    "task" a plain async dialer (the forward's task path)."""

    def __init__(self, service, cfg: TcpConfig | None = None, idle: float | None = None,
                 listening: bool = True, dialer: str = "callback"):
        self.service = service
        self.cfg = cfg
        self.idle = idle
        self.listening = listening
        self.dialer = dialer

    async def __aenter__(self) -> Chain:
        self.link = Link(self.cfg)
        self.svc = await asyncio.start_server(self.service, "127.0.0.1", 0)
        svc_port = self.svc.sockets[0].getsockname()[1]
        if not self.listening:
            self.svc.close()
            await self.svc.wait_closed()
        self.shares = Shares()
        self.shares.attach(self.link.b)
        self.shares.add(svc_port, udp=False)
        if self.dialer == "callback":
            peer = Peer("bravo", b"k" * 32, "azMy", B_IP, True)
            dialer: object = OverlayDialer(lambda h: peer if h in ("bravo", B_IP) else None, lambda: self.link.a)
        else:
            dialer = _Dialer(self.link)
        self.fwd = Forward(dialer, 0, "bravo", svc_port, idle_timeout=self.idle)  # type: ignore[arg-type]
        await self.fwd.start()
        self.port = self.fwd.address[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.fwd.close()
        await asyncio.wait_for(self.fwd.wait_closed(), 10)
        self.svc.close()
        self.link.close()

    async def forward_idle(self) -> None:
        await wait_async(lambda: self.fwd.active == 0, timeout=10, what="the forward's connections ended")


@pytest.fixture
def socket_splices(monkeypatch):
    made: list[splice.Splice] = []
    real = splice.Splice.for_socket.__func__  # type: ignore[attr-defined]

    def counted(cls, *a, **kw):
        sp = real(cls, *a, **kw)
        if sp is not None:
            made.append(sp)
        return sp

    monkeypatch.setattr(splice.Splice, "for_socket", classmethod(counted))
    return made


@DIALERS
def test_round_trips_and_half_close(socket_splices, dialer):
    async def service(r, w):
        while line := await r.readline():
            w.write(line.upper())
        w.write(b"bye\n")  # after the client's EOF: the half-closed direction still works
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            for i in range(20):
                w.write(b"ping %d\n" % i)
                assert await r.readline() == b"PING %d\n" % i
            w.write_eof()
            assert await r.read() == b"bye\n"
            w.close()
            await c.forward_idle()
        assert len(socket_splices) == 2  # the forward's and the share's
        assert all(isinstance(sp._tr, SocketEnd) for sp in socket_splices)

    run(main())


def test_the_share_stops_looking_for_an_eof_behind_short_reads_on_a_long_conversation(socket_splices, monkeypatch):
    """A service that answers and closes gets its FIN sent with the answer (the share looks for
    the EOF behind a short read), but only for a connection's first few reads: on a long
    conversation each look would be a system call on every round trip."""
    looks: list[int] = []
    real_recv = splice.Splice.data_received

    def counted(self, data):
        before = self._read_ahead
        real_recv(self, data)
        if before:
            looks.append(before - self._read_ahead)
    monkeypatch.setattr(splice.Splice, "data_received", counted)

    async def service(r, w):
        while line := await r.readline():
            w.write(line.upper())
            await w.drain()
        w.close()

    async def main():
        async with Chain(service) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            for i in range(30):
                w.write(b"ping %d\n" % i)
                assert await r.readline() == b"PING %d\n" % i
            w.close()
            await c.forward_idle()
        assert len(socket_splices) == 2
        # the share's splice looked behind its first short reads, found nothing, and stopped:
        # no look for the other answers
        assert len(looks) == sum(looks) == splice.READ_AHEAD_LOOKS

    run(main())


@DIALERS
def test_a_client_that_sends_and_shuts_down_at_once_still_gets_the_answer(socket_splices, dialer):
    """Bytes and EOF from the client before the dial completed reach the service in order, and
    the answer written after that EOF comes back."""
    async def service(r, w):
        got = await r.read()
        w.write(b"got " + got)
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, dialer=dialer) as c:
            s = socket.create_connection(("127.0.0.1", c.port))
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(s, b"request")
            s.shutdown(socket.SHUT_WR)
            answer = bytearray()
            while chunk := await loop.sock_recv(s, 4096):
                answer += chunk
            assert bytes(answer) == b"got request"
            s.close()
            await c.forward_idle()

    run(main())


@DIALERS
def test_bulk_both_ways_with_small_buffers_is_intact(socket_splices, dialer):
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)

    async def service(r, w):
        got = await r.read()  # everything until the client's EOF, then the answer
        w.write(hashlib.sha256(got).digest() + down)
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, SMALL, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(up)
            await w.drain()
            w.write_eof()
            answer = await r.read()
            assert answer[:32] == hashlib.sha256(up).digest()
            assert answer[32:] == down
            w.close()
            await c.forward_idle()
        assert len(socket_splices) == 2

    run(main())


@DIALERS
def test_a_slow_reader_holds_the_stream_back_without_unbounded_buffers(socket_splices, dialer):
    big = os.urandom(16 << 20)  # more than the kernel's socket buffers hold

    async def service(r, w):
        w.write(big)
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, SMALL, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            await wait_async(lambda: len(socket_splices) == 2 and socket_splices[0]._write_paused,
                             timeout=10, what="the forward's socket end stops taking bytes")
            # the client reads nothing: its socket end holds at most a high-water mark and a chunk,
            # the rest waits in the netstack connection, whose window closes
            fwd_end = socket_splices[0]._tr
            assert fwd_end.get_write_buffer_size() <= HIGH_WATER + splice.CHUNK
            (conn,) = c.link.a.stack.connections
            await wait_async(lambda: conn.unread > 0, timeout=10, what="bytes wait in the netstack connection")
            assert conn.unread <= SMALL.recv_buffer
            assert fwd_end.get_write_buffer_size() <= HIGH_WATER + splice.CHUNK
            got = bytearray()
            while chunk := await r.read(65536):
                got += chunk
            assert bytes(got) == big
            w.close()
            await c.forward_idle()

    run(main())


@DIALERS
def test_a_service_reset_ends_both_relays(socket_splices, dialer):
    async def service(r, w):
        await r.readline()
        w.transport.abort()  # RST toward B's relay

    async def main():
        async with Chain(service, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"hello\n")
            await w.drain()
            try:
                assert await asyncio.wait_for(r.read(), 10) == b""
            except ConnectionResetError:
                pass
            w.close()
            await c.forward_idle()
            await wait_async(lambda: all(conn.state.name in ("CLOSED", "TIME_WAIT")
                                         for conn in c.link.a.stack.connections),
                             timeout=10, what="A's connections ended")

    run(main())


@DIALERS
def test_nothing_listening_behind_the_share_resets_the_client(dialer):
    async def service(r, w):
        w.close()

    async def main():
        async with Chain(service, listening=False, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 10)
            w.close()
            await c.forward_idle()

    run(main())


@DIALERS
def test_idle_pairs_are_closed(socket_splices, dialer):
    async def service(r, w):
        await r.read()
        w.close()

    async def main():
        async with Chain(service, idle=0.3, dialer=dialer) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"x")
            await w.drain()
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the idle timeout
            w.close()
            await c.forward_idle()
        assert len(socket_splices) == 2

    run(main())


def test_socket_end_buffers_pauses_and_flushes_before_closing():
    class Proto:
        def __init__(self):
            self.calls: list[str] = []
            self.data = bytearray()
            self.lost: list = []

        def data_received(self, data):
            self.data += data

        def eof_received(self):
            self.calls.append("eof")
            return True

        def pause_writing(self):
            self.calls.append("pause")

        def resume_writing(self):
            self.calls.append("resume")

        def connection_lost(self, exc):
            self.lost.append(exc)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        end = SocketEnd(a)
        proto = Proto()
        end.set_protocol(proto)
        end.resume_reading()
        payload = os.urandom(8 << 20)  # more than the socket pair holds
        end.write(payload)
        assert proto.calls == ["pause"] and end.get_write_buffer_size() > 0
        end.write_eof()  # after the buffered bytes
        await loop.sock_sendall(b, b"hello")
        b.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := await loop.sock_recv(b, 1 << 20):
            got += chunk
        assert bytes(got) == payload  # then EOF: the shutdown waited for the buffer
        assert proto.calls[0] == "pause" and "resume" in proto.calls
        await wait_async(lambda: "eof" in proto.calls, timeout=10, what="the EOF read")
        assert bytes(proto.data) == b"hello"
        end.write(b"ignored after write_eof")
        end.close()
        await asyncio.wait_for(end.wait_closed(), 10)
        assert proto.lost == [None] and a.fileno() == -1
        b.close()

        # close() with bytes still buffered sends them first; abort() drops them
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        end = SocketEnd(a)
        end.set_protocol(Proto())
        end.write(payload)
        end.close()
        got = bytearray()
        while chunk := await loop.sock_recv(b, 1 << 20):
            got += chunk
        assert bytes(got) == payload
        await asyncio.wait_for(end.wait_closed(), 10)
        b.close()
        a, b = socket.socketpair()
        a.setblocking(False)
        end = SocketEnd(a)
        end.set_protocol(Proto())
        end.write(payload)
        end.abort()
        assert a.fileno() == -1
        await asyncio.wait_for(end.wait_closed(), 1)
        b.close()

    run(main())


def test_a_dial_that_times_out_or_a_closed_forward_resets_the_client(monkeypatch):
    """The callback dial: no answer within the dial timeout resets the client; a forward closed
    while a dial is pending closes its client too and counts no connection left."""
    monkeypatch.setattr(services, "DIAL_TIMEOUT", 0.3)

    async def service(r, w):
        w.close()

    async def main():
        async with Chain(service) as c:
            c.link.blocked = True  # nothing crosses: the SYN is never answered
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 10)
            w.close()
            await c.forward_idle()
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            await wait_async(lambda: c.fwd.active == 1, timeout=10, what="the dial pending")
            c.fwd.close()
            assert c.fwd.active == 0
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()

    run(main())

"""relay() between kernel sockets and netstack streams goes through overlay.proxy.splice (callbacks,
no tasks): a forward-like and a share-like end joined by an in-memory netstack link, checked for
data both ways, half-close, backpressure, resets and the idle timeout."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from overlay.netstack import TcpConfig
from overlay.netstack.asyncio_glue import StackDriver
from overlay.proxy import splice
from overlay.proxy.relay import relay
from tests.unit.netstack.test_netstack_asyncio import B_IP, Link, run

SMALL = TcpConfig(send_buffer=32 * 1024, recv_buffer=32 * 1024)


class Chain:
    """client -> kernel listener (forward) -> netstack A -> link -> netstack B -> kernel service.

    ``service(reader, writer)`` is the kernel service; the splices used are counted."""

    def __init__(self, service, cfg: TcpConfig | None = None, idle: float | None = 30.0):
        self.service = service
        self.cfg = cfg
        self.idle = idle
        self.relays: list[asyncio.Task] = []
        self.client_side: list[asyncio.StreamWriter] = []  # the forward's kernel writers
        self.service_side: list[asyncio.StreamWriter] = []  # the share's kernel writers

    async def __aenter__(self) -> Chain:
        self.link = Link(self.cfg)
        self.svc = await asyncio.start_server(self.service, "127.0.0.1", 0)
        svc_port = self.svc.sockets[0].getsockname()[1]

        async def share(nr, nw):  # B: the peer's connection to a shared port
            self.relays.append(asyncio.current_task())
            kr, kw = await asyncio.open_connection("127.0.0.1", svc_port)
            self.service_side.append(kw)
            await relay(nr, nw, kr, kw, self.idle)

        self.link.b.listen(80, share)

        async def forward(kr, kw):  # A: a local client of the forward
            self.relays.append(asyncio.current_task())
            self.client_side.append(kw)
            nr, nw = await self.link.a.open_connection(B_IP, 80)
            await relay(kr, kw, nr, nw, self.idle)

        self.fwd = await asyncio.start_server(forward, "127.0.0.1", 0)
        self.port = self.fwd.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.fwd.close()
        self.svc.close()
        for t in self.relays:
            t.cancel()
        await asyncio.gather(*self.relays, return_exceptions=True)
        self.link.close()

    async def relays_done(self, timeout: float = 10) -> None:
        await asyncio.wait_for(asyncio.gather(*self.relays, return_exceptions=True), timeout)


@pytest.fixture
def count_splices(monkeypatch):
    used = []
    real = splice.Splice.run

    async def counted(self, *a, **kw):
        used.append(self)
        return await real(self, *a, **kw)

    monkeypatch.setattr(splice.Splice, "run", counted)
    return used


def test_round_trips_and_half_close_through_two_splices(count_splices):
    async def service(r, w):
        while line := await r.readline():
            w.write(line.upper())
        w.write(b"bye\n")  # after the client's EOF: the half-closed direction still works
        await w.drain()
        w.close()

    async def main():
        async with Chain(service) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            for i in range(20):
                w.write(b"ping %d\n" % i)
                assert await r.readline() == b"PING %d\n" % i
            w.write_eof()
            assert await r.read() == b"bye\n"
            w.close()
            await c.relays_done()
        assert len(count_splices) == 2  # the forward's and the share's

    run(main())


def test_bulk_both_ways_with_small_buffers_is_intact(count_splices):
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)

    async def service(r, w):
        got = await r.read()  # everything until the client's EOF, then the answer
        w.write(hashlib.sha256(got).digest() + down)
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, SMALL) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(up)
            await w.drain()
            w.write_eof()
            answer = await r.read()
            assert answer[:32] == hashlib.sha256(up).digest()
            assert answer[32:] == down
            w.close()
            await c.relays_done()
        assert len(count_splices) == 2

    run(main())


def test_a_slow_reader_holds_the_stream_back_without_unbounded_buffers(count_splices):
    big = os.urandom(16 << 20)  # more than the kernel's socket buffers hold

    async def service(r, w):
        w.write(big)
        await w.drain()
        w.close()

    async def main():
        async with Chain(service, SMALL) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            await asyncio.sleep(1.0)  # the client reads nothing for a while
            # the forward's socket stopped taking bytes (pause_writing), so they wait in the
            # netstack connection, whose window closed: nothing grows without bound
            (kw,) = c.client_side
            assert kw.transport.get_write_buffer_size() <= 64 * 1024 + splice.CHUNK
            (conn,) = c.link.a.stack.connections
            assert 0 < conn.unread <= SMALL.recv_buffer
            got = bytearray()
            while chunk := await r.read(65536):
                got += chunk
            assert bytes(got) == big
            w.close()
            await c.relays_done()

    run(main())


def test_a_service_reset_ends_both_relays(count_splices):
    async def service(r, w):
        await r.readline()
        w.transport.abort()  # RST toward B's relay

    async def main():
        async with Chain(service) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"hello\n")
            await w.drain()
            try:
                assert await asyncio.wait_for(r.read(), 10) == b""
            except ConnectionResetError:
                pass
            w.close()
            await c.relays_done()
            assert all(conn.state.name in ("CLOSED", "TIME_WAIT") for conn in c.link.a.stack.connections)

    run(main())


def test_a_failing_kernel_socket_ends_its_pair_not_the_netstack_flush(count_splices):
    """shutdown() on a socket the service already reset raises ENOTCONN: from inside the netstack
    flush that delivered the peer's FIN. Only that pair may end; nothing reaches the loop."""

    async def service(r, w):
        await r.read()
        w.close()

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with Chain(service) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"x")
            await w.drain()
            while not c.service_side:
                await asyncio.sleep(0.01)

            def broken_write_eof():
                raise OSError(107, "Transport endpoint is not connected")

            c.service_side[0].transport.write_eof = broken_write_eof
            w.write_eof()  # the FIN reaches B's splice, whose write_eof fails
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            await c.relays_done()
        assert errors == []

    run(main())


def test_idle_pairs_are_closed(count_splices):
    async def service(r, w):
        await r.read()
        w.close()

    async def main():
        async with Chain(service, idle=0.3) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(b"x")
            await w.drain()
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the idle timeout
            w.close()
            await c.relays_done()
        assert len(count_splices) == 2

    run(main())


def test_other_stream_pairs_use_the_task_relay():
    class Fake:
        pass

    assert splice.Splice.prepare(Fake(), Fake(), Fake(), Fake()) is None
    assert StackDriver  # (the glue is what the splice pairs with)

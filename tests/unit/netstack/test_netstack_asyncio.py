"""The asyncio glue: two StackDrivers joined by an in-memory link on one event loop."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import weakref

import pytest
from polling import wait_async

from overlay.netstack import Stack, TcpConfig, TcpState
from overlay.netstack.asyncio_glue import StackDriver
from overlay.netstack.wire import ACK, FIN, parse_ipv4, parse_tcp

A_IP, B_IP = "10.1.0.1", "10.1.0.2"


class Link:
    """Two drivers whose packets cross via ``call_soon`` (optionally dropping some)."""

    def __init__(self, cfg: TcpConfig | None = None, loss: float = 0.0):
        loop = asyncio.get_running_loop()
        self.rng = random.Random(5)
        self.loss = loss
        self.blocked = False
        self.a = StackDriver(Stack(A_IP, now=loop.time(), tcp=cfg), self._to(lambda: self.b))
        to_a = self._to(lambda: self.a)
        self.batches: list[int] = []

        def batch(packets: list[bytes]) -> None:  # B uses the batched callback
            self.batches.append(len(packets))
            for p in packets:
                to_a(p)

        self.b = StackDriver(Stack(B_IP, now=loop.time(), tcp=cfg), lambda p: None, send_packets=batch)

    def _to(self, target):
        loop = asyncio.get_running_loop()

        def send(pkt: bytes) -> None:
            if self.blocked or (self.loss and self.rng.random() < self.loss):
                return
            loop.call_soon(target().receive_packet, pkt)

        return send

    def close(self) -> None:
        self.a.close()
        self.b.close()


def run(coro, timeout: float = 30):
    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def test_echo_with_stream_helpers():
    async def main():
        link = Link()

        async def echo(reader, writer):
            line = await reader.readline()
            writer.write(line.upper())
            body = await reader.readexactly(5)
            writer.write(body[::-1])
            await writer.drain()
            assert await reader.read() == b""
            writer.close()

        link.b.listen(7, echo)
        try:
            reader, writer = await link.a.open_connection(B_IP, 7)
            assert writer.get_extra_info("peername") == (B_IP, 7)
            assert writer.get_extra_info("sockname")[0] == A_IP
            writer.write(b"hello\n")
            assert await reader.readline() == b"HELLO\n"
            writer.write(b"abcde")
            assert await reader.readexactly(5) == b"edcba"
            writer.write_eof()
            assert await reader.read() == b""
            await writer.wait_closed()
            assert writer.connection.state in (TcpState.TIME_WAIT, TcpState.CLOSED)
            assert link.batches and all(link.batches)  # B's packets went out through send_packets
        finally:
            link.close()

    run(main())


def test_refused_connection_raises_with_port_and_peer_is_told():
    async def main():
        link = Link()
        refused = []
        link.b.on_port_refused = lambda port, remote: refused.append((port, remote))
        try:
            with pytest.raises(ConnectionRefusedError, match=r"10\.1\.0\.2:3389 refused"):
                await link.a.open_connection(B_IP, 3389)
            assert refused and refused[0][0] == 3389 and refused[0][1][0] == A_IP
        finally:
            link.close()

    run(main())


def test_connect_timeout_aborts_cleanly():
    async def main():
        link = Link()
        link.blocked = True
        try:
            with pytest.raises(asyncio.TimeoutError):
                await link.a.open_connection(B_IP, 80, timeout=0.3)
            assert link.a.stack.connections == []
        finally:
            link.close()

    run(main())


def test_backpressure_both_ways_keeps_memory_bounded():
    cfg = TcpConfig(send_buffer=64 * 1024, recv_buffer=64 * 1024)

    async def main():
        link = Link(cfg)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        link.b.listen(9, lambda r, w: accepted.set_result((r, w)))
        try:
            reader, writer = await link.a.open_connection(B_IP, 9)
            sreader, swriter = await accepted
            payload = random.Random(1).randbytes(1024 * 1024)
            writer.write(payload)
            drain = asyncio.ensure_future(writer.drain())
            # let the connection settle: the server application does not read
            for _ in range(50):
                await asyncio.sleep(0.01)
            server_conn = swriter.connection
            assert not drain.done()  # 1 MiB cannot fit 64 KiB send + 64 KiB receive buffers
            assert server_conn.unread <= 64 * 1024 + 1400
            assert writer.connection.unacked <= 64 * 1024
            got = hashlib.sha256()
            n = 0
            while n < len(payload):
                chunk = await sreader.read(10_000)
                assert chunk
                got.update(chunk)
                n += len(chunk)
                assert server_conn.unread <= 64 * 1024 + 1400
            await drain
            assert got.digest() == hashlib.sha256(payload).digest()
        finally:
            link.close()

    run(main())


def test_transfer_over_lossy_link():
    async def main():
        link = Link(loss=0.05)
        result = asyncio.get_running_loop().create_future()

        async def sink(reader, writer):
            h = hashlib.sha256()
            while data := await reader.read(65536):
                h.update(data)
            result.set_result(h.hexdigest())
            writer.close()

        link.b.listen(5001, sink)
        try:
            reader, writer = await link.a.open_connection(B_IP, 5001)
            data = random.Random(2).randbytes(2_000_000)
            for i in range(0, len(data), 100_000):
                writer.write(data[i : i + 100_000])
                await writer.drain()
            writer.write_eof()
            assert await result == hashlib.sha256(data).hexdigest()
            assert await reader.read() == b""
        finally:
            link.close()

    run(main(), timeout=60)


def test_reset_surfaces_as_connection_reset_error():
    async def main():
        link = Link()
        server_writer = asyncio.get_running_loop().create_future()
        link.b.listen(10, lambda r, w: server_writer.set_result(w))
        try:
            reader, writer = await link.a.open_connection(B_IP, 10)
            (await server_writer).abort()
            with pytest.raises(ConnectionResetError):
                await reader.read(10)
            with pytest.raises(ConnectionResetError):
                writer.write(b"x")
                await writer.drain()
        finally:
            link.close()

    run(main())


def test_udp_endpoints():
    async def main():
        link = Link()
        try:
            ea = link.a.udp_bind(5000)
            eb = link.b.udp_bind(53)
            ea.sendto(b"question", (B_IP, 53))
            data, addr = await eb.recvfrom()
            assert (data, addr) == (b"question", (A_IP, 5000))
            eb.sendto(b"answer", addr)
            assert await ea.recvfrom() == (b"answer", (B_IP, 53))
            eb.close()
            with pytest.raises(EOFError):
                await eb.recvfrom()
        finally:
            link.close()

    run(main())


def test_deferred_listen_accepts_refuses_and_survives_a_failing_prepare():
    """listen(prepare=...): accepted connections get the prepared value; None refuses with
    NothingListensError at the dialer; a prepare that raises refuses too (and is logged)."""
    from overlay.netstack.asyncio_glue import NothingListensError

    async def main():
        link = Link()
        verdicts = iter(["ctx", None, RuntimeError("bug")])
        got = []

        async def prepare(remote):
            v = next(verdicts)
            if isinstance(v, Exception):
                raise v
            return v

        async def serve(reader, writer, prepared):
            got.append(prepared)
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        link.b.listen(7000, serve, prepare=prepare, discard=lambda v: None)
        try:
            reader, writer = await link.a.open_connection(B_IP, 7000)
            assert await reader.read() == b"hi" and got == ["ctx"]
            writer.close()
            for _ in range(2):
                with pytest.raises(NothingListensError, match="nothing listens"):
                    await link.a.open_connection(B_IP, 7000)
        finally:
            link.close()

    run(main())


def test_streams_are_released_however_a_connection_ends():
    """Nothing stays behind per connection in the driver: after a clean close, a local abort, or
    an orphaned close whose peer never sends FIN (FIN-WAIT-2 timeout), the stream entry, tasks and
    closing writers are gone on both sides."""
    async def main():
        link = Link(TcpConfig(fin_wait_2_timeout=0.2))
        held = []

        async def serve(reader, writer):
            data = await reader.read(1)
            if data == b"k":
                held.append(writer)  # never closes: the peer's orphan waits in FIN-WAIT-2
                return
            writer.write(b"x" * 100)
            await writer.drain()
            writer.close()

        link.b.listen(9, serve)
        try:
            for kind in (b"q", b"a", b"k"):
                reader, writer = await link.a.open_connection(B_IP, 9)
                writer.write(kind)
                await writer.drain()
                if kind == b"q":
                    assert await reader.read() == b"x" * 100
                    writer.close()
                elif kind == b"a":
                    await asyncio.sleep(0.05)
                    writer.abort()
                else:
                    await asyncio.sleep(0.05)
                    writer.close()
                await writer.wait_closed()
            assert held  # B keeps that one open; A's orphan must still be released
            deadline = asyncio.get_running_loop().time() + 5
            while link.a._streams or link.a._closing_writers or link.a._tasks:
                assert asyncio.get_running_loop().time() < deadline, (link.a._streams, link.a._closing_writers)
                await asyncio.sleep(0.05)
            assert not link.a._connecting
            assert all(c.state is TcpState.TIME_WAIT for c in link.a.stack.connections)
        finally:
            link.close()

    run(main())


def test_output_leaves_in_the_callback_that_made_it():
    """No loop turn between a write (or an inbound packet) and the packets it makes: a flush
    scheduled for later would add that turn to every round trip."""

    async def main():
        loop = asyncio.get_running_loop()
        sent_a: list[bytes] = []
        sent_b: list[bytes] = []
        a = StackDriver(Stack(A_IP, now=loop.time()), sent_a.append)
        b = StackDriver(Stack(B_IP, now=loop.time()), sent_b.append)
        accepted = []
        b.listen(7, lambda r, w: accepted.append((r, w)))
        task = asyncio.ensure_future(a.open_connection(B_IP, 7))
        await asyncio.sleep(0)  # open_connection runs up to its wait: the SYN is out
        assert len(sent_a) == 1
        b.receive_packet(sent_a.pop())  # answered (SYN-ACK) before receive_packet returns
        assert len(sent_b) == 1
        a.receive_packet(sent_b.pop())
        assert not sent_a  # the handshake's ACK waits for data written at once (a timer due now)
        reader, writer = await task
        assert len(sent_a) == 1  # none was: the timer sent the ACK alone
        b.receive_packets([sent_a.pop()])
        (_, b_writer), = accepted
        writer.write(b"ping")
        assert len(sent_a) == 1  # the segment left inside write()
        b.receive_packets([sent_a.pop()])
        b_writer.write(b"pong")  # (B's reply carries the ACK: nothing else was sent)
        assert len(sent_b) == 1
        a.receive_packet(sent_b.pop())
        assert await reader.read(10) == b"pong"
        a.close()
        b.close()

    run(main())


def test_data_written_once_connected_carries_the_handshake_ack():
    """A dialler that writes as soon as it is connected (a forward whose client spoke first)
    sends its data with the handshake's last ACK: one packet, and the server has the connection
    and the bytes at once; a stream end written with the data rides on the same segment."""

    async def main():
        loop = asyncio.get_running_loop()
        sent_a: list[bytes] = []
        sent_b: list[bytes] = []
        a = StackDriver(Stack(A_IP, now=loop.time()), sent_a.append)
        b = StackDriver(Stack(B_IP, now=loop.time()), sent_b.append)
        accepted = []
        b.listen(7, lambda r, w: accepted.append((r, w)))

        async def dial():
            reader, writer = await a.open_connection(B_IP, 7)
            writer.write_with_eof(b"ping")
            return reader, writer

        task = asyncio.ensure_future(dial())
        await asyncio.sleep(0)
        b.receive_packet(sent_a.pop())  # SYN
        a.receive_packet(sent_b.pop())  # SYN-ACK
        reader, writer = await task
        assert len(sent_a) == 1  # ACK, data and FIN in one segment
        seg = parse_tcp(parse_ipv4(sent_a[0]))
        assert seg.flags & (ACK | FIN) == ACK | FIN and seg.data == b"ping"
        b.receive_packets([sent_a.pop()])
        (b_reader, b_writer), = accepted
        assert await b_reader.read() == b"ping"
        b_writer.write_with_eof(b"pong")
        assert len(sent_b) == 1
        a.receive_packet(sent_b.pop())
        assert await reader.read() == b"pong"
        assert len(sent_a) == 1  # only the ACK of B's FIN (the handshake's went with the data)
        a.close()
        b.close()

    run(main())


def test_a_finished_stream_is_freed_without_the_garbage_collector():
    """No reference cycle per connection (stream <-> reader/writer): once the application drops a
    closed connection's reader and writer, they go at once, not at the next collection."""
    async def main():
        link = Link()

        async def serve(reader, writer):
            await reader.read(1)
            writer.write(b"x" * 100)
            writer.close()

        link.b.listen(9, serve)
        gc.disable()
        try:
            reader, writer = await link.a.open_connection(B_IP, 9)
            writer.write(b"q")
            assert await reader.read() == b"x" * 100
            writer.close()
            await writer.wait_closed()
            await wait_async(lambda: not link.a._streams and not link.b._streams and not link.b._tasks, 10,
                             "both drivers to let go of the connection")
            refs = [weakref.ref(reader), weakref.ref(writer)]
            del reader, writer
            assert [r() for r in refs] == [None, None]
        finally:
            gc.enable()
            link.close()

    run(main())

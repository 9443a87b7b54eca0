"""The asyncio glue of the node's DNS (overlay/node/dns.py): UDP and TCP on one address and port.

TCP: each message has a 2-byte length prefix; at most ``MAX_TCP_CONNECTIONS`` at once (more are
closed at once), each closed after ``TCP_IDLE`` seconds without a query.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from overlay.node.dns import MAX_TCP_QUERY, Responder

log = logging.getLogger("overlay.node.dns")

MAX_TCP_CONNECTIONS = 32
TCP_IDLE = 10.0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder):
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        out = self.responder.handle(data, addr, asyncio.get_running_loop().time())
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DnsServer:
    def __init__(self, responder: Responder):
        self.responder = responder
        self.address: tuple[str, int] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (UDP, then TCP on the port UDP got); OSError if it cannot."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.responder), local_addr=(host, port),
                                                           family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        port = transport.get_extra_info("sockname")[1]
        try:
            self._tcp = await asyncio.start_server(self._connection, host, port, reuse_address=True)
        except OSError:
            transport.close()
            raise
        self._udp = transport
        self.address = (host, port)
        log.info("DNS for peers on %s:%d (UDP and TCP)", host, port)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._conns):
            t.cancel()
        self._udp = self._tcp = None
        self.address = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= MAX_TCP_CONNECTIONS or task is None:
            self.responder.stats["rate_limited"] += 1
            writer.close()
            return
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                size = int.from_bytes(head, "big")
                if size > MAX_TCP_QUERY:
                    self.responder.stats["malformed"] += 1
                    return
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                out = self.responder.handle(data, peer, loop.time(), tcp=True)
                if out is None:
                    return
                writer.write(len(out).to_bytes(2, "big") + out)
                await asyncio.wait_for(writer.drain(), TCP_IDLE)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

"""asyncio SOCKS5 and HTTP proxy servers: thin glue around ``socks5.py`` / ``http.py`` and a Dialer.

Both refuse to listen beyond loopback unless authentication is configured (a proxy open to the
LAN would hand the whole overlay to anyone there), bound the number of clients and the time a
client may take to send its request, and map every :class:`~overlay.proxy.dialer.DialError` to the reply
its class names (SOCKS5 reply code / HTTP status with the human message as body). No exception
from a client escapes: each connection is served in its own task and any failure closes only it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from overlay.proxy import http, socks5
from overlay.proxy.dialer import Dialer, DialError, StreamReaderLike, StreamWriterLike
from overlay.proxy.listen import ListenError, bound_address, format_address, is_loopback, start_tcp_server
from overlay.proxy.relay import CHUNK, close_now, close_writer, relay
from overlay.proxy.udpflows import UdpFlows

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 600.0  # seconds without traffic before a relayed connection is closed
UDP_IDLE_TIMEOUT = 120.0  # seconds without traffic before a UDP flow is closed
HANDSHAKE_TIMEOUT = 30.0  # seconds a client has to complete its SOCKS negotiation / HTTP head
MAX_CLIENTS = 512
LINGER_TIMEOUT = 2.0  # seconds spent discarding a client's unread input after an error response
LINGER_BYTES = 1 << 20


class AuthRequired(ListenError):
    """A proxy asked to listen beyond loopback without users to authenticate."""


class _ProxyServer:
    """Listening socket, client bookkeeping and dial error mapping shared by both proxies."""

    kind = "proxy"

    def __init__(
        self,
        dialer: Dialer,
        host: str,
        port: int,
        users: Mapping[str, str] | None = None,
        *,
        idle_timeout: float | None = IDLE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ):
        if not users and not is_loopback(host):
            raise AuthRequired(
                f"refusing to run the {self.kind} on {format_address(host, port)} without authentication: "
                "anyone who can reach it could use the overlay; require users with --proxy-user USER:PASSWORD "
                "(proxy_users in config.toml) or listen on 127.0.0.1"
            )
        self.dialer = dialer
        self.host = host
        self.port = port
        self.users = dict(users) if users else None
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Start listening; raises :class:`~overlay.proxy.listen.ListenError` (e.g. port already in use)."""
        self._server = await start_tcp_server(self._accept, self.host, self.port)
        log.info("%s listening on %s", self.kind, format_address(*self.address))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), e.g. to learn the port when started with port 0."""
        if self._server is None:
            raise RuntimeError(f"{self.kind} not started")
        return bound_address(self._server.sockets)

    @property
    def active(self) -> int:
        """Client connections being served (for status displays)."""
        return len(self._clients)

    def close(self) -> None:
        """Stop listening and drop every client connection."""
        if self._server is not None:
            self._server.close()
        for task in self._clients:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the listener and every client task have finished after :meth:`close`."""
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_clients:
            log.warning("%s: %d clients already, refusing another", self.kind, self.max_clients)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except OSError as e:  # resets, broken pipes, the handshake timeout
            log.debug("%s client %s: %s", self.kind, writer.get_extra_info("peername"), e)
        except asyncio.CancelledError:
            # close(): end quietly. (Python 3.11's start_server callback calls exception() on the
            # finished task, which raises for a cancelled one and logs a spurious error.)
            pass
        except Exception:
            log.exception("%s: unexpected error serving %s", self.kind, writer.get_extra_info("peername"))
        finally:
            self._clients.discard(task)
            close_now(writer)
        with contextlib.suppress(asyncio.CancelledError):
            await close_writer(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _dial(self, host: str, port: int) -> tuple[StreamReaderLike, StreamWriterLike]:
        """The dialer's stream, with any non-DialError failure turned into a generic DialError."""
        try:
            return await self.dialer.open_connection(host, port)
        except DialError:
            raise
        except Exception as e:
            log.exception("%s: dialer failed for %s:%d", self.kind, host, port)
            raise DialError(f"cannot connect to {host}:{port}: {e}") from None


class SocksServer(_ProxyServer):
    """A SOCKS5 proxy (CONNECT and UDP ASSOCIATE) whose destinations are opened by a Dialer."""

    kind = "SOCKS5 proxy"

    def __init__(
        self,
        dialer: Dialer,
        host: str = "127.0.0.1",
        port: int = 1080,
        users: Mapping[str, str] | None = None,
        *,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        **kw: Any,
    ):
        super().__init__(dialer, host, port, users, **kw)
        self.udp_idle_timeout = udp_idle_timeout

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = socks5.ServerConnection(self.users)
        request = await asyncio.wait_for(self._negotiate(conn, reader, writer), self.handshake_timeout)
        if request is None:
            return
        if request.command == socks5.CMD_CONNECT:
            await self._connect(conn, request, reader, writer)
        else:
            await self._associate(conn, request, reader, writer)

    async def _negotiate(
        self, conn: socks5.ServerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> socks5.Request | None:
        while True:
            data = await reader.read(4096)
            if not data:
                return None
            events = conn.receive_data(data)
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            for event in events:
                if isinstance(event, socks5.Rejected):
                    log.info("SOCKS client %s: %s", writer.get_extra_info("peername"), event.message)
                    return None
                return event

    async def _refuse(self, conn: socks5.ServerConnection, writer: asyncio.StreamWriter, e: DialError) -> None:
        log.info("SOCKS %s: %s (reply 0x%02x)", writer.get_extra_info("peername"), e.message, e.socks_reply)
        conn.reply(e.socks_reply)
        writer.write(conn.data_to_send())
        await writer.drain()

    async def _connect(
        self,
        conn: socks5.ServerConnection,
        request: socks5.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            up_reader, up_writer = await self._dial(request.host, request.port)
        except DialError as e:
            await self._refuse(conn, writer, e)
            return
        sockname = up_writer.get_extra_info("sockname")
        try:
            conn.reply(socks5.REP_SUCCEEDED, *(sockname[:2] if sockname else ("0.0.0.0", 0)))
        except ValueError:  # an odd sockname from a custom dialer: the address is informative only
            conn.reply(socks5.REP_SUCCEEDED)
        writer.write(conn.data_to_send())
        await relay(reader, writer, up_reader, up_writer, self.idle_timeout, conn.trailing_data())

    async def _associate(
        self,
        conn: socks5.ServerConnection,
        request: socks5.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        client_ip = writer.get_extra_info("peername")[0]
        local_ip = writer.get_extra_info("sockname")[0]
        loop = asyncio.get_running_loop()
        association = _UdpAssociation(self.dialer, client_ip, request.port, self.udp_idle_timeout)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: association, local_addr=(local_ip, 0))
        except OSError as e:
            await self._refuse(conn, writer, DialError(f"cannot open a UDP relay socket: {e.strerror or e}"))
            return
        try:
            conn.reply(socks5.REP_SUCCEEDED, *transport.get_extra_info("sockname")[:2])
            writer.write(conn.data_to_send())
            await writer.drain()
            # The association lives as long as its control connection (RFC 1928 section 7).
            while True:
                timeout = None
                if self.idle_timeout is not None:
                    timeout = association.last_activity + self.idle_timeout - loop.time()
                    if timeout <= 0:
                        log.debug("SOCKS UDP association of %s idle, closing", client_ip)
                        break
                try:
                    data = await asyncio.wait_for(reader.read(4096), timeout)
                except TimeoutError:
                    continue
                if not data:
                    break
        finally:
            association.close()


class _UdpAssociation(asyncio.DatagramProtocol):
    """The relay socket of one UDP ASSOCIATE: accepts datagrams from the client's address only."""

    def __init__(self, dialer: Dialer, client_ip: str, client_port: int, idle_timeout: float):
        self._dialer = dialer
        self._client_ip = client_ip
        self._client_port = client_port  # 0: not announced, locked to the first datagram's port
        self._client_addr: tuple[str, int] | None = None
        self._idle = idle_timeout
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: UdpFlows[tuple[str, int]] | None = None
        self.last_activity = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._flows = UdpFlows(self._dialer, self._reply, self._idle, label="SOCKS UDP")

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] != self._client_ip or (self._client_port and addr[1] != self._client_port):
            return
        if self._client_addr is None:
            self._client_addr = addr[:2]
        elif addr[:2] != self._client_addr:
            return
        try:
            datagram = socks5.parse_udp_datagram(data)
        except socks5.Socks5Error as e:
            log.debug("SOCKS UDP from %s dropped: %s", addr, e)
            return
        assert self._flows is not None
        self._flows.send((datagram.host, datagram.port), datagram.host, datagram.port, datagram.payload)
        self.last_activity = self._flows.last_activity

    def error_received(self, exc: Exception) -> None:
        log.debug("SOCKS UDP relay socket: %s", exc)

    def _reply(self, key: tuple[str, int], data: bytes) -> None:
        if self._transport is not None and self._client_addr is not None:
            self.last_activity = asyncio.get_running_loop().time()
            self._transport.sendto(socks5.build_udp_header(*key) + data, self._client_addr)

    def close(self) -> None:
        if self._flows is not None:
            self._flows.close()
        if self._transport is not None:
            self._transport.close()


class HttpProxyServer(_ProxyServer):
    """An HTTP proxy: CONNECT tunnels and absolute-form plain HTTP forwarding via a Dialer."""

    kind = "HTTP proxy"

    def __init__(
        self,
        dialer: Dialer,
        host: str = "127.0.0.1",
        port: int = 8080,
        users: Mapping[str, str] | None = None,
        **kw: Any,
    ):
        super().__init__(dialer, host, port, users, **kw)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_buffer = http.HeadBuffer()
        try:
            head = await asyncio.wait_for(self._read_head(reader, head_buffer), self.handshake_timeout)
            if head is None:
                return
            request = http.parse_request(head)
            http.check_proxy_auth(request, self.users)
            framer = None if request.is_connect else http.BodyFramer.for_request(request)
        except http.HttpProxyError as e:
            log.info("HTTP proxy client %s: %s", writer.get_extra_info("peername"), e.message)
            await self._answer(reader, writer, e.status, e.message, e.headers)
            return
        try:
            up_reader, up_writer = await self._dial(request.host, request.port)
        except DialError as e:
            log.info("HTTP proxy %s %s:%d: %s", request.method, request.host, request.port, e.message)
            await self._answer(reader, writer, e.http_status, e.message)
            return
        if framer is None:
            writer.write(http.CONNECT_ESTABLISHED)
            await relay(reader, writer, up_reader, up_writer, self.idle_timeout, head_buffer.rest())
            return
        try:
            await self._forward(request, framer, head_buffer.rest(), reader, writer, up_reader, up_writer)
        finally:
            await close_writer(up_writer)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, head_buffer: http.HeadBuffer) -> bytes | None:
        while True:
            data = await reader.read(4096)
            if not data:
                return None
            head = head_buffer.feed(data)
            if head is not None:
                return head

    @staticmethod
    async def _answer(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Send an error response, then discard what the client still sends for a moment.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        response before the client reads it (a refused POST body, for instance).
        """
        writer.write(http.error_response(status, message, headers))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                discarded = 0
                while discarded < LINGER_BYTES and (data := await reader.read(CHUNK)):
                    discarded += len(data)

    async def _forward(
        self,
        request: http.ProxyRequest,
        framer: http.BodyFramer,
        body_start: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: StreamReaderLike,
        up_writer: StreamWriterLike,
    ) -> None:
        """One request upstream (body relayed as framed), its response back, then close."""
        up_writer.write(http.upstream_request_head(request))
        progress = _ResponseProgress()
        body = asyncio.ensure_future(self._send_body(framer, body_start, reader, up_writer))
        response = asyncio.ensure_future(self._relay_response(request, up_reader, writer, progress))
        try:
            done, _ = await asyncio.wait({body, response}, return_when=asyncio.FIRST_COMPLETED)
            if response not in done and body.exception() is None:
                await response  # the whole body is upstream; the response follows
            else:
                (response if response in done else body).result()
        except http.HttpProxyError as e:
            log.info("HTTP proxy %s http://%s:%d%s: %s", request.method, request.host, request.port, request.target, e.message)
            if not progress.started:
                writer.write(http.error_response(e.status, e.message))
        finally:
            body.cancel()
            response.cancel()
            await asyncio.gather(body, response, return_exceptions=True)

    async def _send_body(
        self, framer: http.BodyFramer, data: bytes, reader: asyncio.StreamReader, up_writer: StreamWriterLike
    ) -> None:
        while True:
            if data:
                n = framer.feed(data)
                if n:
                    up_writer.write(data[:n])
                    await up_writer.drain()
                # Bytes past the body belong to a pipelined request: dropped, the client
                # reconnects for it after our Connection: close.
            if framer.done:
                return
            data = await reader.read(CHUNK)
            if not data:
                raise http.HttpProxyError(400, "client closed the connection before the end of the request body")

    async def _read_upstream(self, up_reader: StreamReaderLike, request: http.ProxyRequest) -> bytes:
        try:
            return await asyncio.wait_for(up_reader.read(CHUNK), self.idle_timeout)
        except TimeoutError:
            raise http.HttpProxyError(
                504, f"{request.host}:{request.port} sent nothing for {self.idle_timeout:g} s"
            ) from None

    async def _relay_response(
        self,
        request: http.ProxyRequest,
        up_reader: StreamReaderLike,
        writer: asyncio.StreamWriter,
        progress: _ResponseProgress,
    ) -> None:
        head_buffer = http.HeadBuffer(http.MAX_RESPONSE_HEAD, status=502)
        response: http.Response | None = None
        while response is None:
            data = await self._read_upstream(up_reader, request)
            if not data:
                raise http.HttpProxyError(502, f"{request.host}:{request.port} closed the connection without a response")
            head = head_buffer.feed(data)
            while head is not None:
                parsed = http.parse_response(head)
                if parsed.status == 101:
                    raise http.HttpProxyError(502, "upstream switched protocols although Upgrade was not forwarded")
                writer.write(http.downstream_response_head(parsed))
                progress.started = True
                if parsed.status >= 200:
                    response = parsed
                    break
                head = head_buffer.feed(b"")  # interim 1xx: the final head may already be here
        framer = http.BodyFramer.for_response(response, request.method)
        data = head_buffer.rest()
        while True:
            if data:
                n = framer.feed(data)
                writer.write(data[:n])
                await writer.drain()
            if framer.done:
                return
            data = await self._read_upstream(up_reader, request)
            if not data:
                return  # close-delimited body ends here; a truncated one shows as such to the client


class _ResponseProgress:
    """Whether any response bytes went to the client (after that, errors can only close)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False

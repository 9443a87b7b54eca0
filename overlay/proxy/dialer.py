"""The Dialer interface between the proxies and whatever carries their streams, and its errors.

The proxy servers and port forwards know nothing of WireGuard, NATs or the userspace TCP/IP stack:
they ask a :class:`Dialer` for a byte stream (or a UDP flow) to a peer name or virtual IP and a port.
The node implements it with its netstack; :class:`OsDialer` implements it with real OS sockets, for
tests and for a node configured as an exit.

Every failure a dialer reports is a :class:`DialError` subclass carrying a message meant for a human
("laptop does not share port 3389") plus the SOCKS5 reply code and HTTP status the proxies answer
with, so each front end maps failures the same way without knowing the dialer.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from overlay.proxy import socks5


class DialError(Exception):
    """A dialer could not open the requested stream or flow; ``message`` is for humans."""

    socks_reply = socks5.REP_GENERAL_FAILURE
    http_status = 502

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotOverlayAddress(DialError):
    """The destination is neither a peer name nor a virtual IP: refused so the proxy is no exit."""

    socks_reply = socks5.REP_NOT_ALLOWED
    http_status = 403

    def __init__(self, host: str):
        super().__init__(f"{host} is not an overlay address")
        self.host = host


class PortNotShared(DialError):
    """The peer is reachable but refuses inbound connections to this port (not ``overlay share``d)."""

    socks_reply = socks5.REP_CONNECTION_REFUSED
    http_status = 502

    def __init__(self, peer: str, port: int):
        super().__init__(f"{peer} does not share port {port}")
        self.peer = peer
        self.port = port


class NothingListens(DialError):
    """The peer shares the port, but nothing listens behind it on the peer's machine."""

    socks_reply = socks5.REP_CONNECTION_REFUSED
    http_status = 502

    def __init__(self, peer: str, port: int):
        super().__init__(f"{peer} shares port {port} but nothing listens there")
        self.peer = peer
        self.port = port


class PeerUnreachable(DialError):
    """No path to the peer (offline, no tunnel, no relay)."""

    socks_reply = socks5.REP_HOST_UNREACHABLE
    http_status = 504

    def __init__(self, peer: str, reason: str = ""):
        super().__init__(f"{peer} is unreachable" + (f": {reason}" if reason else ""))
        self.peer = peer


class ConnectionRefused(DialError):
    """The destination actively refused the connection (TCP reset)."""

    socks_reply = socks5.REP_CONNECTION_REFUSED
    http_status = 502

    def __init__(self, host: str, port: int):
        super().__init__(f"{host}:{port} refused the connection")
        self.host = host
        self.port = port


class DialTimeout(DialError):
    """The destination did not answer in time."""

    socks_reply = socks5.REP_TTL_EXPIRED
    http_status = 504

    def __init__(self, host: str, port: int, timeout: float):
        super().__init__(f"connecting to {host}:{port} timed out after {timeout:g} s")
        self.host = host
        self.port = port


class StreamReaderLike(Protocol):
    """What the proxies read from: :class:`asyncio.StreamReader` satisfies it."""

    async def read(self, n: int = -1) -> bytes: ...


class StreamWriterLike(Protocol):
    """What the proxies write to: :class:`asyncio.StreamWriter` satisfies it.

    ``get_extra_info("sockname")`` gives the local (ip, port) reported in SOCKS replies; return
    None if unknown. ``write_eof`` is only called when ``can_write_eof()`` is true (half-close).
    """

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class UdpFlow(Protocol):
    """A connected UDP flow to one (host, port).

    ``send`` never blocks (a datagram that cannot be queued is dropped, as UDP may);
    ``recv`` returns the next datagram from the destination and raises :class:`EOFError`
    once the flow is closed.
    """

    def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    def close(self) -> None: ...


class Dialer(Protocol):
    """Opens streams and UDP flows to overlay destinations; implemented by the node."""

    async def open_connection(self, host: str, port: int) -> tuple[StreamReaderLike, StreamWriterLike]:
        """Connect to ``host`` (peer name, name.network or virtual IP) on TCP ``port``.

        Raises a :class:`DialError` subclass on failure.
        """
        ...

    def resolve(self, host: str) -> str | None:
        """Map a peer name / name.network / virtual IP to the virtual IP; None if not overlay."""
        ...

    async def open_udp(self, host: str, port: int) -> UdpFlow:
        """Open a UDP flow to ``host``:``port``. Raises a :class:`DialError` subclass on failure."""
        ...


UDP_QUEUE = 256  # datagrams buffered per OS flow before new ones are dropped
UDP_MAX = 65535


class _OsUdpFlow(asyncio.DatagramProtocol):
    """An OS UDP socket connected to one destination, with a bounded receive queue."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._queue: deque[bytes] = deque(maxlen=UDP_QUEUE)  # oldest dropped when full
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._queue.append(data)
        self._wake()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: UDP has no delivery guarantee, keep going.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.sendto(data)

    async def recv(self) -> bytes:
        while not self._queue:
            if self._closed:
                raise EOFError("UDP flow closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        self._wake()


class OsDialer:
    """A :class:`Dialer` over real OS sockets, for tests and for a node configured as an exit.

    ``names`` maps peer names (case-insensitive) to IP addresses; IP literals are accepted only
    inside the ``allow`` networks (CIDR strings), so by default nothing but the mapped names is
    reachable, like a userspace node that refuses to be an accidental exit.
    """

    def __init__(
        self,
        names: Mapping[str, str] | None = None,
        allow: Iterable[str] = (),
        connect_timeout: float = 10.0,
    ):
        self._names = {k.lower(): str(ipaddress.ip_address(v)) for k, v in (names or {}).items()}
        self._allow = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.connect_timeout = connect_timeout

    def resolve(self, host: str) -> str | None:
        mapped = self._names.get(host.lower())
        if mapped is not None:
            return mapped
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        return str(ip) if any(ip in net for net in self._allow) else None

    def _require(self, host: str) -> str:
        ip = self.resolve(host)
        if ip is None:
            raise NotOverlayAddress(host)
        return ip

    async def open_connection(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ip = self._require(host)
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(ip, port)
        except TimeoutError:
            raise DialTimeout(host, port, self.connect_timeout) from None
        except ConnectionRefusedError:
            raise ConnectionRefused(host, port) from None
        except OSError as e:
            raise PeerUnreachable(host, e.strerror or str(e)) from None

    async def open_udp(self, host: str, port: int) -> UdpFlow:
        ip = self._require(host)
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            _, flow = await loop.create_datagram_endpoint(_OsUdpFlow, remote_addr=(ip, port), family=family)
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                raise PeerUnreachable(host, e.strerror or str(e)) from None
            raise DialError(f"cannot open UDP flow to {host}:{port}: {e.strerror or e}") from None
        return flow

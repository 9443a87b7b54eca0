"""Opening listening sockets for the proxies and forwards, with errors a user can act on."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any


class ListenError(Exception):
    """A proxy or forward cannot listen where it was asked to (busy port, unsafe address...)."""


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True if ``host`` only listens on this machine (127.0.0.0/8, ::1, "localhost")."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def _listen_error(e: OSError, host: str, port: int) -> ListenError:
    where = format_address(host, port)
    if e.errno == errno.EADDRINUSE:
        return ListenError(f"{where} is already in use")
    if e.errno == errno.EACCES:
        return ListenError(f"no permission to listen on {where} (ports below 1024 need privileges)")
    if e.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot listen on {where}: no local interface has that address")
    return ListenError(f"cannot listen on {where}: {e.strerror or e}")


async def start_tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], host: str, port: int
) -> asyncio.Server:
    """``asyncio.start_server`` raising :class:`ListenError` with a clear message on failure."""
    try:
        return await asyncio.start_server(handler, host, port)
    except OSError as e:
        raise _listen_error(e, host, port) from None


def open_tcp_listeners(host: str, port: int, backlog: int = 100) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to, as
    ``asyncio.start_server`` binds them (SO_REUSEADDR, IPv6 sockets IPv6-only), with
    ``TCP_NODELAY`` set for the connections they accept (Linux passes it on to them). Raises
    :class:`ListenError` with a clear message."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {format_address(host, port)}: {e.strerror or e}") from None
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise _listen_error(e, host, port) from None
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise ListenError(f"cannot listen on {format_address(host, port)}: no address")
    return socks


async def create_udp_endpoint(
    factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int
) -> tuple[asyncio.DatagramTransport, Any]:
    """A bound UDP endpoint, raising :class:`ListenError` with a clear message on failure."""
    try:
        return await asyncio.get_running_loop().create_datagram_endpoint(factory, local_addr=(host, port))
    except OSError as e:
        raise _listen_error(e, host, port) from None


def bound_address(sockets: Any) -> tuple[str, int]:
    """The (host, port) of the first bound socket, e.g. to learn an ephemeral port."""
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        return host, port
    raise RuntimeError("not listening")

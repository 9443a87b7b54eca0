"""Opening listening sockets for the proxies and forwards, with errors a user can act on."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
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

"""Port forwards: a local TCP or UDP port carried to a port of a peer through the Dialer.

``Forward(dialer, 13389, "laptop", 3389)`` makes ``127.0.0.1:13389`` reach port 3389 of peer
"laptop", for applications that cannot use a proxy (RDP clients, games). Dial failures are logged
with the dialer's message ("laptop does not share port 3389") and reset the client connection, so
the application sees a failed connect rather than an empty stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overlay.proxy.dialer import Dialer, DialError
from overlay.proxy.listen import bound_address, create_udp_endpoint, format_address, is_loopback, start_tcp_server
from overlay.proxy.relay import close_now, close_writer, relay, reset_now
from overlay.proxy.udpflows import UdpFlows

log = logging.getLogger(__name__)

TCP_IDLE_TIMEOUT = 600.0
UDP_IDLE_TIMEOUT = 120.0
MAX_UDP_CLIENTS = 256


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    """A parsed forward specification."""

    listen_port: int
    peer: str
    peer_port: int
    udp: bool = False


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not text.isascii() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r} in forward {spec!r}")
    return int(text)


def parse_spec(spec: str) -> ForwardSpec:
    """Parse ``"LOCAL[/udp] PEER[:PORT]"``: ``"3389 laptop"``, ``"13389 laptop:3389"``, ``"27015/udp game"``.

    Without ``:PORT`` the peer's port equals the local one. Raises ValueError with the reason.
    """
    parts = spec.split()
    if len(parts) != 2:
        raise ValueError(f"forward {spec!r} is not 'LOCAL_PORT[/udp] PEER[:PORT]'")
    local, target = parts
    local, slash, proto = local.partition("/")
    if slash and proto.lower() not in ("udp", "tcp"):
        raise ValueError(f"unknown protocol {proto!r} in forward {spec!r} (tcp or udp)")
    listen_port = _port(local, spec)
    peer, colon, port_text = target.rpartition(":")
    if not colon:
        peer, peer_port = target, listen_port
    else:
        peer_port = _port(port_text, spec)
    if not peer:
        raise ValueError(f"forward {spec!r} names no peer")
    return ForwardSpec(listen_port, peer, peer_port, proto.lower() == "udp")


class Forward:
    """Listens on ``listen_host:listen_port`` and carries each TCP connection (or UDP client
    address) to ``peer:peer_port`` via the dialer.

    ``peer`` is what the dialer is asked for and may change while the forward runs (the node pins
    it to the peer's key so the forward follows a rename); ``label``, if given, names the peer for
    people (logs, status) as it is called now."""

    def __init__(
        self,
        dialer: Dialer,
        listen_port: int,
        peer: str,
        peer_port: int,
        udp: bool = False,
        listen_host: str = "127.0.0.1",
        *,
        idle_timeout: float | None = None,
        max_udp_clients: int = MAX_UDP_CLIENTS,
        label: Callable[[], str] | None = None,
    ):
        self.dialer = dialer
        self.label = label
        self.listen_port = listen_port
        self.peer = peer
        self.peer_port = peer_port
        self.udp = udp
        self.listen_host = listen_host
        self.idle_timeout = idle_timeout if idle_timeout is not None else (UDP_IDLE_TIMEOUT if udp else TCP_IDLE_TIMEOUT)
        self.max_udp_clients = max_udp_clients
        self._server: asyncio.Server | None = None
        self._udp: _UdpForward | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_spec(cls, dialer: Dialer, spec: str, listen_host: str = "127.0.0.1") -> Forward:
        """A forward from a :func:`parse_spec` string."""
        s = parse_spec(spec)
        return cls(dialer, s.listen_port, s.peer, s.peer_port, s.udp, listen_host)

    @property
    def peer_name(self) -> str:
        """The peer as shown to people: ``label()`` if given, else ``peer``."""
        return self.label() if self.label is not None else self.peer

    def __str__(self) -> str:
        proto = "udp" if self.udp else "tcp"
        return f"{proto} {format_address(self.listen_host, self.listen_port)} -> {self.peer_name}:{self.peer_port}"

    async def start(self) -> None:
        """Start listening; raises :class:`~overlay.proxy.listen.ListenError` (e.g. port already in use)."""
        if not is_loopback(self.listen_host):
            log.warning("forward %s listens beyond loopback: anyone who reaches it reaches the peer", self)
        if self.udp:
            self._udp = _UdpForward(self)
            self._udp_transport, _ = await create_udp_endpoint(lambda: self._udp, self.listen_host, self.listen_port)
        else:
            self._server = await start_tcp_server(self._accept, self.listen_host, self.listen_port)
        log.info("forward %s started", self)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._server is not None:
            return bound_address(self._server.sockets)
        if self._udp_transport is not None:
            return self._udp_transport.get_extra_info("sockname")[:2]
        raise RuntimeError("forward not started")

    @property
    def active(self) -> int:
        """Open TCP connections, or UDP client flows (for status displays)."""
        return self._udp.flows if self._udp is not None else len(self._clients)

    def close(self) -> None:
        """Stop listening and drop every connection / flow."""
        if self._server is not None:
            self._server.close()
        for task in self._clients:
            task.cancel()
        if self._udp is not None:
            self._udp.close()

    async def wait_closed(self) -> None:
        """Wait until every connection task has finished after :meth:`close`."""
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        relayed = False
        try:
            try:
                up_reader, up_writer = await self.dialer.open_connection(self.peer, self.peer_port)
            except (DialError, OSError) as e:
                log.warning("forward %s: %s", self, getattr(e, "message", None) or e)
                reset_now(writer)   # the application sees a failed connection, not an empty one
                return
            await relay(reader, writer, up_reader, up_writer, self.idle_timeout)
            relayed = True   # relay() closed both ends and waited for them
        except OSError as e:
            log.debug("forward %s: %s", self, e)
        except asyncio.CancelledError:
            pass  # close(); see _ProxyServer._accept for why the task must not end cancelled
        except Exception:
            log.exception("forward %s: unexpected error", self)
        finally:
            self._clients.discard(task)
            if not relayed:
                close_now(writer)
        if not relayed:
            with contextlib.suppress(asyncio.CancelledError):
                await close_writer(writer)


class _UdpForward(asyncio.DatagramProtocol):
    """The listening UDP socket of a forward: one flow to the peer per client address."""

    def __init__(self, forward: Forward):
        self._forward = forward
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: UdpFlows[tuple[str, int]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        f = self._forward
        self._flows = UdpFlows(
            f.dialer, self._reply, f.idle_timeout, max_flows=f.max_udp_clients, label=f"forward {f}"
        )

    @property
    def flows(self) -> int:
        return len(self._flows) if self._flows is not None else 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._flows is not None
        self._flows.send(addr[:2], self._forward.peer, self._forward.peer_port, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("forward %s: %s", self._forward, exc)

    def _reply(self, addr: tuple[str, int], data: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def close(self) -> None:
        if self._flows is not None:
            self._flows.close()
        if self._transport is not None:
            self._transport.close()

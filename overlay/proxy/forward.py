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
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overlay.proxy.dialer import Dialer, DialError
from overlay.proxy.listen import bound_address, create_udp_endpoint, format_address, is_loopback, open_tcp_listeners
from overlay.proxy.relay import close_now, relay
from overlay.proxy.splice import Splice
from overlay.proxy.udpflows import UdpFlows
from overlay.ratelog import LogLimiter

log = logging.getLogger(__name__)

TCP_IDLE_TIMEOUT = 600.0
ACCEPT_BATCH = 32  # connections accepted per readiness of a listening socket
ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like (as asyncio)
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
        self._listeners: list[socket.socket] = []
        self._paused: set[socket.socket] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._errors = LogLimiter()
        self._udp: _UdpForward | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._clients: set[asyncio.Task[Any]] = set()  # connections dialling (or relayed by tasks)
        self._splices: set[Splice] = set()  # connections relayed from callbacks
        self._dialling: dict[socket.socket, Any] = {}  # accepted, dialled by callback (the dial)
        self._all_ended: asyncio.Future[None] | None = None

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
            # accepted from our own reader callback: a connection costs its socket and one task,
            # no asyncio transport or streams (overlay/proxy/socket_end.py)
            self._loop = asyncio.get_running_loop()
            self._listeners = open_tcp_listeners(self.listen_host, self.listen_port)
            for ls in self._listeners:
                self._loop.add_reader(ls.fileno(), self._on_acceptable, ls)
        log.info("forward %s started", self)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._listeners:
            return bound_address(self._listeners)
        if self._udp_transport is not None:
            return self._udp_transport.get_extra_info("sockname")[:2]
        raise RuntimeError("forward not started")

    @property
    def active(self) -> int:
        """Open TCP connections, or UDP client flows (for status displays)."""
        if self._udp is not None:
            return self._udp.flows
        return len(self._clients) + len(self._dialling) + len(self._splices)

    def close(self) -> None:
        """Stop listening and drop every connection / flow."""
        for ls in self._listeners:
            if self._loop is not None and ls not in self._paused and ls.fileno() >= 0:
                self._loop.remove_reader(ls.fileno())
            ls.close()
        self._paused.clear()
        for task in self._clients:
            task.cancel()
        for conn, dial in list(self._dialling.items()):
            dial.cancel()
            conn.close()
        self._dialling.clear()
        for sp in list(self._splices):
            sp.abort()
        if self._udp is not None:
            self._udp.close()

    async def wait_closed(self) -> None:
        """Wait until every connection task has finished after :meth:`close`."""
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._splices:
            self._all_ended = asyncio.get_running_loop().create_future()
            await self._all_ended

    def _splice_ended(self, sp: Splice) -> None:
        self._splices.discard(sp)
        if not self._splices and self._all_ended is not None and not self._all_ended.done():
            self._all_ended.set_result(None)

    def _on_acceptable(self, ls: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = ls.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of descriptors or memory: stop accepting for a while
                self._errors.log(log, logging.ERROR, "forward %s: cannot accept: %s", self, e)
                loop.remove_reader(ls.fileno())
                self._paused.add(ls)
                loop.call_later(ACCEPT_PAUSE, self._resume_accepting, ls)
                return
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                continue
            if self._dial_now(conn):
                continue
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    def _dial_now(self, conn: socket.socket) -> bool:
        """Dial by callback when the dialer can (a peer on the userspace stack): no task, and the
        client's first bytes leave in the flush that completed the handshake. False: use a task."""
        dial_now = getattr(self.dialer, "dial_now", None)
        if dial_now is None:
            return False
        try:
            dial = dial_now(self.peer, self.peer_port, lambda r, w, e: self._dialled(conn, r, w, e))
        except (DialError, OSError) as e:
            log.warning("forward %s: %s", self, getattr(e, "message", None) or e)
            _reset(conn)
            return True
        except Exception:
            log.exception("forward %s: unexpected error", self)
            conn.close()
            return True
        if dial is None:
            return False
        if not dial.done():
            self._dialling[conn] = dial
        return True

    def _dialled(self, conn: socket.socket, reader: Any, writer: Any, exc: BaseException | None) -> None:
        self._dialling.pop(conn, None)
        if exc is not None:
            log.warning("forward %s: %s", self, getattr(exc, "message", None) or exc)
            _reset(conn)   # the application sees a failed connection, not an empty one
            return
        sp = Splice.for_socket(conn, reader, writer)
        if sp is None:  # (not a netstack stream after all: streams and tasks)
            task = asyncio.get_running_loop().create_task(self._relay_streams(conn, reader, writer))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)
            return
        self._splices.add(sp)
        sp.start(self.idle_timeout, lambda: self._splice_ended(sp))

    async def _relay_streams(self, conn: socket.socket, up_reader: Any, up_writer: Any) -> None:
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            except BaseException:
                conn.close()
                close_now(up_writer)
                raise
            await relay(reader, writer, up_reader, up_writer, self.idle_timeout)
        except OSError as e:
            log.debug("forward %s: %s", self, e)
        except asyncio.CancelledError:
            pass

    def _resume_accepting(self, ls: socket.socket) -> None:
        if ls in self._paused and self._loop is not None:
            self._paused.discard(ls)
            self._loop.add_reader(ls.fileno(), self._on_acceptable, ls)

    async def _serve(self, conn: socket.socket) -> None:
        """One accepted connection: dial, then relay (the socket is closed however it ends)."""
        owned: socket.socket | None = conn  # still ours to close
        up_writer = None
        try:
            try:
                up_reader, up_writer = await self.dialer.open_connection(self.peer, self.peer_port)
            except (DialError, OSError) as e:
                log.warning("forward %s: %s", self, getattr(e, "message", None) or e)
                _reset(conn)   # the application sees a failed connection, not an empty one
                owned = None
                return
            sp = Splice.for_socket(conn, up_reader, up_writer)
            owned = None
            if sp is not None:
                # relayed from callbacks from now on: this task ends here
                self._splices.add(sp)
                sp.start(self.idle_timeout, lambda: self._splice_ended(sp))
            else:  # not a netstack stream (a TUN node's kernel socket): asyncio streams and tasks
                try:
                    reader, writer = await asyncio.open_connection(sock=conn)
                except BaseException:
                    conn.close()
                    raise
                await relay(reader, writer, up_reader, up_writer, self.idle_timeout)
            up_writer = None
        except OSError as e:
            log.debug("forward %s: %s", self, e)
        except asyncio.CancelledError:
            pass  # close(); see _ProxyServer._accept for why the task must not end cancelled
        except Exception:
            log.exception("forward %s: unexpected error", self)
        finally:
            if owned is not None:
                owned.close()
            if up_writer is not None:
                close_now(up_writer)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the client sees ECONNRESET, not a clean end of file."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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

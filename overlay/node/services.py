"""What a userspace node offers its apps and its peers, on top of the netstack.

- ``OverlayDialer``: the proxy's Dialer (overlay/proxy/dialer.py) over the userspace stack: peer names,
  ``name.network`` and virtual IPs resolve inside the overlay; anything else is refused (no
  accidental exit node); a reset from the peer means "that peer does not share this port".
  Addresses inside a gateway route approved in one of our networks go to that gateway member
  (overlay/node/gateway.py ends them in its LAN). On a TUN/TAP node the dialer uses ordinary
  sockets instead, for peers and approved routes alike: the kernel routes both through the device.
- ``Shares``: inbound overlay connections are accepted only on shared ports and carried to
  127.0.0.1:port on this machine; everything else gets a reset from the stack. The handshake of
  an inbound connection only completes once 127.0.0.1:port accepted ours; if nothing listens
  there the peer gets ICMP port unreachable, which its dialer reports as "NAME shares port N but
  nothing listens there" (a Linux peer sees ECONNREFUSED). The socket toward the service is bound
  first to a loopback address per peer (overlay/node/share_source.py: 127.B.C.D for 100.B.C.D), so
  the service tells peers apart and ``overlay whois`` names them; where the OS cannot bind it
  (only Linux binds all of 127.0.0.0/8) every peer comes from 127.0.0.1, said once in the log.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from typing import Any, Awaitable, Callable

from overlay.netstack.asyncio_glue import Dial, HostUnreachableError, NothingListensError, StackDriver
from overlay.node.state import Peer
from overlay.proxy.dialer import (ConnectionRefused, DialError, DialTimeout, NothingListens, NotOverlayAddress,
                                  OsDialer, PeerUnreachable, PortNotShared)
from overlay.proxy.relay import relay
from overlay.proxy.splice import Splice
from overlay.node.share_source import loopback_for, mappable
from overlay.ratelog import LogLimiter

log = logging.getLogger("overlay.node")

DIAL_TIMEOUT = 10.0
LOCAL_DIAL_TIMEOUT = 3.0  # below the peer's first SYN retransmission backoff adding up to DIAL_TIMEOUT
TCP_IDLE = 3600.0
UDP_IDLE = 120.0
MAX_UDP_FLOWS = 256
MAX_SOURCES = 4096   # remote IPs whose source address is remembered (then the memo starts afresh)


class NotRouted(NotOverlayAddress):
    """An IP address neither of a peer nor inside an approved gateway route."""

    def __init__(self, host: str):
        DialError.__init__(self, f"{host} is not an overlay address and no approved gateway route of your "
                                 "networks contains it (overlay status lists the routes)")
        self.host = host


class RouteWithdrawn(NotRouted):
    """An IP address inside an approved route its gateway member no longer advertises."""

    def __init__(self, host: str, gateway: str, prefix: str):
        DialError.__init__(self, f"{host}: gateway {gateway} no longer advertises {prefix}")
        self.host = host


class OverlayDialer:
    def __init__(self, find_peer: Callable[[str], Peer | None], netstack: Callable[[], StackDriver | None],
                 kernel: bool = False, find_route: Callable[[str], Peer | None] = lambda ip: None,
                 path: Callable[[bytes], str | None] = lambda key: "?"):
        self._find = find_peer
        self._path = path            # a peer's key -> its path ("direct ...", "relay"), None: no path
        self._route = find_route     # a LAN address -> the gateway member whose approved route holds it
        self._netstack = netstack
        # a TUN/TAP node: its kernel routes the pool through the device, so ordinary sockets reach peers
        self._os = OsDialer(allow=["0.0.0.0/0"], connect_timeout=DIAL_TIMEOUT) if kernel else None

    def resolve(self, host: str) -> str | None:
        p = self._find(host)
        return p.ip if p else None

    def _peer(self, host: str) -> tuple[Peer, str | None]:
        """(online peer, LAN address if the peer is the gateway to it)."""
        lan = None
        p = self._find(host)
        if p is None:
            p = self._route(host.strip())
            if p is None:
                if _is_ipv4(host.strip()):
                    raise NotRouted(host)
                raise NotOverlayAddress(host)
            lan = host.strip()
        if not p.online:
            raise PeerUnreachable(p.name, f"it is offline (the gateway to {lan})" if lan else "it is offline")
        return p, lan

    def _target(self, host: str) -> tuple[Peer, StackDriver, str | None]:
        """(peer, stack, LAN address if the peer is the gateway to it)."""
        p, lan = self._peer(host)
        ns = self._netstack()
        if ns is None:
            raise PeerUnreachable(p.name, "this node is not connected yet")
        return p, ns, lan

    async def open_connection(self, host: str, port: int):
        if self._os is not None:
            # a TUN/TAP node: its kernel routes the pool and the approved gateway routes through the
            # device, so an ordinary socket reaches a peer or a host behind a gateway member
            p, lan = self._peer(host)
            try:
                return await self._os.open_connection(lan or p.ip, port)
            except ConnectionRefused:
                if lan is not None:
                    e = ConnectionRefused(lan, port)
                    e.message += f" (reached through gateway {p.name})"
                    raise e from None
                raise PortNotShared(p.name, port) from None
            except DialTimeout:
                raise DialTimeout(f"{lan} (through gateway {p.name})" if lan else p.name, port,
                                  DIAL_TIMEOUT) from None
        p, ns, lan = self._target(host)
        if lan is not None:
            try:
                return await ns.open_connection(lan, port, timeout=DIAL_TIMEOUT)
            except (NothingListensError, ConnectionRefusedError):
                e = ConnectionRefused(lan, port)
                e.message += f" (reached through gateway {p.name})"
                raise e from None
            except (asyncio.TimeoutError, TimeoutError):
                raise DialTimeout(f"{lan} (through gateway {p.name})", port, DIAL_TIMEOUT) from None
            except HostUnreachableError as e:
                raise _lan_unreachable(lan, port, p.name, e.reason) from None
        try:
            return await ns.open_connection(p.ip, port, timeout=DIAL_TIMEOUT)
        except NothingListensError:
            raise NothingListens(p.name, port) from None
        except ConnectionRefusedError:
            raise PortNotShared(p.name, port) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise self._timeout(p, port) from None

    def dial_now(self, host: str, port: int,
                 done: Callable[[Any, Any, BaseException | None], None]) -> Dial | None:
        """:meth:`open_connection` to a peer on the userspace stack without a task:
        ``done(reader, writer, None)`` from the flush that completed the handshake, or
        ``done(None, None, error)`` with the errors open_connection raises; the :class:`Dial`
        (its ``cancel()`` abandons it). None: this dial needs :meth:`open_connection` (a TUN
        node's kernel socket, a host behind a gateway member). Raises DialError at once when the
        peer is unknown, offline or not connected."""
        if self._os is not None:
            return None
        p, ns, lan = self._target(host)
        if lan is not None:
            return None

        def finished(reader: Any, writer: Any, exc: Exception | None) -> None:
            if exc is None:
                done(reader, writer, None)
            elif isinstance(exc, NothingListensError):
                done(None, None, NothingListens(p.name, port))
            elif isinstance(exc, ConnectionRefusedError):
                done(None, None, PortNotShared(p.name, port))
            elif isinstance(exc, TimeoutError):
                done(None, None, self._timeout(p, port))
            else:
                done(None, None, exc)

        return ns.open_connection_cb(p.ip, port, finished, timeout=DIAL_TIMEOUT)

    def _timeout(self, p: Peer, port: int) -> DialError:
        """No answer in time: the peer did not answer (a path exists), or no path to it formed."""
        if self._path(p.key) is None:
            return PeerUnreachable(p.name, f"no path to it formed in {DIAL_TIMEOUT:g} s (overlay status shows "
                                              f"its path; overlay netcheck tells why)")
        return DialTimeout(p.name, port, DIAL_TIMEOUT)

    async def open_udp(self, host: str, port: int):
        if self._os is not None:
            p, lan = self._peer(host)
            return await self._os.open_udp(lan or p.ip, port)
        p, ns, lan = self._target(host)
        return _NetstackUdpFlow(ns.udp_bind(0), (lan or p.ip, port))


def _lan_unreachable(lan: str, port: int, gateway: str, reason: str) -> DialError:
    """The gateway could not open the connection to its LAN host, and said why."""
    if reason == "timed out":
        e: DialError = DialTimeout(lan, port, DIAL_TIMEOUT)
        DialError.__init__(e, f"connecting to {lan}:{port} timed out: gateway {gateway} got no answer from it")
    elif reason == "prohibited":
        e = PeerUnreachable(f"{lan}:{port}", f"gateway {gateway} is busy opening other connections, try again")
    else:
        e = PeerUnreachable(f"{lan}:{port}", f"gateway {gateway} reports host unreachable")
    return e


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return text.count(".") == 3


class _NetstackUdpFlow:
    """A UDP flow to one (virtual IP, port) over a netstack endpoint of its own."""

    def __init__(self, endpoint, dest: tuple[str, int]):
        self._ep = endpoint
        self._dest = dest

    def send(self, data: bytes) -> None:
        self._ep.sendto(data, self._dest)

    async def recv(self) -> bytes:
        while True:
            data, addr = await self._ep.recvfrom()
            if addr == self._dest:
                return data

    def close(self) -> None:
        self._ep.close()


def nothing_listens(port: int, udp: bool) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``: we can bind it ourselves (with SO_REUSEADDR a
    TIME_WAIT left by an earlier connection does not count; a listening socket does). No packet is
    sent, so the service never sees a probe."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if not udp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


LOCALHOST = "127.0.0.1"
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
PROBE_SOURCE = "127.128.0.1"   # any loopback address but 127.0.0.1: bindable on Linux only


class Shares:
    """Ports this node shares with its peers (TCP and UDP), each carried to 127.0.0.1:port from a
    loopback address per peer."""

    def __init__(self, pool: Callable[[], ipaddress.IPv4Network | None] = lambda: None) -> None:
        self.tcp: set[int] = set()
        self.udp: set[int] = set()
        self._driver: StackDriver | None = None
        self._udp_tasks: dict[int, asyncio.Task] = {}
        self._rlog = LogLimiter()        # a peer's connection attempts must not flood the log
        self._pool = pool                # the server's address pool (None before the first hello)
        self._os_refused: str | None = None   # why this OS binds no loopback address but 127.0.0.1
        self._probed = False
        self._wide_pool_logged: ipaddress.IPv4Network | None = None
        # remote IP -> source address, for the pool it was computed with (per connection, the
        # ipaddress arithmetic cost more than the rest of choosing the source)
        self._sources: dict[str, str] = {}
        self._sources_pool: ipaddress.IPv4Network | None = None

    # ---------------------------------------------------------------- per-peer source addresses
    def source_info(self) -> dict:
        """status's ``share_source``: ``per_peer`` or ``localhost`` (with the reason in ``note``)."""
        self._probe()
        pool = self._pool()
        if self._os_refused is not None:
            return {"mode": "localhost", "note": self._os_refused}
        if pool is not None and not mappable(pool):
            return {"mode": "localhost", "note": _wide(pool)}
        return {"mode": "per_peer", "note": None}

    def source(self, remote_ip: str) -> str:
        """The address a share's socket toward the service binds for the peer ``remote_ip``."""
        self._probe()
        if self._os_refused is not None:
            return LOCALHOST
        pool = self._pool()
        if pool is not self._sources_pool or len(self._sources) >= MAX_SOURCES:
            self._sources_pool = pool
            self._sources.clear()
        src = self._sources.get(remote_ip)
        if src is not None:
            return src
        if pool is not None and not mappable(pool) and self._wide_pool_logged != pool:
            self._wide_pool_logged = pool
            log.warning("shares: your services see every peer as 127.0.0.1: %s", _wide(pool))
        src = self._sources[remote_ip] = loopback_for(remote_ip, pool) or LOCALHOST
        return src

    def _probe(self) -> None:
        """Once: can this OS bind a loopback address other than 127.0.0.1 (Linux: yes; macOS, BSD: no)?"""
        if self._probed:
            return
        self._probed = True
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((PROBE_SOURCE, 0))
        except OSError as e:
            self._refused(e)
        finally:
            s.close()

    def _refused(self, e: OSError) -> None:
        if self._os_refused is None:
            self._os_refused = (f"this system cannot bind loopback addresses other than 127.0.0.1 "
                                f"({e.strerror or e})")
            log.warning("shares: your services see every peer as 127.0.0.1: %s", self._os_refused)

    def _bind_failed(self, e: OSError, src: str) -> bool:
        """Whether binding ``src`` failed because the OS has no such address (then: 127.0.0.1 from now on)."""
        if src != LOCALHOST and e.errno == errno.EADDRNOTAVAIL:
            self._refused(e)
            return True
        return False

    def attach(self, driver: StackDriver) -> None:
        """(Re)apply every share to a new stack."""
        self._driver = driver
        driver.on_port_refused = lambda port, remote: self._rlog.log(
            log, logging.INFO, "refused %s:%d -> port %d: not shared (overlay share %d)", remote[0], remote[1], port, port)
        for port in self.tcp:
            self._listen(port)
        for port in list(self.udp):
            self._start_udp(port)

    def add(self, port: int, udp: bool) -> None:
        if udp:
            if port not in self.udp:
                self.udp.add(port)
                if self._driver is not None:
                    self._start_udp(port)
        elif port not in self.tcp:
            self.tcp.add(port)
            if self._driver is not None:
                self._listen(port)
        log.info("sharing %s port %d", "udp" if udp else "tcp", port)

    def remove(self, port: int, udp: bool) -> bool:
        if udp:
            if port not in self.udp:
                return False
            self.udp.discard(port)
            task = self._udp_tasks.pop(port, None)
            if task:
                task.cancel()
        else:
            if port not in self.tcp:
                return False
            self.tcp.discard(port)
            if self._driver is not None:
                self._driver.unlisten(port)
        log.info("stopped sharing %s port %d", "udp" if udp else "tcp", port)
        return True

    def listing(self) -> list[dict]:
        return ([{"port": p, "proto": "tcp"} for p in sorted(self.tcp)]
                + [{"port": p, "proto": "udp"} for p in sorted(self.udp)])

    def _listen(self, port: int) -> None:
        def refused(remote: tuple[str, int], e: BaseException) -> None:
            self._rlog.log(log, logging.INFO, "refused %s:%d -> shared port %d: nothing listens on "
                                  "127.0.0.1:%d (%s)", remote[0], remote[1], port, port,
                                  getattr(e, "strerror", None) or "timed out")

        def local(remote: tuple[str, int]):
            """Reach 127.0.0.1:port, from the peer's loopback address, before the overlay handshake
            completes: the socket (None: refuse it), or, when the kernel did not connect at once,
            a coroutine giving that (the driver then waits in a task)."""
            try:
                res = self._connect_local_now(remote[0], port)
            except OSError as e:
                refused(remote, e)
                return None
            return res if isinstance(res, socket.socket) else waiting(remote, res)

        async def waiting(remote: tuple[str, int], connecting: Awaitable[socket.socket]):
            try:
                return await connecting
            except (OSError, asyncio.TimeoutError) as e:
                refused(remote, e)
                return None

        def handle(reader, writer, sock: socket.socket):
            """Relay the peer's connection and the service's from callbacks (no task); a coroutine
            to run in a task for streams of another kind."""
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shared port %d: connection from %s", port, writer.get_extra_info("peername"))
            sp = Splice.for_socket(sock, reader, writer, read_ahead=True)  # (services often answer and close)
            if sp is not None:
                sp.start(TCP_IDLE)
                return None
            return relay_streams(reader, writer, sock)

        async def relay_streams(reader, writer, sock: socket.socket) -> None:
            try:
                kr, kw = await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                writer.close()
                raise
            await relay(reader, writer, kr, kw, TCP_IDLE)

        self._driver.listen(port, handle, prepare=local, discard=lambda sock: sock.close())

    def _start_udp(self, port: int) -> None:
        ep = self._driver.udp_bind(port)
        self._udp_tasks[port] = asyncio.get_running_loop().create_task(self._udp_share(port, ep))

    async def _udp_share(self, port: int, ep) -> None:
        """Each remote (ip, port) gets its own OS socket toward 127.0.0.1:port, idle flows expire."""
        loop = asyncio.get_running_loop()
        flows: dict[tuple, tuple[asyncio.DatagramTransport, list]] = {}
        too_big = LogLimiter()

        class Back(asyncio.DatagramProtocol):
            def __init__(self, remote):
                self.remote = remote

            def datagram_received(self, data, addr):
                try:
                    ep.sendto(data, self.remote)
                except OSError as e:
                    too_big.log(log, logging.WARNING, "shared udp port %d: reply of %d bytes dropped: %s", port, len(data), e.strerror or e)
                flows[self.remote][1][0] = loop.time()

        try:
            while True:
                data, remote = await ep.recvfrom()
                now = loop.time()
                for r, (tr, seen) in list(flows.items()):
                    if now - seen[0] > UDP_IDLE:
                        tr.close()
                        del flows[r]
                if remote not in flows:
                    if len(flows) >= MAX_UDP_FLOWS:
                        continue
                    tr = await self._udp_flow(loop, lambda r=remote: Back(r), remote[0], port)
                    if tr is None:
                        continue
                    flows[remote] = (tr, [now])
                tr, seen = flows[remote]
                seen[0] = now
                tr.sendto(data)
        except EOFError:
            pass  # the stack closed (daemon stopping, or a new stack took over)
        finally:
            for tr, _ in flows.values():
                tr.close()
            ep.close()

    async def _connect_local(self, remote_ip: str, port: int) -> socket.socket:
        """A TCP connection to 127.0.0.1:port from the peer's loopback address (else from 127.0.0.1):
        the connected non-blocking socket (a Splice relays it, no asyncio transport made)."""
        res = self._connect_local_now(remote_ip, port)
        return res if isinstance(res, socket.socket) else await res

    def _connect_local_now(self, remote_ip: str, port: int) -> socket.socket | Awaitable[socket.socket]:
        """:meth:`_connect_local` without a wait when the kernel connects at once (over loopback
        it usually does): the socket, else a coroutine that waits for it. Raises OSError."""
        src = self.source(remote_ip)
        try:
            return _open_local(src, port)
        except OSError as e:
            if not self._bind_failed(e, src):
                raise
        return _open_local(LOCALHOST, port)

    async def _udp_flow(self, loop, protocol, remote_ip: str, port: int) -> asyncio.DatagramTransport | None:
        """A socket toward 127.0.0.1:port from the peer's loopback address (None: none could be made)."""
        src = self.source(remote_ip)
        try:
            try:
                tr, _ = await loop.create_datagram_endpoint(protocol, remote_addr=(LOCALHOST, port),
                                                            local_addr=(src, 0) if src != LOCALHOST else None)
            except OSError as e:
                if not self._bind_failed(e, src):
                    raise
                tr, _ = await loop.create_datagram_endpoint(protocol, remote_addr=(LOCALHOST, port))
        except OSError as e:
            self._rlog.log(log, logging.WARNING, "shared udp port %d: no socket for %s: %s", port, remote_ip,
                           e.strerror or e)
            return None
        return tr


def _open_local(src: str, port: int) -> socket.socket | Awaitable[socket.socket]:
    """A TCP connection to 127.0.0.1:``port`` from ``src`` (127.0.0.1: not bound, as any client),
    connected, non-blocking, TCP_NODELAY: the socket when the kernel connected at once, else a
    coroutine that waits for it (at most LOCAL_DIAL_TIMEOUT). The port is chosen at connect, not
    at bind (IP_BIND_ADDRESS_NO_PORT), so Linux may reuse a port in TIME_WAIT toward another
    4-tuple as it does for unbound sockets: short connections in a burst do not run out of ports.
    Raises OSError (ECONNREFUSED...)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | _NONBLOCK)  # (no ioctl to make it so)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src != LOCALHOST:
            if hasattr(socket, "IP_BIND_ADDRESS_NO_PORT"):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
        if not _NONBLOCK:
            sock.setblocking(False)
        if _connect_at_once(sock, (LOCALHOST, port)):
            return sock
    except BaseException:
        sock.close()
        raise
    return _wait_connected(sock, port)


async def _wait_connected(sock: socket.socket, port: int) -> socket.socket:
    try:
        # (a timer only when the kernel did not connect at once; wait_for would add a task)
        async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, (LOCALHOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_at_once(sock: socket.socket, addr: tuple[str, int]) -> bool:
    """Start a non-blocking connect; True if it is already established. Over loopback the kernel
    usually completes the handshake before connect() returns EINPROGRESS, which a second connect()
    tells (EISCONN) without a wait for writability (a loop turn and two epoll changes); False: still
    in progress. Raises the connection's error (ECONNREFUSED...)."""
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        err = sock.connect_ex(addr)
    if err in (0, errno.EISCONN):
        return True
    if err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN, errno.EINTR):
        return False
    raise OSError(err, os.strerror(err))


def _wide(pool: ipaddress.IPv4Network) -> str:
    return f"the server's address pool {pool} is wider than /9 (no loopback address per peer fits)"

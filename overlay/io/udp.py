"""One non-blocking UDP socket on an asyncio loop, built for datagram rate rather than comfort.

asyncio's DatagramProtocol tops out near 75k datagrams/s here; draining a non-blocking socket from
``loop.add_reader`` reaches ~1.8M/s, and UDP GRO / GSO (Linux) move many datagrams per syscall.
So: reads drain ``recvmsg_into``/``recvfrom_into`` into one preallocated buffer until EAGAIN
(bounded per wakeup so a flood cannot starve the loop) and hand each datagram to a callback as a
memoryview valid only during the call; writes go out in batches, runs of equal-size datagrams to
one address as a single GSO ``sendmsg``; when the socket would block, datagrams wait in a bounded
backlog flushed by a writer callback. No coroutine or queue per packet.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections import deque
from collections.abc import Callable, Hashable, Iterable

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
"""The kernel accepts 64 (older) or 128 segments per GSO send; 64 works everywhere."""
GSO_MAX_BYTES = 65000
"""Total payload of one GSO send: it must fit in one IP packet's length field."""
RECV_BUFFER_SIZE = 65536 + 1024
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size)
# Errors meaning "this kernel/route cannot do GSO": fall back to one datagram per syscall.
_GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE, errno.ENOTSUP}

OnDatagram = Callable[[memoryview, Hashable], None]


def bind_udp(host: str, port: int, *, rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port), with large kernel buffers for bursts.
    An IPv6 socket is IPv6 only (``IPV6_V6ONLY``): IPv4 has a socket of its own on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# a first datagram up to this size is handed on (``on_batch``) before the socket is read again:
# interactive traffic is small, and bulk data (full-size datagrams, GRO batches) keeps its batches
PROMPT_MAX = 256


class UdpSocket:
    """Batched, non-blocking I/O for one UDP socket (the node's only socket).

    ``on_datagram(view, addr)`` runs for each received datagram; ``on_batch()`` (optional) runs
    once after each wakeup's batch, which is where the owner flushes its outgoing datagrams with
    ``send_batch`` so that a burst of input produces one batch of output. Addresses given to
    ``send_batch`` must be socket addresses; the node routes "via relay" paths elsewhere.
    ``set_handler`` replaces ``on_datagram`` (a socket handed from one owner to another).
    """

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: OnDatagram,
        *,
        on_batch: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        max_per_wakeup: int = 512,
        backlog: int = 4096,
        gro: bool = True,
        gso: bool = True,
    ):
        self.sock = sock
        sock.setblocking(False)
        self._on_datagram = on_datagram
        self._on_batch = on_batch
        self._loop = loop or asyncio.get_running_loop()
        self._max_per_wakeup = max_per_wakeup
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._backlog: deque[tuple[bytes, Hashable]] = deque()
        self._backlog_max = backlog
        self._writing = False
        self._closed = False
        self.gso = gso
        self.gro = gro and self._enable_gro()
        self.stats = dict.fromkeys(
            ("rx", "rx_syscalls", "rx_errors", "tx", "tx_syscalls", "tx_dropped", "tx_errors", "gso_sends"), 0
        )
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def set_handler(self, on_datagram: OnDatagram) -> None:
        """From the next wakeup on, received datagrams go to ``on_datagram`` (the rest of a batch
        being delivered still goes to the previous handler)."""
        self._on_datagram = on_datagram

    @property
    def local_address(self) -> Hashable:
        return self.sock.getsockname()

    def _enable_gro(self) -> bool:
        try:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self._backlog.clear()
        self.sock.close()

    # ------------------------------------------------------------------ receive

    def _on_readable(self) -> None:
        sock, view, deliver = self.sock, self._view, self._on_datagram
        stats = self.stats
        syscalls = 0
        unflushed = 0   # datagrams delivered since on_batch last ran
        try:
            while syscalls < self._max_per_wakeup:
                try:
                    if self.gro:
                        n, ancdata, _flags, addr = sock.recvmsg_into((view,), _CMSG_SPACE)
                    else:
                        n, addr = sock.recvfrom_into(view)
                        ancdata = None
                except BlockingIOError:
                    break
                except OSError:
                    # e.g. ECONNREFUSED queued by an ICMP error: not fatal for a datagram socket.
                    stats["rx_errors"] += 1
                    continue
                finally:
                    syscalls += 1
                segment = n
                if ancdata:
                    for level, kind, data in ancdata:
                        if level == SOL_UDP and kind == UDP_GRO:
                            segment = _GRO_SIZE.unpack_from(data)[0] or n
                if segment >= n:
                    stats["rx"] += 1
                    deliver(view[:n], addr)
                    unflushed += 1
                    if syscalls == 1 and n <= PROMPT_MAX and self._on_batch is not None:
                        # a lone small datagram first in a wakeup (a keystroke, a request, an
                        # ACK): answered before we look for more, so that the look (a system
                        # call that usually finds nothing) is not on the round trip's path
                        unflushed = 0
                        self._on_batch()
                        if self._closed:
                            return
                else:
                    for off in range(0, n, segment):
                        stats["rx"] += 1
                        deliver(view[off:min(off + segment, n)], addr)
                    unflushed += 1
        finally:
            stats["rx_syscalls"] += syscalls
            if unflushed and self._on_batch is not None and not self._closed:
                self._on_batch()

    # ------------------------------------------------------------------ send

    def send(self, data: bytes, addr: Hashable) -> None:
        self.send_batch(((data, addr),))

    def send_batch(self, datagrams: Iterable[tuple[bytes, Hashable]]) -> None:
        """Send in order; runs of equal-size datagrams to one address go as one GSO syscall."""
        if self._closed:
            return
        if self._backlog:
            self._enqueue(datagrams)
            return
        items = datagrams if isinstance(datagrams, (list, tuple)) else list(datagrams)
        i, count = 0, len(items)
        while i < count:
            try:
                i = self._send_run(items, i, count) if self.gso else self._send_one(items, i)
            except BlockingIOError:
                self._enqueue(items[i:])
                return

    def _send_one(self, items, i: int) -> int:
        data, addr = items[i]
        try:
            self.sock.sendto(data, addr)
            self.stats["tx"] += 1
        except BlockingIOError:
            raise
        except OSError:
            # Unreachable network, message too long...: drop this datagram, keep the socket.
            self.stats["tx_errors"] += 1
        self.stats["tx_syscalls"] += 1
        return i + 1

    def _send_run(self, items, i: int, count: int) -> int:
        """Send items[i:j] (one address, one size, last may be shorter) as one GSO write."""
        data, addr = items[i]
        size = len(data)
        j, total = i + 1, size
        while j < count and j - i < GSO_MAX_SEGMENTS:
            d, a = items[j]
            n = len(d)
            if a != addr or n > size or total + n > GSO_MAX_BYTES:
                break
            total += n
            j += 1
            if n < size:  # a shorter segment can only be the last one
                break
        if j - i == 1:
            return self._send_one(items, i)
        try:
            self.sock.sendmsg([d for d, _ in items[i:j]], [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, addr)
        except BlockingIOError:
            raise
        except OSError as e:
            if e.errno not in _GSO_REFUSED:
                self.stats["tx_errors"] += j - i
                self.stats["tx_syscalls"] += 1
                return j
            self.gso = False
            return i  # the caller resends this run one datagram per syscall
        self.stats["tx"] += j - i
        self.stats["tx_syscalls"] += 1
        self.stats["gso_sends"] += 1
        return j

    def _enqueue(self, datagrams: Iterable[tuple[bytes, Hashable]]) -> None:
        backlog = self._backlog
        for item in datagrams:
            if len(backlog) >= self._backlog_max:
                self.stats["tx_dropped"] += 1
            else:
                backlog.append(item)
        if backlog and not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        backlog = self._backlog
        items = list(backlog)
        backlog.clear()
        self._writing = False
        self._loop.remove_writer(self.sock.fileno())
        self.send_batch(items)
